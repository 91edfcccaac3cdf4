"""The engine core: schedules, encodes each step's delta, pushes it to every rank
at once and turns rank 0's sampled tokens into one ``StepOutputs`` message. It
holds no model and no tokenizer: text lives in the frontend.

With ``async_scheduling`` (the default) two steps are in flight: the core schedules,
encodes and sends step n+1 before it waits for step n, and applies step n's tokens while
the ranks run n+1. The ranks append the tokens they sample, so step n+1 needs nothing of
step n's output; what it could not know (a stop token, a stop string) costs one dropped
token and reaches the ranks in the next delta.

With ``overlap_rank_steps`` (CUDA's default) the ranks do the same one level down: a rank
launches step n+1 before it reads back step n, so each step call answers with the output
of the call before it. The core reads step n's output from the answer to the next call it
sent, or sends a flush (a call that launches nothing) when it sent none."""

from __future__ import annotations

import collections
import itertools
import logging
import os
import random
import time

import msgspec
import numpy as np
from tqdm.auto import tqdm

import ray

from dag import Transport, make_transport
from dag.errors import RankFailure
from serialization import (
    CoreStats,
    EncodeBatch,
    EngineCoreRequest,
    ExecuteModelRequest,
    PooledOutput,
    PoolerOutput,
    PoolingRequest,
    RankCall,
    RequestError,
    SamplerOutput,
    SeqDelta,
    StepOutputs,
    TokenLogprobs,
    decode_output,
    decode_pooler_output,
    decode_reply,
    encode,
    pack_i32,
)
from spmd.config import EngineConfig
from spmd.input_processor import ModelInfo
from spmd.lora import LoRAInUseError, LoRARegistry
from spmd.pooling_scheduler import EncodeSchedule, PoolingSeq, PrefillOnlyScheduler
from spmd.request import Request, RequestStatus
from spmd.scheduler import Scheduler
from spmd.static_scheduler import StaticBatchScheduler
from spmd.step_encoder import to_message
from workers import worker_class
from workers.model_loader import config_json

logger = logging.getLogger(__name__)


class EngineCore:
    """Requests in (already tokenized and validated), ``StepOutputs`` out."""

    def __init__(self, config: EngineConfig, info: ModelInfo | None = None):
        self.info = info or ModelInfo(config)
        self.config = config = config.with_task(self.info.task)
        self.task = config.task
        self.hf_config = self.info.hf_config
        self.max_model_len = self.info.max_model_len
        # The ranks build their shards from the config read here: none imports transformers.
        self.rank_config = msgspec.structs.replace(config.rank_config(self.max_model_len),
                                                   hf_config=config_json(self.hf_config))
        if self.task == "embed":
            self.rank_config = msgspec.structs.replace(self.rank_config,
                                                       pooling=self.info.pooler.pooling)
        # Static shapes batch differently (a batch runs to its end): no overlap there.
        self.async_scheduling = (self.task == "generate" and config.scheduler.async_scheduling
                                 and not config.device.warmup_shapes)
        overlap = config.scheduler.overlap_rank_steps
        self.overlap_rank_steps = self.async_scheduling and (
            config.device.device == "cuda" if overlap is None else overlap)
        self.rank_config = msgspec.structs.replace(self.rank_config,
                                                   overlap_steps=self.overlap_rank_steps)
        if config.parallel.backend != "inproc":
            ensure_ray(config)
        self.transport: Transport = make_transport(
            config.parallel.backend, worker_class(config.device.device), self.rank_config,
            num_cpus_per_rank=config.parallel.num_cpus_per_rank,
            placement_strategy=config.parallel.placement_strategy,
            step_timeout_s=config.parallel.step_timeout_s,
            start_timeout_s=config.parallel.start_timeout_s,
            # The next step is sent while the ranks run this one.
            max_inflight=2 if self.task == "embed" or self.async_scheduling else 1)
        self._inflight: collections.deque = collections.deque()  # steps sent, not fetched
        # Overlapped rank steps: handles of the calls sent (steps and flushes) whose answer
        # is not read yet; each call answers with the output of the call before it.
        self._unread: collections.deque = collections.deque()
        self._fetched: list[StepOutputs] = []  # fetched early (a call between steps)
        self._last_done = 0.0
        try:
            self.num_kv_blocks = 0
            if self.task == "generate":  # prefill-only models keep no KV cache
                self.num_kv_blocks = min(self.call_all("determine_num_kv_blocks"))
                self.call_all("initialize_cache", self.num_kv_blocks)
            self.warmup_times_s = self._warm_up()
        except BaseException:
            self.transport.shutdown()
            raise
        if self.task == "embed":
            self.scheduler = PrefillOnlyScheduler(
                max_num_seqs=config.scheduler.max_num_seqs,
                max_num_batched_tokens=config.max_num_batched_tokens,
                max_model_len=self.max_model_len)
        elif config.device.warmup_shapes:
            self.scheduler = StaticBatchScheduler(warmup_shapes=config.device.warmup_shapes,
                                                  max_model_len=self.max_model_len)
        else:
            self.scheduler = Scheduler(
                num_blocks=self.num_kv_blocks, block_size=config.cache.block_size,
                max_num_seqs=config.scheduler.max_num_seqs,
                max_num_batched_tokens=config.max_num_batched_tokens,
                max_model_len=self.max_model_len,
                enable_prefix_caching=config.cache.enable_prefix_caching,
                max_loras=config.lora.max_loras if config.lora.enable_lora else 0,
                kv_watermark=config.scheduler.kv_watermark,
                kv_reserve=config.scheduler.kv_reserve)
        self.loras: LoRARegistry | None = None
        if config.lora.enable_lora:
            self.loras = LoRARegistry(
                max_loras=config.lora.max_loras, max_lora_rank=config.lora.max_lora_rank,
                max_cpu_loras=config.lora.num_cpu_loras, hf_config=self.hf_config,
                call_all=self.call_all)
        self._rng = random.Random(config.model.seed)
        self._requests: dict[str, list[Request]] = {}  # request id -> its n sequences
        self._owner: dict[int, tuple[str, int]] = {}  # seq id -> (request id, index)
        self._next_seq_id = 0
        self.last_step_stats: dict = {}
        self.stats_total = dict(steps=0, preemptions=0, prompt_tokens=0, generation_tokens=0,
                                failed_steps=0)
        self._closed = False
        self._fatal: str | None = None  # set by a fatal rank failure: no more steps

    # ---- requests -----------------------------------------------------------------

    def add_request(self, req: EngineCoreRequest) -> None:
        """Queues the request's sequences (``ValueError`` if the scheduler cannot take it)."""
        if req.request_id in self._requests:
            raise ValueError(f"request_id: {req.request_id!r} is already running")
        lora_key = 0
        if req.lora_id:
            if self.loras is None:
                raise ValueError("lora_request: LoRA is not enabled (start the engine with "
                                 "enable_lora=True)")
            if req.lora_id not in self.loras:
                raise ValueError(f"lora_request: adapter {req.lora_id} is not loaded")
            lora_key = self.loras.prefix_key(req.lora_id)
        children = []
        for i in range(req.n):
            seed = req.seed + i if req.seed is not None else self._rng.getrandbits(63)
            children.append(Request(
                req.request_id if req.n == 1 else f"{req.request_id}#{i}", self._new_seq_id(),
                req.prompt_token_ids, req.max_tokens, req.stop_token_ids, req.min_tokens,
                sampling=_with_seed(req.sampling, seed), arrival_time=req.arrival_time,
                lora_id=req.lora_id, lora_key=lora_key, guided=req.guided))
        self._requests[req.request_id] = children
        for i, child in enumerate(children):
            self._owner[child.seq_id] = (req.request_id, i)
            child.arrival_step = self.stats_total["steps"]
        try:
            for child in children:
                self.scheduler.add_request(child)
        except BaseException:  # e.g. static batching: fits no warm-up shape
            self.abort_request(req.request_id)
            raise

    def add_pooling_request(self, req: PoolingRequest) -> None:
        """Queues a prompt of a prefill-only model (``ValueError`` if it cannot run)."""
        if self.task != "embed":
            raise ValueError("task: this engine generates text; start it with task='embed'")
        if req.request_id in self.scheduler.running or req.request_id in self._requests:
            raise ValueError(f"request_id: {req.request_id!r} is already running")
        self.scheduler.add_request(PoolingSeq(req.request_id, self._new_seq_id(),
                                              req.prompt_token_ids, req.arrival_time))

    def abort_request(self, request_id: str) -> None:
        if self.task == "embed":
            self.scheduler.abort_request(request_id)
            return
        for child in self._requests.pop(request_id, ()):
            self._owner.pop(child.seq_id, None)
            self.scheduler.abort_request(child.request_id)

    def stop_sequence(self, request_id: str, index: int) -> None:
        """A stop string ended sequence ``index`` (the frontend detokenizes, so it knows)."""
        children = self._requests.get(request_id)
        if children is None or index >= len(children):
            return
        self.scheduler.finish_request(children[index].request_id, RequestStatus.FINISHED_STOPPED)
        self._forget_if_done(request_id, children)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    # ---- LoRA adapters (between steps) -------------------------------------------------

    def add_lora(self, name: str, lora_id: int, path: str) -> bool:
        """Registers an adapter after checking it against the model (``ValueError``
        naming the module, the limit or the file; no rank changes then). False if it
        was registered already, identically."""
        if self.loras is None:
            raise ValueError("enable_lora: LoRA is not enabled (start the engine with "
                             "enable_lora=True)")
        return self.loras.add(name, lora_id, path)

    def remove_lora(self, lora_id: int) -> bool:
        """Unloads an adapter from every rank; False if unknown. ``LoRAInUseError`` while
        unfinished requests use it."""
        if self.loras is None or lora_id not in self.loras:
            return False
        users = sum(1 for r in self.scheduler.requests.values() if r.lora_id == lora_id)
        if users:
            raise LoRAInUseError(f"lora adapter {self.loras.adapters[lora_id].name!r} is in use "
                                 f"by {users} unfinished request(s); retry when they finish")
        return self.loras.remove(lora_id)

    def list_loras(self) -> list[list]:
        """``[[name, lora_int_id, path], ...]`` of the registered adapters."""
        return self.loras.list() if self.loras is not None else []

    def has_work(self) -> bool:
        """Requests to run, or finished ones whose ranks still hold them."""
        return (self.scheduler.has_unfinished_requests() or self.scheduler.has_pending_frees()
                or bool(self._inflight) or bool(self._fetched))

    # ---- the step -----------------------------------------------------------------

    def step(self) -> StepOutputs | None:
        """Schedules and runs steps on all ranks; returns the oldest step's new tokens of
        every sequence that advanced (one step behind the ranks with ``async_scheduling``).
        None when there was nothing to run."""
        if self._fatal is not None:
            raise RuntimeError(f"the engine stopped after a fatal failure ({self._fatal}); "
                               "start a new one")
        if self._fetched:
            return self._fetched.pop(0)
        # Prefill-only batches keep nothing on the ranks: two always fly.
        submit = self._submit_encode if self.task == "embed" else self._submit_step
        depth = 2 if self.task == "embed" or self.async_scheduling else 1
        while len(self._inflight) < depth:
            sent = submit()
            if sent is None:
                break
            if isinstance(sent, StepOutputs):  # it could not be sent: it failed here
                self._fetched.append(sent)
                return self._fetched.pop(0)
        if not self._inflight:
            return None
        return self._fetch()

    def _submit_step(self) -> "_Flight | StepOutputs | None":
        """Schedules, encodes and sends one step; None when there is nothing to send."""
        t0 = time.perf_counter()
        sched = self.scheduler.schedule()
        if not sched.scheduled and not sched.finished_ids and not sched.preempted_ids:
            return None
        lora_slots = []
        try:
            # Only an admission (or a failed step's unmade fills) can need a slot filled.
            if self.loras is not None and (self.loras.unfilled or any(
                    r.lora_id for r in itertools.chain(sched.new_requests, sched.resumed))):
                lora_slots = self.loras.assign_slots(r.lora_id for r in self.scheduler.running)
        except Exception as e:  # an adapter's files changed since add_lora checked them
            return self._fail_steps([_Flight(sched, t0)],
                                    f"an adapter could not be loaded: {type(e).__name__}: {e}")
        flight = _Flight(sched, t0, lora_slots)
        try:
            data = encode(to_message(sched, lora_slots))
        except Exception as e:  # a value the wire format cannot carry (validation missed it)
            return self._fail_steps([flight], "the step could not be encoded: "
                                    f"{type(e).__name__}: {e}")
        return self._send(flight, data, lambda e: self._fail_steps([flight], str(e)))

    def _submit_encode(self) -> "_Flight | StepOutputs | None":
        """Schedules and sends one prefill-only batch; None when nothing waits."""
        t0 = time.perf_counter()
        sched = self.scheduler.schedule()
        if sched is None:
            return None
        data = encode(EncodeBatch(
            sched.step_id, pack_i32([s.seq_id for s in sched.seqs]),
            pack_i32([len(s.prompt_token_ids) for s in sched.seqs]),
            pack_i32(list(itertools.chain.from_iterable(s.prompt_token_ids for s in sched.seqs)))))
        flight = _Flight(sched, t0)
        return self._send(flight, data, lambda e: self._fail_encode(sched, str(e)))

    def _send(self, flight: _Flight, data: bytes, fail) -> "_Flight | StepOutputs":
        """Submits an encoded step; a step the transport refused fails through ``fail``."""
        flight.num_bytes = len(data)
        flight.t_sent = time.perf_counter()
        try:
            flight.handle = self.transport.submit(data)
        except RankFailure as e:
            self._stop_if_fatal(e)
            return fail(e)
        self._inflight.append(flight)
        if self.overlap_rank_steps:
            self._unread.append(flight.handle)
        return flight

    def _stop_if_fatal(self, e: RankFailure) -> None:
        """A dead or hung rank, or a broken transport: the engine stops (re-raises)."""
        if e.fatal:
            self._fatal = str(e).splitlines()[0]
            raise e

    def _fetch(self) -> StepOutputs:
        """Waits for the oldest step in flight and applies its output."""
        flight = self._inflight.popleft()
        # It started when it was sent or when the one before it ended.
        started = max(flight.t_sent, self._last_done)
        try:
            if self.overlap_rank_steps:
                out = self._output_of(flight.sched.step_id)
            else:
                data = self.transport.fetch(flight.handle)
                out = decode_pooler_output(data) if self.task == "embed" else decode_output(data)
        except RankFailure as e:
            self._stop_if_fatal(e)
            self._last_done = time.perf_counter()
            if self.task == "embed":  # the ranks keep nothing of a batch
                return self._fail_encode(flight.sched, str(e))
            # The steps sent after it ran on what the failure left of the ranks' state.
            flights = [flight, *self._inflight]
            self._inflight.clear()
            if self.overlap_rank_steps:
                handles = list(self._unread)
            else:
                handles = [f.handle for f in flights[1:]]
            self._unread.clear()
            for handle in handles:
                try:
                    self.transport.fetch(handle)
                except RankFailure as later:
                    self._stop_if_fatal(later)
            return self._fail_steps(flights, str(e))
        self._last_done = time.perf_counter()
        if self.task == "embed":
            return self._apply_encode(flight, out, started)
        return self._apply_step(flight, out, started)

    def _output_of(self, step_id: int) -> SamplerOutput:
        """Overlapped rank steps: a call's answer is the output of the call before it, so
        step ``step_id``'s output comes with the next call sent, or, if none was, with a
        flush (a call that launches nothing). Answers before it are empty (``step_id`` -1:
        the call before was a flush or none)."""
        while True:
            if not self._unread:
                self._unread.append(self.transport.submit(_FLUSH))
            out = decode_output(self.transport.fetch(self._unread.popleft()))
            if out.step_id == step_id:
                return out
            assert out.step_id < 0, f"step {out.step_id} answered while waiting for {step_id}"

    def _apply_step(self, flight: _Flight, out: SamplerOutput, started: float) -> StepOutputs:
        """A generation step's tokens into the scheduler and the output deltas."""
        sched = flight.sched
        t_back = self._last_done
        seq_ids = np.frombuffer(out.seq_ids, dtype="<i4").tolist()
        tokens = np.frombuffer(out.token_ids, dtype="<i4").tolist()
        updated = self.scheduler.update_from_output(sched, dict(zip(seq_ids, tokens)))
        deltas = self._deltas(updated, out)
        t1 = time.perf_counter()
        totals = self.stats_total
        totals["steps"] += 1
        totals["preemptions"] += len(sched.preempted_ids)
        totals["generation_tokens"] += len(updated)
        totals["prompt_tokens"] += sched.total_num_scheduled_tokens - len(seq_ids)
        self.last_step_stats = dict(
            num_tokens=sched.total_num_scheduled_tokens, num_seqs=len(sched.scheduled),
            message_bytes=flight.num_bytes, schedule_encode_s=flight.t_sent - flight.t0,
            round_trip_s=t_back - started, rank_time_s=out.rank_time_s,
            model_time_s=out.model_time_s, process_s=t1 - t_back, idle_s=out.idle_s,
            done_at=t_back)
        return StepOutputs(step_id=sched.step_id, outputs=deltas, timestamp=time.time())

    # ---- the prefill-only step (embeddings) ------------------------------------------

    def _apply_encode(self, flight: _Flight, out: PoolerOutput, started: float) -> StepOutputs:
        """A batch's pooled rows to the requests still waiting for them."""
        sched, t_back = flight.sched, self._last_done
        wanted = {s.seq_id: s for s in self.scheduler.finish(sched)}
        rows = np.frombuffer(out.embeddings, dtype="<f4").reshape(-1, out.hidden_size or 1)
        pooled = [PooledOutput(wanted[seq_id].request_id, rows[i].tobytes(),
                               len(wanted[seq_id].prompt_token_ids))
                  for i, seq_id in enumerate(np.frombuffer(out.seq_ids, dtype="<i4").tolist())
                  if seq_id in wanted]
        totals = self.stats_total
        totals["steps"] += 1
        totals["prompt_tokens"] += sched.num_tokens
        self.last_step_stats = dict(
            num_tokens=sched.num_tokens, num_seqs=len(sched.seqs), message_bytes=flight.num_bytes,
            schedule_encode_s=flight.t_sent - flight.t0, round_trip_s=t_back - started,
            rank_time_s=out.rank_time_s, model_time_s=out.model_time_s,
            process_s=time.perf_counter() - t_back)
        return StepOutputs(step_id=sched.step_id, pooled=pooled, timestamp=time.time())

    def _fail_encode(self, sched: EncodeSchedule, detail: str) -> StepOutputs:
        """A batch that raised on the ranks fails its requests, and only those (the ranks
        keep nothing of it); the engine goes on."""
        failed = [s.request_id for s in self.scheduler.finish(sched)]
        logger.error("step %d failed; stopping its %d request(s) %s: %s", sched.step_id,
                     len(failed), failed[:8], detail)
        self.stats_total["failed_steps"] += 1
        message = ("internal error: the step running this request failed on the engine's "
                   "ranks; the request was stopped (details are in the server log)")
        return StepOutputs(step_id=sched.step_id,
                           errors=[RequestError(r, message, 500) for r in failed],
                           timestamp=time.time())

    def _fail_steps(self, flights: list[_Flight], detail: str) -> StepOutputs:
        """A step that raised on the ranks (or could not be sent) fails the requests it
        ran, and only those (with the steps sent after it, which ran on what it left):
        every rank forgets those steps' sequences, the scheduler frees their blocks, each
        gets a ``RequestError``, and the engine goes on."""
        failed, step_seqs, preempted = [], [], []
        for flight in flights:
            if self.loras is not None:
                self.loras.forget_fills(flight.lora_slots)  # the ranks may not have made them
            failed += self.scheduler.fail_step(flight.sched)
            step_seqs += [seq_id for seq_id, _ in flight.sched.scheduled]
            step_seqs += flight.sched.finished_ids
            preempted += flight.sched.preempted_ids
        parents = list(dict.fromkeys(self._owner[r.seq_id][0] for r in failed
                                     if r.seq_id in self._owner))
        step_id = flights[0].sched.step_id
        logger.error("step %d failed; stopping its %d request(s) %s: %s", step_id,
                     len(parents), parents[:8], detail)
        self.call_all("forget", step_seqs, preempted)
        for parent in parents:  # its other sequences end too (announced at the next step)
            self.abort_request(parent)
        self.stats_total["failed_steps"] += 1  # the steps sent after it count with it
        message = ("internal error: the step running this request failed on the engine's "
                   "ranks; the request was stopped (details are in the server log)")
        return StepOutputs(step_id=step_id, outputs=[],
                           errors=[RequestError(p, message, 500) for p in parents],
                           timestamp=time.time())

    def _deltas(self, updated: list[Request], out: SamplerOutput) -> list[SeqDelta]:
        logprobs = _logprobs_by_seq(out) if out.logprob_seq_ids else {}
        deltas = []
        finished = []
        for req in updated:
            parent, index = self._owner[req.seq_id]
            finish = req.finish_reason
            token = req.output_token_ids[-1]
            lp = logprobs.get(req.seq_id)
            deltas.append(SeqDelta(
                parent, index, [token], finish,
                token if finish == "stop" and token in req.stop_token_ids else None,
                req.num_cached_tokens, None if lp is None else [lp],
                req.arrival_step if len(req.output_token_ids) == 1 else -1))
            if finish is not None:
                finished.append(parent)
        for parent in finished:
            self._forget_if_done(parent, self._requests.get(parent))
        return deltas

    def _forget_if_done(self, request_id: str, children: list[Request] | None) -> None:
        if children is not None and all(c.status.is_finished for c in children):
            self._requests.pop(request_id, None)
            for c in children:
                self._owner.pop(c.seq_id, None)

    def stats(self) -> CoreStats:
        sched = self.scheduler
        return CoreStats(num_running=sched.num_running, num_waiting=sched.num_waiting,
                         kv_usage=sched.kv_usage, num_kv_blocks=self.num_kv_blocks,
                         num_free_blocks=getattr(getattr(sched, "block_pool", None),
                                                 "num_free_blocks", 0),
                         num_steps=self.stats_total["steps"],
                         num_preemptions=self.stats_total["preemptions"],
                         num_failed_steps=self.stats_total["failed_steps"])

    def _warm_up(self) -> dict[str, float]:
        """Runs every rank's warm-up units (compiled shapes) before serving, so that
        nothing compiles while serving; returns each unit's wall time."""
        times: dict[str, float] = {}
        num_steps = self.call_all("num_warmup_steps")[0]
        for index in tqdm(range(num_steps), desc="Warming up shapes", unit="shape",
                          disable=num_steps == 0):
            t0 = time.perf_counter()
            label = self.call_all("warm_up", index)[0]
            times[label] = time.perf_counter() - t0
            logger.info("warm-up %s: %.1f s", label, times[label])
        return times

    def dead_ranks(self) -> list[int]:
        """Ranks whose actor is gone (asked through each rank's control thread, so it
        answers during a step too); [] for the in-process rank."""
        group = getattr(self.transport, "group", None)
        if group is None or not group.actors:
            return []
        return group.stuck_ranks(timeout_s=5.0)[1]

    def park(self) -> None:
        """Nothing to run: the ranks sleep (instead of spinning on their channel)
        until the next step or call. Steps still in flight finish first; their outputs
        come with the next ``step``."""
        self._drain()
        self.transport.park()

    # ---- rank-state calls (broadcast to every rank) -----------------------------------

    def _drain(self) -> None:
        """Fetches every step in flight, keeping their outputs for ``step``."""
        while self._inflight:
            self._fetched.append(self._fetch())

    def call_all(self, method: str, *args) -> list:
        self._drain()  # a call follows the steps already sent
        replies = self.transport.call_all(encode(RankCall(method, list(args))))
        return [decode_reply(r).value for r in replies]

    def shutdown(self) -> None:
        if not self._closed:
            self._closed = True
            try:
                if self._fatal is None:  # let the ranks finish them
                    self._drain()
            except Exception as e:
                logger.debug("steps in flight at shutdown: %s", e)
            self.transport.shutdown()

    def _new_seq_id(self) -> int:
        self._next_seq_id = (self._next_seq_id + 1) % (2**31 - 1)
        return self._next_seq_id


_FLUSH = encode(ExecuteModelRequest(step_id=-1))  # collects the ranks' last step, runs nothing


class _Flight:
    """A step sent to the ranks (or failed before it could be): its schedule, the
    transport's handle, and its timings."""

    __slots__ = ("sched", "handle", "lora_slots", "t0", "t_sent", "num_bytes")

    def __init__(self, sched, t0: float, lora_slots=()):
        self.sched = sched
        self.lora_slots = lora_slots
        self.t0 = self.t_sent = t0
        self.handle = None
        self.num_bytes = 0


def _with_seed(sampling, seed: int):
    return msgspec.structs.replace(sampling, seed=seed)


def _logprobs_by_seq(out: SamplerOutput) -> dict[int, TokenLogprobs]:
    seq_ids = np.frombuffer(out.logprob_seq_ids, dtype="<i4").tolist()
    sampled = np.frombuffer(out.sampled_logprobs, dtype="<f4").tolist()
    k = out.num_top
    top_ids = np.frombuffer(out.top_ids, dtype="<i4").reshape(-1, k).tolist() if k else None
    top_lps = np.frombuffer(out.top_logprobs, dtype="<f4").reshape(-1, k).tolist() if k else None
    return {s: TokenLogprobs(sampled[row], top_ids[row] if k else [], top_lps[row] if k else [])
            for row, s in enumerate(seq_ids)}


def ensure_ray(config: EngineConfig) -> None:
    """Attaches to a running cluster (``ray start``, ``ray job submit``) when there
    is one, else starts a local one sized for the ranks."""
    if ray.is_initialized():
        return
    address = config.parallel.ray_address
    if address is None and (os.environ.get("RAY_ADDRESS") or _local_cluster_running()):
        address = "auto"
    kwargs = dict(include_dashboard=False, log_to_driver=True, configure_logging=True,
                  logging_level=logging.WARNING)
    if address:
        ray.init(address=address, **kwargs)
    else:
        need = config.parallel.tensor_parallel_size * config.parallel.num_cpus_per_rank + 1
        ray.init(num_cpus=max(os.cpu_count() or 1, int(need + 0.999)), **kwargs)


def _local_cluster_running() -> bool:
    try:
        from ray._private.services import find_gcs_addresses

        return bool(find_gcs_addresses())
    except Exception:
        return False
