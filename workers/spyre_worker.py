"""The Spyre rank: static warm-up shapes, padded batches, a contiguous per-batch KV cache.

IBM Spyre runs only graphs compiled ahead of time (``torch.compile`` with its
``sendnn`` backend) and has no paged attention. At start-up the rank compiles a
prefill and a decode graph for each configured ``(prompt_len, max_new_tokens,
batch_size)`` and runs each once; serving then only ever feeds those shapes:
prompts are left-padded to ``prompt_len`` (pads masked out, positions counting
real tokens only) and missing batch rows are padding. Without the hardware the
same path runs on the CPU with the ``inductor`` or ``eager`` backend.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from serialization import ExecuteModelRequest, SamplerOutput, unpack_i32
from workers.attention import StaticAttentionMetadata
from workers.compilation import CountingBackend, allow_recompiles
from workers.cpu_worker import CPUMixin
from workers.input_batch import StepInputs
from workers.worker import Worker


@dataclass
class StaticBatch:
    """The batch being decoded: one shape, fixed rows, one cache slot per step."""

    shape_index: int
    seq_ids: list[int]  # per batch row; -1 for a padding row
    pads: np.ndarray  # [B] left padding of each row (prompt_len for padding rows)
    next_slot: int  # cache slot the next decode step writes
    live: set[int]  # seq ids not finished yet


def _static_forward(model, input_ids, positions, slots, mask, kv_caches):
    """``[B, T]`` padded tokens → logits ``[B, vocab]`` of each row's last position."""
    meta = StaticAttentionMetadata(slots=slots, mask=mask, max_seq_len=mask.shape[-1])
    batch, num_queries = input_ids.shape
    hidden = model(input_ids.reshape(-1), positions.reshape(-1), meta, kv_caches)
    return model.compute_logits(hidden.view(batch, num_queries, -1)[:, -1])


def attention_mask(pads: np.ndarray, slots: np.ndarray, cache_len: int) -> np.ndarray:
    """``[B, 1, T, L]``: query at slot ``slots[t]`` of row ``b`` sees the row's real
    (non-pad) slots up to its own, and always its own slot (pads too: no empty row)."""
    key = np.arange(cache_len)
    causal = key[None, None, :] <= slots[None, :, None]
    real = key[None, None, :] >= pads[:, None, None]
    return ((causal & real) | (key[None, None, :] == slots[None, :, None]))[:, None]


class SpyreMixin(CPUMixin):
    """Device part of a static-shape rank (host side on the CPU; gloo for TP)."""

    def init_device(self) -> None:
        cfg = self.config
        if not cfg.warmup_shapes:
            raise ValueError("warmup_shapes: device='spyre' needs at least one "
                             "(prompt_len, max_new_tokens, batch_size)")
        self.shapes = [tuple(s) for s in cfg.warmup_shapes]
        for prompt_len, max_new, _ in self.shapes:
            if prompt_len + max_new > cfg.max_model_len:
                raise ValueError(f"warmup_shapes: ({prompt_len}, {max_new}, ...) exceeds "
                                 f"max_model_len={cfg.max_model_len}")
        self.compile_counter = CountingBackend(cfg.compile_backend)
        self._forward = torch.compile(_static_forward, backend=self.compile_counter, dynamic=False)
        self.static_batch: StaticBatch | None = None
        self.static_caches: list[list[torch.Tensor]] = []
        super().init_device()

    def init_thread(self) -> None:
        super().init_thread()
        if hasattr(self, "shapes"):  # TorchDynamo's limits are per thread
            allow_recompiles(2 * len(self.shapes))

    # ---- cache and warm-up ------------------------------------------------------------

    def determine_num_kv_blocks(self) -> int:
        return 1  # no paging: each shape owns a contiguous cache

    def initialize_cache(self, num_blocks: int) -> int:
        model = self.model
        self.static_caches = [
            [torch.zeros((2, batch, prompt_len + max_new, model.num_kv_heads, model.head_dim),
                         dtype=self.dtype, device=self.device) for _ in range(model.num_layers)]
            for prompt_len, max_new, batch in self.shapes]
        return num_blocks

    def num_warmup_steps(self) -> int:
        return len(self.shapes)

    def warm_up(self, index: int) -> str:
        """Compiles and runs shape ``index``'s prefill and decode graphs once."""
        prompt_len, max_new, batch = self.shapes[index]
        pads = np.zeros(batch, dtype=np.int64)
        ids = np.zeros((batch, prompt_len), dtype=np.int64)
        positions = np.broadcast_to(np.arange(prompt_len), (batch, prompt_len))
        self._run(index, ids, positions, np.arange(prompt_len), pads)
        self._run(index, ids[:, :1], np.full((batch, 1), prompt_len), np.array([prompt_len]), pads)
        return f"prompt_len={prompt_len},max_new_tokens={max_new},batch_size={batch}"

    def num_compiled_graphs(self) -> int:
        return self.compile_counter.num_graphs

    @torch.inference_mode()
    def _run(self, shape_index: int, input_ids: np.ndarray, positions: np.ndarray,
             slots: np.ndarray, pads: np.ndarray) -> torch.Tensor:
        prompt_len, max_new, _ = self.shapes[shape_index]
        mask = attention_mask(pads, slots, prompt_len + max_new)
        return self._forward(self.model, torch.from_numpy(np.ascontiguousarray(input_ids, np.int64)),
                             torch.from_numpy(np.ascontiguousarray(positions, np.int64)),
                             torch.from_numpy(np.asarray(slots, np.int64)), torch.from_numpy(mask),
                             self.static_caches[shape_index])

    # ---- one step ---------------------------------------------------------------------

    def _step(self, msg: ExecuteModelRequest) -> SamplerOutput:
        t0 = time.perf_counter()
        self.batch.validate(msg)
        self._validate_static(msg)
        self.batch.apply(msg)
        self._apply_guided(msg)
        if self.static_batch is not None:
            self.static_batch.live -= set(unpack_i32(msg.finished_ids).tolist())
        if not msg.scheduled_seq_ids:
            return SamplerOutput(step_id=msg.step_id)
        seq_ids = unpack_i32(msg.scheduled_seq_ids).tolist()
        t_model = time.perf_counter()  # model time: the forward pass and sampling, as in Worker
        if msg.shape_index >= 0:
            logits = self._prefill(msg.shape_index, seq_ids)
        else:
            logits = self._decode()
        row_of = {s: b for b, s in enumerate(self.static_batch.seq_ids)}
        rows = np.array([self.batch.states[s].row for s in seq_ids], dtype=np.int64)
        empty = np.zeros(0, dtype=np.int64)
        inputs = StepInputs(rows=rows, input_ids=empty, positions=empty, slot_mapping=empty,
                            query_start_loc=empty, seq_lens=self.batch.num_tokens[rows].copy(),
                            block_tables=empty, sample_idx=np.arange(len(seq_ids)),
                            logits_indices=empty)
        logits = logits[torch.tensor([row_of[s] for s in seq_ids])].float()
        result = self._sample(logits, inputs)
        sampled = result.token_ids.numpy().astype(np.int32)
        self._commit(inputs, sampled)
        t1 = time.perf_counter()
        return self._output(msg.step_id, inputs, result, sampled, t1 - t_model, t1 - t0)

    def _prefill(self, shape_index: int, seq_ids: list[int]) -> torch.Tensor:
        """Starts a batch: prompts left-padded to the shape, padding rows after them."""
        prompt_len, _, batch = self.shapes[shape_index]
        ids = np.zeros((batch, prompt_len), dtype=np.int64)
        positions = np.zeros((batch, prompt_len), dtype=np.int64)
        pads = np.full(batch, prompt_len, dtype=np.int64)
        for b, seq_id in enumerate(seq_ids):
            tokens = self.batch.tokens_of(seq_id)
            pads[b] = prompt_len - len(tokens)
            ids[b, pads[b]:] = tokens
            positions[b, pads[b]:] = np.arange(len(tokens))  # positions skip the pads
        self.static_batch = StaticBatch(shape_index, seq_ids + [-1] * (batch - len(seq_ids)),
                                        pads, prompt_len, set(seq_ids))
        return self._run(shape_index, ids, positions, np.arange(prompt_len), pads)

    def _decode(self) -> torch.Tensor:
        """One token for every row (finished and padding rows compute too, unread)."""
        sb = self.static_batch
        batch = len(sb.seq_ids)
        ids = np.zeros((batch, 1), dtype=np.int64)
        positions = np.zeros((batch, 1), dtype=np.int64)
        for b, seq_id in enumerate(sb.seq_ids):
            if seq_id in sb.live:
                tokens = self.batch.tokens_of(seq_id)
                ids[b, 0] = tokens[-1]
                positions[b, 0] = len(tokens) - 1
        slot = sb.next_slot
        sb.next_slot += 1
        return self._run(sb.shape_index, ids, positions, np.array([slot]), sb.pads)

    def _validate_static(self, msg: ExecuteModelRequest) -> None:
        """A step that breaks the static-batch contract raises before anything changes."""
        seq_ids = unpack_i32(msg.scheduled_seq_ids).tolist()
        counts = unpack_i32(msg.num_scheduled_tokens).tolist()
        if msg.resumed or msg.block_updates or msg.preempted_ids:
            raise ValueError("resumed/block_updates/preempted_ids: static batching has no paging "
                             "or preemption")
        sb = self.static_batch
        live = (sb.live - set(unpack_i32(msg.finished_ids).tolist())) if sb else set()
        if msg.shape_index >= 0:
            if msg.shape_index >= len(self.shapes):
                raise ValueError(f"shape_index: {msg.shape_index} outside 0..{len(self.shapes) - 1}")
            prompt_len, _, batch = self.shapes[msg.shape_index]
            new = {r.seq_id: len(r.prompt_token_ids) // 4 for r in msg.new_requests}
            if live:
                raise ValueError(f"shape_index: a new batch while seq ids {sorted(live)} still decode")
            if sorted(new) != sorted(seq_ids) or [new[s] for s in seq_ids] != counts:
                raise ValueError("scheduled_seq_ids: a new batch runs exactly its new requests' "
                                 "whole prompts")
            if len(seq_ids) > batch or max(counts) > prompt_len:
                raise ValueError(f"new_requests: {len(seq_ids)} prompts of up to {max(counts)} "
                                 f"tokens exceed shape {self.shapes[msg.shape_index]}")
        elif seq_ids:
            prompt_len, max_new, _ = self.shapes[sb.shape_index] if sb else (0, 0, 0)
            if msg.new_requests or not set(seq_ids) <= live or set(counts) != {1}:
                raise ValueError("scheduled_seq_ids: a decode step runs one token of requests "
                                 "of the current batch")
            if sb.next_slot >= prompt_len + max_new:
                raise ValueError(f"scheduled_seq_ids: the batch has used all {max_new} "
                                 "new-token slots of its shape")


class SpyreWorker(SpyreMixin, Worker):
    """A static-shape rank for IBM Spyre (or its CPU stand-in)."""
