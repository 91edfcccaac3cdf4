"""Structured outputs on a rank: each constrained sequence's grammar state (an xgrammar
matcher) lives here, advanced by the tokens this rank samples, so every rank masks the
same logits and samples the same token; the step message never carries a mask.

A new request's constraint is compiled in a background thread as soon as its step
arrives (cached by text), so compiling overlaps the request's prefill; the step that
samples its first token waits for it. Masks are filled on the host after the forward
pass is launched (on a GPU the two overlap) and applied to the float32 logits before
the sampler sees them.
"""

from __future__ import annotations

import collections
import concurrent.futures
import os
import threading
import zlib

import numpy as np
import torch

from serialization import GuidedSpec

_BITS = 32
MAX_CACHED_GRAMMARS = 256  # compiled constraints kept by text; the oldest unused go first
COMPILER_CACHE_BYTES = 256 << 20  # xgrammar's own cache of compiled grammars


def load_tokenizer(path: str):
    """The Hugging Face tokenizer of a model directory, a GGUF file or a directory holding
    only a saved tokenizer."""
    from transformers import AutoTokenizer

    from workers.model_loader import resolve_model_path

    try:
        folder, gguf_file = resolve_model_path(path)
    except ValueError:
        if not os.path.isdir(path):
            raise
        folder, gguf_file = path, None
    if gguf_file:
        from workers.gguf_cache import cached

        def load(entry: str):
            tokenizer = AutoTokenizer.from_pretrained(entry)
            tokenizer.name_or_path = folder  # as converted: the GGUF's folder
            return tokenizer

        return cached(os.path.join(folder, gguf_file), "tokenizer",
                      lambda: AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file),
                      lambda tok, out: tok.save_pretrained(out), load)
    return AutoTokenizer.from_pretrained(folder)


def pack_vocab(tokenizer, vocab_size: int) -> bytes:
    """The tokenizer's vocabulary as xgrammar needs it, compressed: the frontend, which has
    the tokenizer loaded, sends it to the ranks once (loading a GGUF's tokenizer there
    again takes 7-16 s on a 2-core host; this takes 0.6 s and travels as 0.7 MB for SmolLM2)."""
    import xgrammar as xgr

    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
    return zlib.compress(info.serialize_json().encode(), 1)


class RankGrammars:
    """Compiles constraints (cached) and keeps one matcher per constrained sequence."""

    def __init__(self, tokenizer_path: str, vocab_size: int, *, pin: bool = False,
                 max_threads: int = 0, vocab: bytes = b""):
        self.tokenizer_path = tokenizer_path
        self.vocab = vocab  # pack_vocab's bytes; empty: load the tokenizer from its path
        self.pin = pin  # page-locked masks: their copy to the GPU does not wait on the host
        self.vocab_size = vocab_size
        self.words = -(-vocab_size // _BITS)  # int32 words per bitmask row
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="spmd-grammar")
        # Threads filling masks and compiling: half the host's cores, 2 to 8 (0: that default).
        self._max_threads = max_threads or max(2, min(8, (os.cpu_count() or 2) // 2))
        self._compiler = None
        self._compiler_lock = threading.Lock()
        self._compiled: collections.OrderedDict[tuple[str, str], concurrent.futures.Future] = \
            collections.OrderedDict()  # LRU; a live sequence's matcher holds its own
        self._matchers: dict[int, _Pending] = {}  # seq id -> its matcher (or its compile)
        self._batch = None

    # ---- compile ------------------------------------------------------------------

    def _get_compiler(self):
        with self._compiler_lock:
            if self._compiler is None:
                import xgrammar as xgr

                if self.vocab:
                    info = xgr.TokenizerInfo.deserialize_json(zlib.decompress(self.vocab).decode())
                else:
                    info = xgr.TokenizerInfo.from_huggingface(
                        load_tokenizer(self.tokenizer_path), vocab_size=self.vocab_size)
                self._compiler = xgr.GrammarCompiler(info, max_threads=self._max_threads,
                                                     cache_limit_bytes=COMPILER_CACHE_BYTES)
            return self._compiler

    def _compile(self, kind: str, spec: str):
        compiler = self._get_compiler()
        # Compact JSON (no free whitespace): a model cannot pad its output with blank lines
        # until max_tokens cuts it, invalid, as happens when any whitespace is allowed.
        if kind == "json":
            return compiler.compile_json_schema(spec, any_whitespace=False)
        if kind == "json_object":
            return compiler.compile_json_schema('{"type": "object"}', any_whitespace=False)
        if kind == "regex":
            return compiler.compile_regex(spec)
        if kind == "grammar":
            return compiler.compile_grammar(spec)
        if kind == "structural_tag":
            return compiler.compile_structural_tag(spec)
        raise ValueError(f"guided.kind: unknown {kind!r}")

    # ---- sequences ----------------------------------------------------------------

    def add(self, seq_id: int, spec: GuidedSpec) -> None:
        """Starts compiling ``spec`` (or finds it compiled) for a new sequence."""
        key = (spec.kind, spec.spec)
        future = self._compiled.get(key)
        if future is None or (future.done() and future.exception() is not None):
            future = self._compiled[key] = self._pool.submit(self._compile, *key)
            while len(self._compiled) > MAX_CACHED_GRAMMARS:
                self._compiled.popitem(last=False)
        self._compiled.move_to_end(key)
        self._matchers[seq_id] = _Pending(future, list(spec.end_token_ids))

    def drop(self, seq_id: int) -> None:
        self._matchers.pop(seq_id, None)

    def __len__(self) -> int:
        return len(self._matchers)

    def _matcher(self, seq_id: int):
        pending = self._matchers[seq_id]
        if pending.matcher is None:
            import xgrammar as xgr

            compiled = pending.future.result()  # raises the compile error for this step
            pending.matcher = xgr.GrammarMatcher(
                compiled, override_stop_tokens=pending.end_token_ids or None)
        return pending.matcher

    # ---- one step -----------------------------------------------------------------

    def bitmask(self, seq_ids: list[int]) -> tuple[torch.Tensor, list[int]] | None:
        """``(mask, rows)``: int32 ``[len(seq_ids), words]`` allowed-token bits of the
        sequences that sample this step, in step order, and the constrained ones' indices
        (the other rows are left all set); None when none of them is constrained."""
        matchers = self._matchers
        rows = [i for i, s in enumerate(seq_ids) if s in matchers]
        if not rows:
            return None
        import xgrammar as xgr

        mask = torch.full((len(seq_ids), self.words), -1, dtype=torch.int32,
                          pin_memory=self.pin)
        live, matchers = [], []
        for i in rows:
            matcher = self._matcher(seq_ids[i])
            if matcher.is_terminated():
                # Its grammar ended on an end token, in a step the engine scheduled before
                # it saw that token (overlapped steps), or under ignore_eos: end tokens only.
                mask[i] = self._end_row(seq_ids[i])
            else:
                live.append(i)
                matchers.append(matcher)
        if matchers:
            self._batch_matcher().batch_fill_next_token_bitmask(matchers, mask, live)
        return mask, rows

    def _batch_matcher(self):
        if self._batch is None:
            import xgrammar as xgr

            self._batch = xgr.BatchGrammarMatcher(self._max_threads)
        return self._batch

    def _end_row(self, seq_id: int) -> torch.Tensor:
        """A mask row allowing only the sequence's end tokens."""
        row = np.zeros(self.words * _BITS, dtype=bool)
        row[[t for t in self._matchers[seq_id].end_token_ids if t < len(row)]] = True
        return torch.from_numpy(np.packbits(row, bitorder="little").view("<i4"))

    def accept(self, seq_ids: list[int], tokens: np.ndarray) -> None:
        """Advances the constrained sequences by the tokens they sampled. A sequence
        whose grammar already ended keeps its state (the engine stops it on the end
        token; with ``ignore_eos`` it goes on sampling only end tokens)."""
        live, accepted = [], []
        for seq_id, token in zip(seq_ids, tokens.tolist()):
            pending = self._matchers.get(seq_id)
            if pending is not None and pending.matcher is not None \
                    and not pending.matcher.is_terminated():
                live.append(pending.matcher)
                accepted.append(token)
        if live:  # one call: the matchers advance in xgrammar's threads
            self._batch_matcher().batch_accept_token(live, accepted)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class _Pending:
    __slots__ = ("future", "end_token_ids", "matcher")

    def __init__(self, future: concurrent.futures.Future, end_token_ids: list[int]):
        self.future = future
        self.end_token_ids = end_token_ids
        self.matcher = None


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int] | None = None) -> None:
    """Sets the logits of disallowed tokens to -inf, in place, in ``rows`` (default: all;
    ``bitmask`` on the host, a row per logits row; bit ``j % 32`` of word ``j // 32``
    set: token ``j`` allowed). Unconstrained rows are not touched: on the CPU the masking
    is memory-bound (22 ms for 256 rows of 49,152 logits on this 2-core VM)."""
    vocab = logits.shape[-1]
    if rows is not None and len(rows) == logits.shape[0]:
        rows = None
    if logits.device.type in ("cpu", "cuda") and logits.dtype == torch.float32:
        import xgrammar as xgr

        mask = bitmask.to(logits.device, non_blocking=True)
        xgr.apply_token_bitmask_inplace(logits, mask, vocab_size=vocab, indices=rows)
        return
    # Other devices (XLA, Spyre): unpack the bits with plain tensor ops.
    index = torch.arange(logits.shape[0]) if rows is None else torch.tensor(rows)
    shifts = torch.arange(_BITS, dtype=torch.int32)
    bits = ((bitmask[index].unsqueeze(-1) >> shifts) & 1).bool().view(len(index), -1)[:, :vocab]
    index = index.to(logits.device)
    logits[index] = logits[index].masked_fill(~bits.to(logits.device), float("-inf"))
