"""A rank without a model, for measuring the control plane alone.

``NullWorker`` runs the real rank bookkeeping of a step (decode the message,
validate and apply the delta to the persistent batch, prepare the step's
inputs, commit) and returns a real ``SamplerOutput``, but its "model" echoes
each sampling request's last input token. It also accepts ``FullStateStep``,
the message an engine without persistent rank state would send: every
request's whole token history and block table, every step.
"""

from __future__ import annotations

import time
import traceback

import msgspec
import numpy as np
import torch

from serialization import (
    ExecuteModelRequest,
    RankCall,
    RankConfig,
    RankReply,
    SamplerOutput,
    SamplingOptions,
    encode,
    pack_i32,
)
from workers.input_batch import InputBatch, StepInputs
from workers.sampler import SampleResult
from workers.worker import RankError, Worker


class FullRequestState(msgspec.Struct, frozen=True, array_like=True, gc=False):
    seq_id: int
    token_ids: bytes  # int32, prompt and every token sampled so far
    block_ids: bytes  # int32, the whole block table
    sampling: SamplingOptions


class FullStateStep(msgspec.Struct, frozen=True, array_like=True, gc=False, tag="full"):
    """A decode step that re-sends all state: each request computes its last token."""

    step_id: int
    requests: list[FullRequestState]


_decoder = msgspec.msgpack.Decoder(ExecuteModelRequest | RankCall | FullStateStep)


class NullWorker(Worker):
    """``Worker`` with the model, KV cache and distributed group left out."""

    device = torch.device("cpu")

    def __init__(self, config: RankConfig, tp_rank: int):
        # Worker.__init__ would load weights and join a process group: neither is wanted here.
        self.config = config
        self.tp_rank = tp_rank
        self.dtype = torch.float32
        self.model = None
        self.sampler = None
        self.kv_caches = []
        self.batch = InputBatch(config.max_model_len, config.block_size)
        self._full_tokens = np.zeros((0, config.max_model_len + 1), dtype=np.int32)
        torch.set_num_threads(1)

    def determine_num_kv_blocks(self) -> int:
        return 1 << 30

    def initialize_cache(self, num_blocks: int) -> int:
        return num_blocks

    def execute_model(self, data: bytes) -> bytes | None:
        try:
            msg = _decoder.decode(data)
            if isinstance(msg, RankCall):
                return encode(RankReply(self.tp_rank, self._call(msg)))
            out = self._full_step(msg) if isinstance(msg, FullStateStep) else self._step(msg)
            return encode(out) if self.tp_rank == 0 else None
        except Exception as e:
            raise RankError(f"rank {self.tp_rank}: {type(e).__name__}: {e}\n"
                            f"{traceback.format_exc()}") from None

    def _run_model(self, inputs: StepInputs) -> SampleResult:
        sampled = inputs.input_ids[inputs.logits_indices]
        return SampleResult(torch.from_numpy(sampled), None, None, None)

    def _full_step(self, msg: FullStateStep) -> SamplerOutput:
        """What a stateless rank does with full state: copy every history in and
        rebuild the step's inputs (positions, slots, block tables) from scratch."""
        t0 = time.perf_counter()
        n = len(msg.requests)
        if len(self._full_tokens) < n:
            self._full_tokens = np.zeros((n, self._full_tokens.shape[1]), dtype=np.int32)
        tokens = self._full_tokens
        num_tokens = np.empty(n, dtype=np.int64)
        tables = []
        for i, req in enumerate(msg.requests):
            history = np.frombuffer(req.token_ids, dtype="<i4")
            tokens[i, : len(history)] = history
            num_tokens[i] = len(history)
            tables.append(np.frombuffer(req.block_ids, dtype="<i4"))
        block_tables = np.zeros((n, max(len(t) for t in tables)), dtype=np.int32)
        for i, table in enumerate(tables):
            block_tables[i, : len(table)] = table
        positions = num_tokens - 1
        size = self.config.block_size
        rows = np.arange(n)
        input_ids = tokens[rows, positions]
        # the slots a forward pass would write (built to count the work; no model reads them)
        self.last_slot_mapping = (block_tables[rows, positions // size].astype(np.int64) * size
                                  + positions % size)
        seq_ids = pack_i32([req.seq_id for req in msg.requests])
        return SamplerOutput(step_id=msg.step_id, seq_ids=seq_ids, token_ids=input_ids.tobytes(),
                             rank_time_s=time.perf_counter() - t0)
