"""Continuous batching over paged KV blocks, with chunked prefill, prefix caching
and preemption by recompute (the vLLM V1 policy, in one small class).

Each step gives every running request, in order, the tokens it still needs
(a decode needs 1, an unfinished prefill the rest of its prompt) within the token
budget, then admits waiting requests first-come first-served, chunking a prompt
that does not fit. A running request that cannot get a KV block preempts the most
recently admitted one; a waiting request that cannot get its blocks waits. With LoRA,
at most ``max_loras`` distinct adapters run at once: a waiting request whose adapter
would be one too many is passed over (it keeps its place) until a slot frees up.

Admission keeps ``kv_watermark`` of the blocks free while others run, plus ``kv_reserve``
of the growth the running requests (and the newcomer) may still need to reach their
``max_tokens``: with ``kv_reserve=1`` what is admitted can always run to its end, so growth
never preempts; a request with nothing else running is admitted whenever it fits.

Steps may overlap (the engine schedules step n+1 while the ranks run step n): a step's
tokens count as computed as soon as it is scheduled, and a step that samples leaves a
*pending* token the engine learns when the step's output arrives. The ranks append that
token themselves, so step n+1 runs it without knowing it. A request whose pending tokens
reach its ``max_tokens`` (or ``max_model_len``) is not scheduled again; one that stops on
a token (EOS, a stop string) was already scheduled once more, and that step's token is
dropped. Blocks enter the prefix cache only when the step that wrote them has returned.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from spmd.block_pool import NO_PARENT_HASH, BlockPool, hash_block_tokens
from spmd.request import Request, RequestStatus


@dataclass
class SchedulerOutput:
    """One step's decisions: what the engine encodes into an ``ExecuteModelRequest``."""

    step_id: int
    scheduled: list[tuple[int, int]]  # (seq_id, num_scheduled_tokens) in step order
    new_requests: list[Request]  # first time scheduled: prompt, block_ids, num_computed_tokens
    block_updates: list[tuple[int, list[int]]]  # (seq_id, newly appended block ids)
    resumed: list[Request]  # scheduled again after preemption: whole block_ids, num_computed_tokens
    finished_ids: list[int]  # seq_ids finished or aborted since the last step
    preempted_ids: list[int]  # preempted in this step
    total_num_scheduled_tokens: int
    scheduled_requests: list[Request] = field(default_factory=list, repr=False)  # parallel to scheduled
    starts: list[int] = field(default_factory=list, repr=False)  # num_computed_tokens before, parallel
    shape_index: int = -1  # static batching: the warm-up shape a new batch runs in

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class RequestQueues:
    """Request bookkeeping shared by the schedulers: ``requests`` by id, the ``waiting``
    queue, the ``running`` list, and the seq ids finished since the last step. A subclass
    holds ``max_model_len``."""

    max_model_len: int
    requests: dict[str, Request]
    waiting: deque[Request]
    running: list[Request]
    _finished_ids: list[int]

    def abort_request(self, request_id: str) -> None:
        self.finish_request(request_id, RequestStatus.FINISHED_ABORTED)

    def finish_request(self, request_id: str, status: RequestStatus) -> None:
        """Finishes a request outside a step (abort, stop string); unknown ids are ignored."""
        assert status.is_finished
        req = self.requests.get(request_id)
        if req is None:
            return
        if req.status is RequestStatus.RUNNING:
            self.running.remove(req)
        else:
            self.waiting.remove(req)
        self._free_request(req, status)

    def fail_step(self, out: SchedulerOutput) -> list[Request]:
        """A step that failed on the ranks (or could not be sent): its scheduled requests
        end, their blocks are freed here, and they are not announced as finished (the
        engine tells the ranks to forget every sequence of that step). Returns them."""
        self._awaiting_update = False
        step_seqs = {seq_id for seq_id, _ in out.scheduled}
        self._finished_ids = [s for s in self._finished_ids if s not in step_seqs]
        failed = []
        for req in out.scheduled_requests:
            if req.status is RequestStatus.RUNNING:
                self.running.remove(req)
            elif req.status is RequestStatus.PREEMPTED:  # since: its pending token is lost
                self.waiting.remove(req)
            else:
                continue
            self._release(req)
            req.status = RequestStatus.FINISHED_ABORTED
            del self.requests[req.request_id]
            failed.append(req)
        return failed

    def _release(self, req: Request) -> None:
        """Frees what the scheduler holds for ``req`` (KV blocks); nothing by default."""

    def get_request(self, request_id: str) -> Request | None:
        return self.requests.get(request_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def has_pending_frees(self) -> bool:
        """Finished requests the ranks still hold (sent with the next step)."""
        return bool(self._finished_ids)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def _free_request(self, req: Request, status: RequestStatus) -> None:
        """Releases a request that is in neither queue any more."""
        if req.status is not RequestStatus.WAITING:  # the ranks know it
            self._finished_ids.append(req.seq_id)
        req.status = status
        del self.requests[req.request_id]

    def _check_stop(self, req: Request, token_id: int) -> RequestStatus | None:
        num_output = len(req.output_token_ids)
        if token_id in req.stop_token_ids and num_output >= req.min_tokens:
            return RequestStatus.FINISHED_STOPPED
        if num_output >= req.max_tokens or req.num_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None


class Scheduler(RequestQueues):
    def __init__(
        self,
        *,
        num_blocks: int,
        block_size: int,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
        enable_prefix_caching: bool = True,
        long_prefill_token_threshold: int = 0,
        max_loras: int = 0,
        kv_watermark: float = 0.0,
        kv_reserve: float = 0.0,
    ) -> None:
        if num_blocks * block_size < max_model_len:
            raise ValueError(f"num_blocks * block_size = {num_blocks * block_size} KV slots cannot "
                             f"hold one request of max_model_len={max_model_len}")
        if max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise ValueError(f"max_num_seqs={max_num_seqs} and max_num_batched_tokens="
                             f"{max_num_batched_tokens} must be >= 1")
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.enable_prefix_caching = enable_prefix_caching
        self.long_prefill_token_threshold = long_prefill_token_threshold
        self.max_loras = max_loras
        self.watermark_blocks = int(kv_watermark * num_blocks)
        self.kv_reserve = kv_reserve
        self.block_pool = BlockPool(num_blocks, block_size, enable_prefix_caching)
        self.requests: dict[str, Request] = {}  # unfinished requests by request_id
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._finished_ids: list[int] = []  # known to the ranks, to free at the next step
        self._step_id = 0

    # ---- requests -------------------------------------------------------------------

    def add_request(self, req: Request) -> None:
        if req.request_id in self.requests:
            raise ValueError(f"request_id {req.request_id!r} is already in use")
        num_prompt = req.num_prompt_tokens
        if not 0 < num_prompt < self.max_model_len:
            raise ValueError(f"prompt length {num_prompt} must be in 1..max_model_len - 1 "
                             f"(max_model_len={self.max_model_len})")
        assert req.status is RequestStatus.WAITING and req.num_computed_tokens == 0
        req.max_tokens = min(req.max_tokens, self.max_model_len - num_prompt)
        self._hash_full_blocks(req)
        self.requests[req.request_id] = req
        self.waiting.append(req)

    @property
    def kv_usage(self) -> float:
        return self.block_pool.usage

    def reset_prefix_cache(self) -> None:
        self.block_pool.reset_prefix_cache()

    # ---- one step -------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        budget = self.max_num_batched_tokens
        scheduled: list[Request] = []
        num_scheduled: list[int] = []
        new_requests: list[Request] = []
        resumed: list[Request] = []
        block_updates: list[tuple[int, list[int]]] = []
        preempted_ids: list[int] = []

        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            if req.num_pending and self._ends_with_pending(req):
                i += 1  # its last token is in flight: it finishes when that arrives
                continue
            num_new = self._num_tokens_to_schedule(req, budget)
            while (new_block_ids := self._allocate_slots(req, num_new)) is None:
                victim = self.running.pop()
                self._preempt(victim)
                preempted_ids.append(victim.seq_id)
                if victim is req:
                    break
            if new_block_ids is None:
                break
            if new_block_ids:
                block_updates.append((req.seq_id, new_block_ids))
            scheduled.append(req)
            num_scheduled.append(num_new)
            budget -= num_new
            i += 1

        # Requests just preempted would not fit; admit nobody this step.
        active_loras = {r.lora_id for r in self.running if r.lora_id} if self.max_loras else set()
        passed_over: list[Request] = []  # adapters beyond max_loras: they keep their place
        running_growth = (sum(self._growth(r) for r in self.running)
                          if self.kv_reserve and not preempted_ids and self.waiting else 0)
        while (not preempted_ids and self.waiting and budget > 0
               and len(self.running) < self.max_num_seqs):
            req = self.waiting[0]
            if req.num_pending:  # preempted with a token in flight: resumes once it is known
                break
            if (req.lora_id and req.lora_id not in active_loras
                    and len(active_loras) >= self.max_loras):
                passed_over.append(self.waiting.popleft())
                continue
            num_new = self._admit(req, budget, running_growth)
            if num_new == 0:
                break
            if self.kv_reserve:
                running_growth += self._growth(req)
            self.waiting.popleft()
            if req.status is RequestStatus.WAITING:
                req.num_cached_tokens = req.num_computed_tokens
                new_requests.append(req)
            else:
                resumed.append(req)
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            if req.lora_id:
                active_loras.add(req.lora_id)
            scheduled.append(req)
            num_scheduled.append(num_new)
            budget -= num_new
        self.waiting.extendleft(reversed(passed_over))

        starts = []
        for req, num_new in zip(scheduled, num_scheduled):
            starts.append(req.num_computed_tokens)
            req.num_computed_tokens += num_new
            if req.num_computed_tokens == req.num_tokens + req.num_pending:
                req.num_pending += 1  # the step samples the next token

        finished_ids, self._finished_ids = self._finished_ids, []
        self._step_id += 1
        return SchedulerOutput(
            step_id=self._step_id,
            scheduled=[(req.seq_id, n) for req, n in zip(scheduled, num_scheduled)],
            new_requests=new_requests,
            block_updates=block_updates,
            resumed=resumed,
            finished_ids=finished_ids,
            preempted_ids=preempted_ids,
            total_num_scheduled_tokens=self.max_num_batched_tokens - budget,
            scheduled_requests=scheduled,
            starts=starts,
        )

    def update_from_output(self, out: SchedulerOutput, sampled: dict[int, int]) -> list[Request]:
        """Applies a step's results (steps arrive in the order they were scheduled):
        appends the sampled tokens, caches the blocks the step filled, finishes requests
        that stop. Returns the requests that got a token (finished ones included, with
        their status set). Tokens of requests that finished meanwhile are dropped."""
        updated: list[Request] = []
        any_finished = False
        for req, (seq_id, num_tokens), start in zip(out.scheduled_requests, out.scheduled,
                                                    out.starts):
            status = req.status
            if status.is_finished:
                continue  # aborted, stopped or failed since the step was scheduled
            token_id = sampled.get(seq_id)
            if token_id is None:  # a partial prefill chunk
                assert start + num_tokens < req.num_tokens, req
                if status is RequestStatus.RUNNING:
                    self._cache_full_blocks(req, start + num_tokens)
                continue
            req.num_pending -= 1
            req.append_token(token_id)
            self._hash_full_blocks(req)
            updated.append(req)
            if status is RequestStatus.RUNNING:
                self._cache_full_blocks(req, start + num_tokens)
            if (stop := self._check_stop(req, token_id)) is not None:
                if status is RequestStatus.RUNNING:
                    any_finished = True
                else:  # preempted after this step was scheduled: it waits to resume
                    self.waiting.remove(req)
                self._free_request(req, stop)
        if any_finished:
            self.running = [req for req in self.running if req.status is RequestStatus.RUNNING]
        return updated

    # ---- helpers --------------------------------------------------------------------

    def _ends_with_pending(self, req: Request) -> bool:
        """Its tokens in flight reach ``max_tokens`` or ``max_model_len``."""
        num_pending = req.num_pending
        return (len(req.output_token_ids) + num_pending >= req.max_tokens
                or req.num_tokens + num_pending >= self.max_model_len)

    def _num_tokens_to_schedule(self, req: Request, budget: int) -> int:
        num_new = min(req.num_tokens + req.num_pending - req.num_computed_tokens, budget)
        if 0 < self.long_prefill_token_threshold < num_new:
            num_new = self.long_prefill_token_threshold
        assert num_new > 0, req
        return num_new

    def _allocate_slots(self, req: Request, num_new_tokens: int) -> list[int] | None:
        """Grows the block table to cover ``num_new_tokens`` more tokens; None if out of blocks."""
        num_needed = -(-(req.num_computed_tokens + num_new_tokens) // self.block_size)
        num_missing = num_needed - len(req.block_ids)
        if num_missing <= 0:
            return []
        if num_missing > self.block_pool.num_free_blocks:
            return None
        new_block_ids = self.block_pool.allocate(num_missing)
        req.block_ids.extend(new_block_ids)
        return new_block_ids

    def _admit(self, req: Request, budget: int, running_growth: int = 0) -> int:
        """Gives a waiting request its prefix-cache hits and blocks for its first
        chunk; returns the chunk's length, or 0 if its blocks do not fit or would leave
        less free than the watermark and the reserve (``running_growth``: the blocks the
        running requests may still need)."""
        assert not req.block_ids and req.num_computed_tokens == 0
        # Leave at least one token to compute, so that the step samples.
        max_hit_blocks = (req.num_tokens - 1) // self.block_size
        hit_block_ids = self.block_pool.find_cached_blocks(req.block_hashes[:max_hit_blocks])
        num_computed = len(hit_block_ids) * self.block_size
        num_new = min(req.num_tokens - num_computed, budget)
        if 0 < self.long_prefill_token_threshold < num_new:
            num_new = self.long_prefill_token_threshold
        num_missing = -(-(num_computed + num_new) // self.block_size) - len(hit_block_ids)
        pool = self.block_pool
        held = 0  # alone, a request is admitted whenever it fits: nothing to wait for
        if self.running:
            growth = running_growth + self._growth(req, num_computed + num_new)
            held = self.watermark_blocks + math.ceil(self.kv_reserve * growth)
        if num_missing + pool.num_unreferenced(hit_block_ids) + held > pool.num_free_blocks:
            return 0
        pool.touch(hit_block_ids)  # before allocate, which could otherwise evict them
        req.block_ids = hit_block_ids + pool.allocate(num_missing)
        req.num_computed_tokens = num_computed
        req.num_cached_blocks = len(hit_block_ids)
        return num_new

    def _growth(self, req: Request, num_tokens: int | None = None) -> int:
        """Blocks ``req`` may still need beyond those covering ``num_tokens`` tokens (default:
        its block table): to its prompt plus ``max_tokens``, within ``max_model_len``."""
        final = min(req.num_prompt_tokens + req.max_tokens, self.max_model_len)
        have = len(req.block_ids) if num_tokens is None else -(-num_tokens // self.block_size)
        return max(0, -(-final // self.block_size) - have)

    def _preempt(self, req: Request) -> None:
        self.block_pool.free(req.block_ids)
        req.block_ids = []
        req.num_computed_tokens = 0
        req.num_cached_blocks = 0
        req.num_preemptions += 1
        req.status = RequestStatus.PREEMPTED
        self.waiting.appendleft(req)

    def _free_request(self, req: Request, status: RequestStatus) -> None:
        self._release(req)
        super()._free_request(req, status)

    def _release(self, req: Request) -> None:
        self.block_pool.free(req.block_ids)
        req.block_ids = []

    def _hash_full_blocks(self, req: Request) -> None:
        """Extends ``req.block_hashes`` over blocks its tokens newly fill."""
        if not self.enable_prefix_caching:
            return
        hashes, size, tokens = req.block_hashes, self.block_size, req.all_token_ids
        for i in range(len(hashes), req.num_tokens // size):
            parent = hashes[-1] if hashes else (req.lora_key if req.lora_id else NO_PARENT_HASH)
            hashes.append(hash_block_tokens(parent, tokens[i * size:(i + 1) * size]))

    def _cache_full_blocks(self, req: Request, num_computed: int) -> None:
        """Registers the blocks that the first ``num_computed`` tokens (whose KV a step
        that returned wrote) fill, in the prefix cache."""
        num_full = num_computed // self.block_size
        if num_full > req.num_cached_blocks and self.enable_prefix_caching:
            for i in range(req.num_cached_blocks, num_full):
                self.block_pool.cache_block(req.block_ids[i], req.block_hashes[i])
            req.num_cached_blocks = num_full
