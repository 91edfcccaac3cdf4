"""One tensor-parallel rank: the same code on every rank, no driver special case.

``Worker`` holds what every device shares (persistent batch, model, KV cache,
sampler, ``execute_model``); a device mixin supplies ``init_device``,
``determine_num_kv_blocks`` and the device itself. Concrete ranks are
compositions, e.g. ``class CPUWorker(CPUMixin, Worker)``.
"""

from __future__ import annotations

import os
import threading
import time
import traceback

import numpy as np
import torch

from serialization import (
    EncodeBatch,
    ExecuteModelRequest,
    PoolerOutput,
    RankCall,
    RankConfig,
    RankReply,
    SamplerOutput,
    decode_rank_input,
    encode,
    pack_f32,
    pack_i32,
    unpack_i32,
)
from workers.attention import AttentionMetadata, VarlenMetadata
from workers.input_batch import InputBatch, StepInputs
from workers.layers.lora import LoRAMapping
from workers.lora import RankLoRA
from workers.model_loader import load_model
from workers.sampler import Sampler, SampleResult, SamplingRow
from workers.structured import RankGrammars

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class RankError(RuntimeError):
    """An exception raised on a rank, re-raised with the rank named."""


class Worker:
    """Device-independent rank logic. Subclasses mix in a device."""

    device: torch.device
    _fault: tuple[str, object] | None = None  # set by fail_next_step / hang_next_step
    lora_lanes = False  # static-shape ranks run LoRA as lanes (lora_ops.lora_lanes)
    _profile: StepProfile | None = None  # a traced window of steps (profile_steps)
    _num_steps = 0
    _last_step_end = 0.0  # when the last step's tokens were on the host
    grammars: RankGrammars | None = None  # made by the first constrained request
    _grammar_vocab = b""  # set_grammar_vocab's
    _to_accept: tuple[list[int], np.ndarray] | None = None  # the last step's tokens, for them
    # Overlapped steps (RankConfig.overlap_steps): the last call's step, launched and not read
    # back (_Launched), its finished output (a step that ran nothing) or its failure, which
    # the next call answers with.
    _prev: _Launched | SamplerOutput | Exception | None = None

    def __init__(self, config: RankConfig, tp_rank: int):
        self.config = config
        self.tp_rank = tp_rank
        self.dtype = _DTYPES[config.dtype]
        # The spmd custom ops import torch._dynamo on their first call (0.9 s on a 2-core VM,
        # inside the first request's step): done here, at start-up.
        import torch._dynamo  # noqa: F401
        self.init_device()
        self.model = load_model(config.model, config.load_format, self.dtype, tp_rank,
                                config.tp_size, seed=config.seed, device=self.device,
                                hf_config=config.hf_config)
        self.lora = None  # adapters and device slots, when the engine serves LoRA
        if config.max_loras:
            self.lora = RankLoRA(self.model, self.model.config, max_loras=config.max_loras,
                                 max_rank=config.max_lora_rank, dtype=self.dtype,
                                 device=self.device, lanes=self.lora_lanes)
        self.sampler = Sampler()
        self.batch = InputBatch(config.max_model_len, config.block_size)
        self.kv_caches: list[torch.Tensor] = []
        # Marks the threads whose settings are made (init_thread): thread-local, since a new
        # thread can get an ended one's ident (the compiled graph's loop thread got the rank's
        # set-up thread's, skipped init_thread and ran the TPU path's 9th bucket eagerly).
        self._thread = threading.local()
        self._thread.ready = True
        # Steps whose logits held a NaN or Inf, counted on the device (no sync per step).
        self._nonfinite_steps = torch.zeros((), dtype=torch.int64, device=self.device)

    # ---- device hooks (mixins) --------------------------------------------------

    def init_device(self) -> None:
        raise NotImplementedError

    def init_thread(self) -> None:
        """Per-thread device settings (e.g. OpenMP threads), for a new calling thread."""

    def determine_num_kv_blocks(self) -> int:
        raise NotImplementedError

    @property
    def fp8_kv(self) -> bool:
        return self.config.kv_cache_dtype == "fp8"

    def kv_block_bytes(self) -> int:
        shape = self.model.kv_cache_shape(1, self.config.block_size)
        if self.fp8_kv:  # one byte per value, and a float32 scale per (token, kv head)
            per_layer = int(np.prod(shape)) + int(np.prod(shape[:-1])) * 4
        else:
            per_layer = int(np.prod(shape)) * self.dtype.itemsize
        return per_layer * self.model.num_layers

    def new_kv_caches(self, num_blocks: int, block_size: int) -> list:
        """One zeroed cache per layer: a tensor, or with ``kv_cache_dtype="fp8"`` a pair
        (float8 e4m3 values, float32 scales ``[2, num_blocks, nkv, block_size]``)."""
        shape = self.model.kv_cache_shape(num_blocks, block_size)
        if self.fp8_kv:
            return [(torch.zeros(shape, dtype=torch.float8_e4m3fn, device=self.device),
                     torch.zeros((*shape[:2], shape[3], shape[2]), dtype=torch.float32,
                                 device=self.device))
                    for _ in range(self.model.num_layers)]
        return [torch.zeros(shape, dtype=self.dtype, device=self.device)
                for _ in range(self.model.num_layers)]

    # ---- transport entry point ----------------------------------------------------

    def execute_model(self, data: bytes) -> bytes | None:
        """Runs one step (rank 0 returns the SamplerOutput, others None) or one
        broadcast call (every rank returns a RankReply)."""
        if not getattr(self._thread, "ready", False):
            # Transports may call from a thread other than the one that initialised us
            # (a compiled graph runs its own loop thread); thread-local settings follow.
            self._thread.ready = True
            self.init_thread()
        try:
            msg = decode_rank_input(data)
            if isinstance(msg, RankCall):
                self._settle(msg.method)
                return encode(RankReply(self.tp_rank, self._call(msg)))
            out = self._encode(msg) if isinstance(msg, EncodeBatch) else self._step(msg)
            return encode(out) if self.tp_rank == 0 else None
        except Exception as e:
            raise RankError(f"rank {self.tp_rank}: {type(e).__name__}: {e}\n"
                            f"{traceback.format_exc()}") from None

    def _call(self, msg: RankCall):
        if msg.method not in _CALLS:
            raise ValueError(f"method: unknown rank call {msg.method!r}; known: {sorted(_CALLS)}")
        return getattr(self, msg.method)(*msg.args)

    # ---- broadcast calls ----------------------------------------------------------

    def ping(self) -> str:
        return "ok"

    def pid(self) -> int:
        """The rank's process id (fault tests kill it)."""
        return os.getpid()

    def initialize_cache(self, num_blocks: int) -> int:
        self.kv_caches = self.new_kv_caches(num_blocks, self.config.block_size)
        return num_blocks

    def num_live_requests(self) -> int:
        return len(self.batch.states)

    def nonfinite_steps(self) -> int:
        """Steps so far whose logits held a NaN or an Inf (benchmarks report it)."""
        return int(self._nonfinite_steps)

    def batch_digest(self) -> str:
        """The persistent batch as text (seq id → tokens, progress), for tests that
        check every rank agrees with the engine."""
        parts = []
        for seq_id in sorted(self.batch.states):
            row = self.batch.states[seq_id].row
            toks = self.batch.tokens_of(seq_id).tolist()
            parts.append(f"{seq_id}:{int(self.batch.num_computed[row])}:{toks}")
        return ";".join(parts)

    @torch.inference_mode()
    def score_prompt(self, token_ids: list[int], last: int) -> bytes:
        """Float32 logits (``[last, vocab]``, raw bytes) of a prompt's last ``last``
        positions, from one prefill over a scratch cache (the serving cache is untouched):
        compares numerics across dtypes, devices and tensor-parallel sizes."""
        ids = np.asarray(token_ids, dtype=np.int64)
        n = len(ids)
        if not 0 < n <= self.config.max_model_len:
            raise ValueError(f"token_ids: length {n} outside 1..max_model_len="
                             f"{self.config.max_model_len}")
        if not 0 < last <= n:
            raise ValueError(f"last: {last} outside 1..{n}")
        hidden = self._scratch_prefill([ids])
        return self.model.compute_logits(hidden[n - last:]).cpu().numpy().tobytes()

    def _scratch_prefill(self, prompts: list[np.ndarray]) -> torch.Tensor:
        """Hidden states of one prefill of ``prompts`` (token-id arrays) as a batch, over a
        scratch cache of the serving cache's dtype (the serving cache is untouched)."""
        bs, dev = self.config.block_size, self.device
        lens = [len(p) for p in prompts]
        blocks = [-(-n // bs) for n in lens]
        caches = self.new_kv_caches(sum(blocks), bs)
        first = np.cumsum([0] + blocks[:-1])
        tables = torch.zeros((len(prompts), max(blocks)), dtype=torch.int32)
        for i, (f, b) in enumerate(zip(first, blocks)):
            tables[i, :b] = torch.arange(f, f + b, dtype=torch.int32)
        slots = np.concatenate([f * bs + np.arange(n) for f, n in zip(first, lens)])
        meta = AttentionMetadata(
            query_start_loc=torch.tensor(np.cumsum([0] + lens), dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(lens, dtype=torch.int32, device=dev),
            block_tables=tables.to(dev), slot_mapping=torch.from_numpy(slots).to(dev),
            max_query_len=max(lens), max_seq_len=max(lens))
        ids = torch.from_numpy(np.concatenate(prompts).astype(np.int64)).to(dev)
        positions = torch.from_numpy(np.concatenate([np.arange(n) for n in lens])).to(dev)
        return self.model(ids, positions, meta, caches)

    def num_warmup_steps(self) -> int:
        """Warm-up units (compiled shapes) the engine runs, one ``warm_up`` call each,
        before serving; devices that compile nothing ahead of time have none."""
        return 0

    def warm_up(self, index: int) -> str:
        """Compiles and runs warm-up unit ``index``; returns what it was, for the report."""
        raise ValueError(f"index: {index}; this rank has no warm-up steps")

    def num_compiled_graphs(self) -> int:
        """Graphs this rank compiled so far (0 where nothing is compiled)."""
        return 0

    def profile_steps(self, start_step: int, num_steps: int, path: str) -> bool:
        """Traces ``num_steps`` generation steps with torch.profiler, starting ``start_step``
        steps after this call, into the Chrome trace ``path``;
        ``profile_result`` then says how long the device sat idle between steps."""
        self._profile = StepProfile(self.device, self._num_steps + start_step, num_steps, path)
        return True

    def profile_result(self) -> dict:
        """The traced window's device busy share and its idle gaps between steps (ms);
        {} while the window has not been traced yet."""
        prof = self._profile
        if prof is None:
            return {}
        result = prof.result()
        if result:
            self._profile = None
        return result

    def set_grammar_vocab(self, vocab: bytes) -> bool:
        """The tokenizer's vocabulary for structured outputs (``pack_vocab``), sent by the
        frontend before its first constrained request, so that ranks need not load the
        tokenizer themselves."""
        self._grammar_vocab = vocab
        return True

    def raise_error(self, message: str) -> None:
        """Test hook: this rank raises (the engine must name it)."""
        raise RuntimeError(message)

    def forget(self, seq_ids: list[int], preempted_ids: list[int]) -> int:
        """After a failed step: drops every sequence of it (whatever part of the step was
        applied before the failure) and applies its preemptions, so that every rank ends
        in the state the engine expects. Returns how many sequences were dropped."""
        dropped = sum(self.batch.drop(s) for s in seq_ids)
        if self.grammars is not None:
            for seq_id in seq_ids:
                self.grammars.drop(seq_id)
        for seq_id in preempted_ids:
            if seq_id in self.batch.states:
                self.batch.preempt(seq_id)
        return dropped

    def load_lora(self, lora_id: int, path: str) -> bool:
        """Reads this rank's shards of an adapter into CPU memory (the engine has checked it)."""
        self._require_lora().load(lora_id, path)
        return True

    def unload_lora(self, lora_id: int) -> bool:
        return self._require_lora().unload(lora_id)

    def lora_slots(self) -> dict:
        """Adapter id -> device slot, for tests that check every rank agrees."""
        return dict(self.lora.slot_of) if self.lora is not None else {}

    def loaded_loras(self) -> list[int]:
        """Adapter ids held in this rank's CPU memory."""
        return sorted(self.lora.cpu) if self.lora is not None else []

    def _require_lora(self) -> RankLoRA:
        if self.lora is None:
            raise ValueError("LoRA is not enabled on this rank (max_loras=0)")
        return self.lora

    def fail_next_step(self, message: str) -> bool:
        """Test hook: the next step raises ``message`` on this rank, after applying its
        delta (a failure attributable to that step's requests)."""
        self._fault = ("fail", message)
        return True

    def hang_next_step(self, seconds: float) -> bool:
        """Test hook: the next step stalls this rank for ``seconds`` (a hung rank)."""
        self._fault = ("hang", seconds)
        return True

    def sleep(self, seconds: float) -> bool:
        """Test hook: this rank stops answering for a while (the engine must time out)."""
        time.sleep(seconds)
        return True

    # ---- one prefill-only step (embeddings) ------------------------------------------

    def _encode(self, msg: EncodeBatch) -> PoolerOutput:
        """Runs whole prompts once and pools each; nothing is kept for the next step."""
        t0 = time.perf_counter()
        seq_ids, seq_lens, token_ids = self._check_encode(msg)
        if len(seq_ids) == 0:
            return PoolerOutput(step_id=msg.step_id)
        self._apply_fault()
        t_model = time.perf_counter()
        pooled = self._run_encoder(seq_lens, token_ids)
        t1 = time.perf_counter()
        return PoolerOutput(step_id=msg.step_id, seq_ids=msg.seq_ids, embeddings=pooled.tobytes(),
                            hidden_size=pooled.shape[1], model_time_s=t1 - t_model,
                            rank_time_s=t1 - t0)

    def _apply_fault(self) -> None:
        if self._fault is not None:
            (kind, arg), self._fault = self._fault, None
            if kind == "fail":
                raise RuntimeError(arg)
            time.sleep(arg)

    def _check_encode(self, msg: EncodeBatch):
        if self.config.task != "embed":
            raise ValueError("EncodeBatch: this rank serves task='generate'")
        seq_ids, seq_lens = unpack_i32(msg.seq_ids), unpack_i32(msg.seq_lens)
        token_ids = unpack_i32(msg.token_ids)
        if len(seq_ids) != len(seq_lens) or int(seq_lens.sum()) != len(token_ids):
            raise ValueError(f"EncodeBatch: {len(seq_ids)} seq_ids, {len(seq_lens)} seq_lens "
                             f"summing to {int(seq_lens.sum())}, {len(token_ids)} token_ids")
        if len(seq_lens) and (seq_lens.min() < 1 or seq_lens.max() > self.config.max_model_len):
            raise ValueError(f"EncodeBatch.seq_lens: outside 1..max_model_len="
                             f"{self.config.max_model_len}")
        vocab = self.model.config.vocab_size
        if len(token_ids) and (token_ids.min() < 0 or token_ids.max() >= vocab):
            raise ValueError(f"EncodeBatch.token_ids: outside [0, {vocab})")
        return seq_ids, seq_lens, token_ids

    @torch.inference_mode()
    def _run_encoder(self, seq_lens: np.ndarray, token_ids: np.ndarray) -> np.ndarray:
        """Float32 ``[S, hidden]``: each sequence's final hidden states, pooled."""
        dev = self.device
        cu = np.zeros(len(seq_lens) + 1, dtype=np.int32)
        np.cumsum(seq_lens, out=cu[1:])
        positions = np.arange(len(token_ids), dtype=np.int64) - np.repeat(cu[:-1], seq_lens)
        meta = VarlenMetadata(torch.from_numpy(cu).to(dev), int(seq_lens.max()),
                              causal=self.config.causal and not getattr(self.model, "is_encoder", False))
        hidden = self.model(torch.from_numpy(token_ids.astype(np.int64)).to(dev),
                            torch.from_numpy(positions).to(dev), meta, None)
        return pool(hidden, meta.cu_seqlens, torch.from_numpy(seq_lens.copy()).to(dev),
                    self.config.pooling).cpu().numpy()

    # ---- one step -----------------------------------------------------------------

    def _step(self, msg: ExecuteModelRequest) -> SamplerOutput:
        if self.config.overlap_steps:
            return self._step_overlapped(msg)
        t0 = time.perf_counter()
        inputs = self._begin(msg)
        if inputs is None:
            return SamplerOutput(step_id=msg.step_id)
        t_model = time.perf_counter()
        result = self._run_model(inputs)
        sampled = result.token_ids.numpy().astype(np.int32)
        t_host = time.perf_counter()
        idle_s = t_model - self._last_step_end if self._last_step_end else 0.0
        self._last_step_end = t_host
        self._commit(inputs, sampled)
        t1 = time.perf_counter()
        return self._output(msg.step_id, inputs, result, sampled, t_host - t_model, t1 - t0,
                            idle_s)

    def _begin(self, msg: ExecuteModelRequest) -> StepInputs | None:
        """Applies a step's delta; returns the inputs of its forward, None if it runs none."""
        self.batch.validate(msg)
        for fill in msg.lora_slots:
            self._require_lora().fill_slot(fill.slot, fill.lora_id)
        self.batch.apply(msg)
        self._apply_guided(msg)
        if not msg.scheduled_seq_ids:
            return None
        self._apply_fault()
        inputs = self.batch.prepare(msg)
        if self._profile is not None:
            self._profile.before_step(self._num_steps)
        self._num_steps += 1
        return inputs

    def _run_model(self, inputs: StepInputs) -> SampleResult:
        return self._sample_step(self._forward(inputs), inputs).cpu()

    @torch.inference_mode()
    def _forward(self, inputs: StepInputs) -> torch.Tensor:
        """The step's logits (launched: on a GPU, nothing waits for them here)."""
        return self._compute_logits(inputs)

    @torch.inference_mode()
    def _sample_step(self, logits: torch.Tensor, inputs: StepInputs) -> SampleResult:
        """The step's sampled tokens (and log-probs), on the device."""
        if len(inputs.logits_indices) == 0:
            return SampleResult(torch.empty(0, dtype=torch.int64, device=self.device), None,
                                None, None)
        self._nonfinite_steps += any_nonfinite(logits)
        return self._sample(logits, inputs)

    # ---- overlapped steps ------------------------------------------------------------

    def _step_overlapped(self, msg: ExecuteModelRequest) -> SamplerOutput:
        """Launches this step, then reads back the step before it and answers with *that*
        step's output (``step_id`` -1 when there was none). A message with ``step_id < 0``
        launches nothing: it only collects the last step's output (a flush).

        On a GPU the device thus runs step n+1 straight after step n: n+1's host work (its
        delta, inputs, launch) is done while n runs, and a decode row's input token, which n
        sampled, is taken from n's tokens on the device (``StepInputs.input_src``). The
        sampling of n+1 waits for n's tokens on the host: grammars and penalties see them."""
        t0 = time.perf_counter()
        prev = self._prev
        if isinstance(prev, Exception):
            self._prev = None
            raise prev  # the last call's step failed: this call answers for it
        answer = None
        try:
            inputs = self._begin(msg) if msg.step_id >= 0 else None
            if inputs is not None:
                t_launch = time.perf_counter()
                logits = self._forward(inputs)  # decode rows read prev's tokens on the device
            answer = self._land(prev)
            self._prev = None
            if inputs is not None:
                result = self._sample_step(logits, inputs)
                self.batch.commit_pending(inputs)
                self._prev = _Launched(msg.step_id, inputs, result, self._read_back(result), t0,
                                       t_launch)
            elif msg.step_id >= 0:
                self._prev = SamplerOutput(step_id=msg.step_id)
            return answer
        except Exception as e:
            # The engine fails this step and the ones sent after it, and has every rank forget
            # their sequences: nothing of them stays pending here. The step before it did not
            # fail: its output is still this call's answer, and the failure the next call's,
            # which is where the engine looks for this step.
            if answer is None:
                try:
                    answer = self._land(prev)
                except Exception:
                    answer = None
            self._prev = None
            self.batch.discard_pending()
            if answer is None:
                raise
            self._prev = e
            return answer

    def _land(self, prev: _Launched | SamplerOutput | None) -> SamplerOutput:
        """The output of the last call's step; a launched one is read back (this waits for
        the device) and its tokens written into the batch."""
        if prev is None:
            return SamplerOutput(step_id=-1)
        if isinstance(prev, SamplerOutput):
            return prev
        result = prev.wait()
        sampled = result.token_ids.numpy().astype(np.int32)
        t_host = time.perf_counter()
        # The device ran this step from its launch or from the end of the one before it.
        started = max(prev.t_launch, self._last_step_end)
        idle_s = max(0.0, prev.t_launch - self._last_step_end) if self._last_step_end else 0.0
        self._last_step_end = t_host
        self.batch.land(sampled)
        self._defer_accept(prev.inputs, sampled)
        return self._output(prev.step_id, prev.inputs, result, sampled, t_host - started,
                            time.perf_counter() - prev.t0, idle_s)

    def _settle(self, method: str) -> None:
        """Before a broadcast call: a launched step is read back (its output still answers
        the next step call), so that the call sees a batch with no token pending; ``forget``
        (after a failed step) drops it instead, with the sequences it names."""
        if method == "forget":
            self._prev = None
            self.batch.discard_pending()
        elif isinstance(self._prev, _Launched):
            self._prev = self._land(self._prev)

    def _read_back(self, result: SampleResult) -> tuple[SampleResult, object]:
        """Starts copying a launched step's result to the host; returns (the host copy, an
        object whose ``synchronize()`` waits for it). The copy is queued right behind the step,
        ahead of the next step's forward: a plain ``.cpu()`` at landing time would be queued
        behind that forward and wait for it. On the CPU the result is already there."""
        return result, None

    def _take_pending_tokens(self, input_ids: torch.Tensor, input_src: torch.Tensor) -> None:
        """Overlapped steps: the input tokens still on the device (``input_src >= 0``), in
        place, from the sampled tokens of the step launched last (not yet landed)."""
        assert isinstance(self._prev, _Launched), "input tokens pending without a launched step"
        tokens = self._prev.result.token_ids
        input_ids.copy_(torch.where(input_src >= 0, tokens[input_src.clamp(min=0)], input_ids))

    def _sample(self, logits: torch.Tensor, inputs: StepInputs) -> SampleResult:
        """Samples the step's rows; constrained rows first lose their disallowed tokens
        (the masks are filled here, on the host, while a device still runs the forward)."""
        bitmask = None
        if self.grammars is not None and len(self.grammars):
            self._accept_guided()
            bitmask = self.grammars.bitmask(self._sample_seq_ids(inputs))
        if self.batch.plain_greedy[inputs.sample_rows].all():
            return self.sampler.greedy(logits, bitmask)
        return self.sampler(logits, self._sampling_rows(inputs), bitmask)

    def _accept_guided(self) -> None:
        """Advances the grammars by the last step's tokens: deferred to here, after this
        step's forward is launched, so that on a GPU it overlaps the forward instead of
        delaying it (0.8 ms for 256 sequences on this CPU)."""
        if self._to_accept is not None:
            (seq_ids, tokens), self._to_accept = self._to_accept, None
            self.grammars.accept(seq_ids, tokens)

    def _sample_seq_ids(self, inputs: StepInputs) -> list[int]:
        return self.batch.seq_id[inputs.sample_rows].tolist()

    def _commit(self, inputs: StepInputs, sampled: np.ndarray) -> None:
        """Appends the sampled tokens; constrained sequences' grammars advance by them."""
        self.batch.commit(inputs, sampled)
        self._defer_accept(inputs, sampled)

    def _defer_accept(self, inputs: StepInputs, sampled: np.ndarray) -> None:
        """Constrained sequences' grammars advance by a step's tokens, in the next step."""
        if self.grammars is not None and len(self.grammars):
            self._accept_guided()  # a step that sampled nothing left the last ones pending
            self._to_accept = (self._sample_seq_ids(inputs), sampled)  # see _accept_guided

    def _apply_guided(self, msg: ExecuteModelRequest) -> None:
        """Forgets the grammars of finished sequences; starts compiling new ones'."""
        if self.grammars is not None:
            for seq_id in unpack_i32(msg.finished_ids).tolist():
                self.grammars.drop(seq_id)
        for req in msg.new_requests:
            if req.guided is not None:
                if self.grammars is None:
                    self.grammars = RankGrammars(self.config.tokenizer or self.config.model,
                                                 self.model.config.vocab_size,
                                                 pin=self.device.type == "cuda",
                                                 vocab=self._grammar_vocab)
                self.grammars.add(req.seq_id, req.guided)

    def _compute_logits(self, inputs: StepInputs) -> torch.Tensor:
        """Runs the model over the step; float32 logits ``[S', V]`` of the sampled tokens
        (on the device). Device mixins may replace this (e.g. with a CUDA-graph replay)."""
        meta, input_ids, positions = self._prepare_tensors(inputs)
        hidden = self.model(input_ids, positions, meta, self.kv_caches, self._lora_mapping(inputs))
        if len(inputs.logits_indices) == 0:
            return hidden[:0]
        return self.model.compute_logits(hidden[self._to_device(inputs.logits_indices)])

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        """A host array on the device (a GPU's copy neither waits for the device nor makes
        the host wait: with overlapped steps the device is still running the last step)."""
        return torch.from_numpy(array).to(self.device)

    def _prepare_tensors(self, inputs: StepInputs):
        """(AttentionMetadata, input_ids, positions) on the device."""
        meta = AttentionMetadata(
            query_start_loc=self._to_device(inputs.query_start_loc),
            seq_lens=self._to_device(inputs.seq_lens),
            block_tables=self._to_device(np.ascontiguousarray(inputs.block_tables)),
            slot_mapping=self._to_device(inputs.slot_mapping),
            max_query_len=int(np.diff(inputs.query_start_loc).max()),
            max_seq_len=int(inputs.seq_lens.max()),
        )
        input_ids = self._to_device(inputs.input_ids)
        if inputs.input_src is not None:
            self._take_pending_tokens(input_ids, self._to_device(inputs.input_src))
        return meta, input_ids, self._to_device(inputs.positions)

    def _token_slots(self, inputs: StepInputs) -> np.ndarray | None:
        """Each token's LoRA slot (-1: base); None when no request of the step has an adapter."""
        if self.lora is None or not inputs.lora_ids.any():
            return None
        return np.repeat(self.lora.slots(inputs.lora_ids), np.diff(inputs.query_start_loc))

    def _lora_mapping(self, inputs: StepInputs) -> LoRAMapping | None:
        token_slots = self._token_slots(inputs)
        return None if token_slots is None else self.lora.mapping(token_slots)

    def _sampling_rows(self, inputs: StepInputs) -> list[SamplingRow]:
        batch = self.batch
        out = []
        for row in inputs.sample_rows.tolist():
            state = batch.row_states[row]
            opts = state.sampling
            needs_history = (opts.presence_penalty or opts.frequency_penalty
                             or opts.repetition_penalty != 1.0)
            outputs = (batch.token_ids[row, state.num_prompt_tokens : batch.num_tokens[row]].tolist()
                       if needs_history else [])
            prompt = batch.token_ids[row, : state.num_prompt_tokens]
            out.append(SamplingRow(opts, state.generator, prompt, outputs))
        return out

    def _output(self, step_id: int, inputs: StepInputs, result: SampleResult,
                sampled: np.ndarray, model_time_s: float, rank_time_s: float,
                idle_s: float = 0.0) -> SamplerOutput:
        rows = inputs.sample_rows
        seq_ids = self.batch.seq_id[rows]
        fields = {}
        # A row whose request finished while the step ran (overlapped steps) has no state
        # left: its token is dropped by the engine anyway.
        states = ([self.batch.row_states[r] for r in rows.tolist()]
                  if result.sampled_logprobs is not None else [])
        idx = np.flatnonzero([s is not None and s.sampling.logprobs >= 0 for s in states])
        if len(idx):
            k = max(states[i].sampling.logprobs for i in idx.tolist())
            fields = dict(
                logprob_seq_ids=pack_i32(seq_ids[idx]),
                sampled_logprobs=pack_f32(result.sampled_logprobs.numpy()[idx]),
                num_top=k,
                top_ids=pack_i32(result.top_ids[idx, :k].numpy()) if k else b"",
                top_logprobs=pack_f32(result.top_logprobs[idx, :k].numpy()) if k else b"",
            )
        return SamplerOutput(step_id=step_id, seq_ids=pack_i32(seq_ids), token_ids=sampled.tobytes(),
                             model_time_s=model_time_s, rank_time_s=rank_time_s, idle_s=idle_s,
                             **fields)


class _Launched:
    """An overlapped step whose forward and sampling are launched, not read back:
    ``result`` on the device (the next step's decode rows read its tokens there), and
    its host copy under way."""

    __slots__ = ("step_id", "inputs", "result", "host", "t0", "t_launch")

    def __init__(self, step_id: int, inputs: StepInputs, result: SampleResult,
                 host: tuple[SampleResult, object], t0: float, t_launch: float):
        self.step_id, self.inputs, self.result, self.host = step_id, inputs, result, host
        self.t0, self.t_launch = t0, t_launch

    def wait(self) -> SampleResult:
        """The result on the host, once the device has produced it."""
        result, done = self.host
        if done is not None:
            done.synchronize()
        return result


def any_nonfinite(logits: torch.Tensor) -> torch.Tensor:
    """A 0-d bool tensor: whether ``logits`` hold a NaN or an infinity, from one min/max
    pass (NaN propagates through both): ``~isfinite(logits).all()`` takes four passes and
    three temporaries (48 ms against 1.2 ms at 256 x 49,152 on a 2-core CPU; 0.23 ms of a
    Qwen3-0.6B decode step on an H200)."""
    low, high = torch.aminmax(logits)
    return ~(torch.isfinite(low) & torch.isfinite(high))


def pool(hidden: torch.Tensor, cu_seqlens: torch.Tensor, seq_lens: torch.Tensor,
         pooling: str) -> torch.Tensor:
    """Float32 ``[S, hidden]`` from a packed ``hidden [T, hidden]``: each sequence's mean
    (summed in float32), first (CLS) or last token."""
    if pooling == "cls":
        return hidden[cu_seqlens[:-1].long()].float()
    if pooling == "last":
        return hidden[cu_seqlens[1:].long() - 1].float()
    assert pooling == "mean", pooling
    seq_index = torch.repeat_interleave(torch.arange(len(seq_lens), device=hidden.device),
                                        seq_lens.long(), output_size=hidden.shape[0])
    sums = torch.zeros(len(seq_lens), hidden.shape[1], dtype=torch.float32, device=hidden.device)
    sums.index_add_(0, seq_index, hidden.float())
    return sums / seq_lens[:, None].float()


class StepProfile:
    """torch.profiler over a window of steps, then the device's timeline in it: kernels
    and copies merged into busy intervals, and the ``num_steps - 1`` widest gaps (one
    between each pair of consecutive steps; inside a step the gaps are launch-sized)."""

    def __init__(self, device: torch.device, start_step: int, num_steps: int, path: str):
        self.device, self.start_step, self.num_steps, self.path = device, start_step, num_steps, path
        self._prof = None
        self._summary: dict = {}

    def before_step(self, step: int) -> None:
        if step == self.start_step and self._prof is None:
            acts = [torch.profiler.ProfilerActivity.CPU]
            if self.device.type == "cuda":
                acts.append(torch.profiler.ProfilerActivity.CUDA)
            self._prof = torch.profiler.profile(activities=acts)
            self._prof.__enter__()
        elif step == self.start_step + self.num_steps and self._prof is not None:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self._prof.__exit__(None, None, None)
            self._prof.export_chrome_trace(self.path)
            self._summary = device_gaps(self.path, self.num_steps)
            self._prof = None

    def result(self) -> dict:
        return self._summary


def device_gaps(trace_path: str, num_steps: int) -> dict:
    """Busy share and between-step idle gaps (ms) of a Chrome trace's device events."""
    import json

    with open(trace_path) as f:
        events = json.load(f).get("traceEvents", [])
    spans = sorted((e["ts"], e["ts"] + e.get("dur", 0)) for e in events
                   if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"))
    if not spans:
        return dict(trace=trace_path, num_device_events=0)
    merged = [list(spans[0])]
    for start, end in spans[1:]:
        if start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    gaps = sorted((b[0] - a[1] for a, b in zip(merged, merged[1:])), reverse=True)
    step_gaps = sorted(gaps[:max(0, num_steps - 1)])
    window = merged[-1][1] - merged[0][0]
    busy = sum(end - start for start, end in merged)
    return dict(trace=trace_path, num_device_events=len(spans), window_ms=window / 1e3,
                busy_share=busy / window if window else 0.0,
                step_gap_median_ms=float(np.median(step_gaps)) / 1e3 if step_gaps else 0.0,
                step_gap_max_ms=step_gaps[-1] / 1e3 if step_gaps else 0.0,
                step_gaps_ms=[round(g / 1e3, 4) for g in step_gaps])


_CALLS = {"ping", "initialize_cache", "determine_num_kv_blocks", "num_live_requests",
          "batch_digest", "nonfinite_steps", "score_prompt", "raise_error", "sleep",
          "num_warmup_steps", "warm_up", "num_compiled_graphs", "pid", "forget",
          "profile_steps", "profile_result", "set_grammar_vocab",
          "fail_next_step", "hang_next_step", "load_lora", "unload_lora", "lora_slots", "loaded_loras"}
