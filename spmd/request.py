"""Engine-side state of one request: its tokens, status and KV block table."""

from __future__ import annotations

import enum
import time
from collections.abc import Iterable
from typing import Any


class RequestStatus(enum.Enum):
    WAITING = enum.auto()  # never scheduled: the ranks do not know it yet
    RUNNING = enum.auto()
    PREEMPTED = enum.auto()  # blocks freed; the ranks keep its tokens
    FINISHED_STOPPED = enum.auto()
    FINISHED_LENGTH = enum.auto()
    FINISHED_ABORTED = enum.auto()

    @property
    def is_finished(self) -> bool:
        return self in _FINISH_REASONS


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
}


class Request:
    """One request as the engine and scheduler see it.

    ``num_computed_tokens`` counts tokens whose KV is in ``block_ids`` once the steps
    scheduled so far have run (it advances when a step is scheduled); ``num_pending``
    counts tokens those steps sample that the engine has not seen yet (with steps
    overlapped, the ranks run ahead of the engine by one step);
    ``block_hashes[i]`` is the chained prefix-cache hash of full block ``i`` of
    ``all_token_ids`` (kept only when prefix caching is on).
    """

    __slots__ = (
        "request_id", "seq_id", "prompt_token_ids", "output_token_ids", "max_tokens",
        "stop_token_ids", "min_tokens", "sampling", "arrival_time", "status",
        "num_computed_tokens", "block_ids", "block_hashes", "num_cached_blocks",
        "num_cached_tokens", "num_preemptions", "_all_token_ids", "arrival_step", "lora_id",
        "lora_key", "num_pending", "guided",
    )

    def __init__(
        self,
        request_id: str,
        seq_id: int,
        prompt_token_ids: Iterable[int],
        max_tokens: int,
        stop_token_ids: Iterable[int] = (),
        min_tokens: int = 0,
        sampling: Any = None,
        arrival_time: float | None = None,
        lora_id: int = 0,
        lora_key: int = 0,
        guided: Any = None,
    ) -> None:
        self.request_id = request_id
        self.seq_id = seq_id
        self.prompt_token_ids: list[int] = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.max_tokens = max_tokens
        self.stop_token_ids: set[int] = set(stop_token_ids)
        self.min_tokens = min_tokens
        self.sampling = sampling
        self.arrival_time = time.time() if arrival_time is None else arrival_time
        self.status = RequestStatus.WAITING
        self.num_computed_tokens = 0
        self.block_ids: list[int] = []
        self.block_hashes: list[int] = []
        self.num_cached_blocks = 0  # leading blocks already registered in the prefix cache
        self.num_cached_tokens = 0  # prefix-cache hit at first schedule (usage reporting)
        self.num_preemptions = 0
        self.arrival_step = 0  # the engine's step count when it took the request
        self.guided = guided  # GuidedSpec: structured output, enforced by the ranks
        self._all_token_ids: list[int] = list(self.prompt_token_ids)
        self.lora_id = lora_id  # its adapter; 0: the base model
        self.lora_key = lora_key  # seeds its prefix-cache hashes, so adapters never share KV
        self.num_pending = 0  # sampled by steps in flight, not yet known here

    @property
    def num_tokens(self) -> int:
        return len(self._all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        """Prompt followed by outputs (the internal list: do not mutate)."""
        return self._all_token_ids

    @property
    def finish_reason(self) -> str | None:
        return _FINISH_REASONS.get(self.status)

    def append_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self._all_token_ids.append(token_id)

    def __repr__(self) -> str:
        return (f"Request({self.request_id!r}, seq_id={self.seq_id}, status={self.status.name}, "
                f"num_tokens={self.num_tokens}, num_computed_tokens={self.num_computed_tokens}, "
                f"num_blocks={len(self.block_ids)})")
