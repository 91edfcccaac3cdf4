"""Static batching over warm-up shapes (Spyre mode): the scheduler for devices that
run only shapes compiled ahead of time and have no paged KV cache.

A batch starts when nothing is decoding: the scheduler picks, among the shapes
that fit the oldest waiting request, the one that takes the most waiting requests
(first come, first served, those that fit it), the smallest such shape on a tie.
The batch's whole prompts run in one prefill step; then every live request of the
batch decodes one token per step until all have finished. No new prefill starts
while a batch decodes. A request that fits no shape is rejected when it arrives.
Same interface as ``Scheduler``.
"""

from __future__ import annotations

from collections import deque

from spmd.request import Request, RequestStatus
from spmd.scheduler import RequestQueues, SchedulerOutput

Shape = tuple[int, int, int]  # (prompt_len, max_new_tokens, batch_size)


class StaticBatchScheduler(RequestQueues):
    def __init__(self, *, warmup_shapes: list[Shape] | tuple[Shape, ...], max_model_len: int) -> None:
        if not warmup_shapes:
            raise ValueError("warmup_shapes: static batching needs at least one shape")
        # Indexes are the ranks' too: RankConfig.warmup_shapes holds the same list.
        self.shapes = [tuple(s) for s in warmup_shapes]
        self.max_model_len = max_model_len
        self.requests: dict[str, Request] = {}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # live requests of the batch being decoded
        self.shape_index = -1  # the running batch's shape
        self._finished_ids: list[int] = []
        self._step_id = 0
        self._awaiting_update = False

    # ---- requests -------------------------------------------------------------------

    def add_request(self, req: Request) -> None:
        if req.request_id in self.requests:
            raise ValueError(f"request_id {req.request_id!r} is already in use")
        assert req.status is RequestStatus.WAITING and req.num_computed_tokens == 0
        req.max_tokens = min(req.max_tokens, self.max_model_len - req.num_prompt_tokens)
        if not any(self._fits(req, shape) for shape in self.shapes):
            raise ValueError(
                f"prompt, max_tokens: a prompt of {req.num_prompt_tokens} tokens with max_tokens="
                f"{req.max_tokens} fits no warm-up shape; shapes (prompt_len, max_new_tokens, "
                f"batch_size): {self.shapes}")
        self.requests[req.request_id] = req
        self.waiting.append(req)

    @property
    def kv_usage(self) -> float:
        """Rows of the running batch's shape in use."""
        return len(self.running) / self.shapes[self.shape_index][2] if self.running else 0.0

    def reset_prefix_cache(self) -> None:
        pass  # no prefix cache: each batch owns its contiguous cache

    # ---- one step -------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        assert not self._awaiting_update, "schedule() called before update_from_output()"
        new_requests: list[Request] = []
        if self.running:
            scheduled, counts, shape_index = list(self.running), [1] * len(self.running), -1
        elif self.waiting:
            shape_index, batch = self._pick_batch()
            for req in batch:
                self.waiting.remove(req)
                req.status = RequestStatus.RUNNING
            self.running, self.shape_index = list(batch), shape_index
            scheduled, counts, new_requests = list(batch), [r.num_tokens for r in batch], list(batch)
        else:
            scheduled, counts, shape_index = [], [], -1
        finished_ids, self._finished_ids = self._finished_ids, []
        self._step_id += 1
        self._awaiting_update = bool(scheduled)
        return SchedulerOutput(
            step_id=self._step_id,
            scheduled=[(req.seq_id, n) for req, n in zip(scheduled, counts)],
            new_requests=new_requests, block_updates=[], resumed=[], finished_ids=finished_ids,
            preempted_ids=[], total_num_scheduled_tokens=sum(counts), scheduled_requests=scheduled,
            shape_index=shape_index)

    def update_from_output(self, out: SchedulerOutput, sampled: dict[int, int]) -> list[Request]:
        """Appends each scheduled request's token (every step samples: whole prompts,
        then decodes) and finishes those that stop."""
        assert self._awaiting_update or out.is_empty
        self._awaiting_update = False
        updated: list[Request] = []
        for req, (seq_id, num_tokens) in zip(out.scheduled_requests, out.scheduled):
            if req.status is not RequestStatus.RUNNING:
                continue  # aborted or finished by a stop string during the step
            req.num_computed_tokens += num_tokens
            token_id = sampled[seq_id]
            req.append_token(token_id)
            updated.append(req)
            if (status := self._check_stop(req, token_id)) is not None:
                self.running.remove(req)
                self._free_request(req, status)
        return updated

    # ---- helpers --------------------------------------------------------------------

    @staticmethod
    def _fits(req: Request, shape: Shape) -> bool:
        prompt_len, max_new_tokens, _ = shape
        return req.num_prompt_tokens <= prompt_len and req.max_tokens <= max_new_tokens

    def _pick_batch(self) -> tuple[int, list[Request]]:
        head = self.waiting[0]
        best = None
        for index, shape in enumerate(self.shapes):
            if not self._fits(head, shape):
                continue
            batch = []
            for req in self.waiting:
                if self._fits(req, shape):
                    batch.append(req)
                    if len(batch) == shape[2]:
                        break
            prompt_len, max_new_tokens, batch_size = shape
            key = (-len(batch), batch_size * (prompt_len + max_new_tokens), index)
            if best is None or key < best[0]:
                best = (key, index, batch)
        assert best is not None, f"{head} fits no shape (add_request checks)"
        return best[1], best[2]

