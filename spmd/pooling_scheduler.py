"""The prefill-only scheduler (embeddings): whole prompts packed into a token budget.

No KV cache, no block tables, no preemption, no chunking: a prompt runs once, in one
step, and is done. A step takes waiting prompts in arrival order while they fit in
``max_num_batched_tokens`` and ``max_num_seqs``; a prompt longer than the budget (but
within ``max_model_len``) runs alone. Up to two steps are in flight (the engine
prepares and sends the next while the ranks run the current one), so the scheduler
tracks which requests each step carries.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass


@dataclass
class PoolingSeq:
    request_id: str
    seq_id: int
    prompt_token_ids: list[int]
    arrival_time: float = 0.0


@dataclass
class EncodeSchedule:
    step_id: int
    seqs: list[PoolingSeq]

    @property
    def num_tokens(self) -> int:
        return sum(len(s.prompt_token_ids) for s in self.seqs)


class PrefillOnlyScheduler:
    def __init__(self, *, max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int):
        if max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise ValueError(f"max_num_seqs={max_num_seqs} and max_num_batched_tokens="
                             f"{max_num_batched_tokens} must be >= 1")
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.waiting: collections.deque[PoolingSeq] = collections.deque()
        self.running: dict[str, PoolingSeq] = {}  # sent to the ranks, result not back yet
        self._waiting_ids: set[str] = set()
        self._aborted: set[str] = set()  # waiting requests aborted (skipped when reached)
        self._step_id = 0

    def add_request(self, seq: PoolingSeq) -> None:
        n = len(seq.prompt_token_ids)
        if not 0 < n <= self.max_model_len:
            raise ValueError(f"prompt: {n} tokens; the limit is max_model_len={self.max_model_len}")
        self.waiting.append(seq)
        self._waiting_ids.add(seq.request_id)

    def abort_request(self, request_id: str) -> None:
        if self.running.pop(request_id, None) is None and request_id in self._waiting_ids:
            self._waiting_ids.discard(request_id)
            self._aborted.add(request_id)

    def schedule(self) -> EncodeSchedule | None:
        """The next step's prompts, or None when none wait."""
        seqs, budget = [], self.max_num_batched_tokens
        while self.waiting and len(seqs) < self.max_num_seqs:
            seq = self.waiting[0]
            if seq.request_id in self._aborted:
                self._aborted.discard(seq.request_id)
                self.waiting.popleft()
                continue
            n = len(seq.prompt_token_ids)
            if n > budget and seqs:
                break
            budget -= n
            seqs.append(self.waiting.popleft())
            self._waiting_ids.discard(seq.request_id)
        if not seqs:
            return None
        self._step_id += 1
        for seq in seqs:
            self.running[seq.request_id] = seq
        return EncodeSchedule(self._step_id, seqs)

    def finish(self, sched: EncodeSchedule) -> list[PoolingSeq]:
        """The step's results are back: the sequences still wanted (not aborted meanwhile)."""
        return [s for s in sched.seqs if self.running.pop(s.request_id, None) is not None]

    def has_unfinished_requests(self) -> bool:
        return bool(self.running) or bool(self._waiting_ids)

    def has_pending_frees(self) -> bool:
        return False

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting_ids)

    kv_usage = 0.0
