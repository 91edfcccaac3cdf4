"""Online serving: the frontend half of the engine. Per-request async streams over
an engine core that runs in its own process (``EngineCoreActor``).

Here: tokenization and validation (a bad request fails before it is sent),
incremental detokenization and stop strings (a stop aborts the sequence in the
core), and one collector per request. The core sends one message per step; a
receiver thread turns it into per-request deltas and hands them to each event
loop in one call, which merges them into the collectors in slices, yielding to
the loop between slices. A collector is a single slot: a consumer that is behind
finds the deltas merged, never a queue that grows.
"""

from __future__ import annotations

import asyncio
import collections
import copy
import logging
import threading
import time
import uuid
import weakref
from collections.abc import AsyncIterator

from serialization import AbortRequests, CoreStats, StepOutputs, StopSequences
from spmd.config import EngineConfig
from spmd.core_client import CoreClient, EngineDeadError
from spmd.engine import RequestFailedError
from spmd.input_processor import InputProcessor
from spmd.lora import LoRARequest
from spmd.output_processor import OutputProcessor, merge_delta
from spmd.outputs import RequestOutput
from spmd.pooling import EmbeddingRequestOutput, PoolingOutputs, PoolingParams
from spmd.sampling_params import SamplingParams
from spmd.tokenizer import TokenizerThreads
from workers.model_loader import config_json

logger = logging.getLogger(__name__)

__all__ = ["AsyncEngine", "EngineDeadError", "LoRANotFoundError"]

FAN_OUT_SLICE = 128  # collectors woken per event-loop callback


class LoRANotFoundError(LookupError):
    """No LoRA adapter of that name (or id) is loaded."""


class RequestCollector:
    """One request's pending output: deltas merged until the consumer takes them.
    Owned by its event loop (every method runs there)."""

    __slots__ = ("loop", "inbox", "pending", "error", "event")

    def __init__(self, loop: asyncio.AbstractEventLoop, inbox: LoopInbox | None = None):
        self.loop = loop
        self.inbox = inbox or LoopInbox(loop)
        self.pending: RequestOutput | None = None
        self.error: BaseException | None = None
        self.event = asyncio.Event()

    def put(self, out: RequestOutput) -> None:
        self.pending = merge_delta(self.pending, out)
        self.event.set()

    def fail(self, err: BaseException) -> None:
        self.error = err
        self.event.set()

    async def get(self) -> RequestOutput:
        while self.pending is None and self.error is None:
            await self.event.wait()
            self.event.clear()
        if self.pending is not None:  # outputs that made it before a failure come first
            out, self.pending = self.pending, None
            return out
        raise self.error


class AsyncEngine:
    """``async for out in engine.generate(prompt, params): ...`` (cumulative outputs, or
    deltas with ``delta=True``); the engine core runs in its own process."""

    def __init__(self, config: EngineConfig | None = None, **kwargs):
        config = config or EngineConfig.from_kwargs(**kwargs)
        self.inputs = InputProcessor(config, clamp_max_tokens=False)
        self.config = config.with_task(self.inputs.info.task)
        self.outputs = OutputProcessor(self.inputs.tokenizer, stream=True)
        pooler = self.inputs.info.pooler
        self.pooling = PoolingOutputs(pooler) if pooler is not None else None
        self._tokenizers = (TokenizerThreads(self.inputs.tokenizer)
                            if pooler is not None and self.inputs.tokenizer is not None else None)
        self._pool_waiters: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Future]] = {}
        # Guards the output processor and the collectors between the receiver thread and
        # the event loop(s); held for one step's bookkeeping, never for a step.
        self._lock = threading.Lock()
        self._collectors: dict[str, RequestCollector] = {}
        self._dead: str | None = None
        self._closing = False
        self.num_core_restarts = 0
        self._restarter: threading.Thread | None = None
        # LoRA adapters registered with the core, by name; a rebuilt core gets them all again.
        self._loras: dict[str, LoRARequest] = {}
        self._lora_lock = threading.Lock()
        self._next_lora_id = 1
        self._inboxes: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # loop -> LoopInbox
        self._inbox_lock = threading.Lock()
        self.inputs.prepare_grammar_vocab()  # while the core starts: not on a first request
        self.client = self._start_client()

    def _start_client(self) -> CoreClient:
        client: CoreClient | None = None

        def on_step(msg):
            if getattr(self, "client", None) is client:
                self._on_step(msg)

        def on_dead(reason):
            self._on_dead(client, reason)

        client = CoreClient(self.config, on_step, on_dead,
                            hf_config=config_json(self.inputs.info.hf_config))
        return client

    def _inbox(self) -> LoopInbox:
        """The running loop's inbox (one per loop, so its outputs keep their order)."""
        loop = asyncio.get_running_loop()
        with self._inbox_lock:
            inbox = self._inboxes.get(loop)
            if inbox is None:
                inbox = self._inboxes[loop] = LoopInbox(loop)
        return inbox

    @property
    def tokenizer(self):
        return self.inputs.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.inputs.max_model_len

    @property
    def core_pid(self) -> int:
        return self.client.pid

    @property
    def task(self) -> str:
        """``generate`` or ``embed``."""
        return self.config.task

    @property
    def embedding_dim(self) -> int:
        """The embeddings' size (the largest ``dimensions``); 0 unless ``task="embed"``."""
        return self.pooling.info.hidden_size if self.pooling is not None else 0

    @property
    def is_matryoshka(self) -> bool:
        """Whether ``dimensions`` may shorten this model's embeddings."""
        return self.pooling is not None and self.pooling.info.is_matryoshka

    # ---- requests -----------------------------------------------------------------

    async def generate(self, prompt, params: SamplingParams | None = None,
                       request_id: str | None = None, *, delta: bool = False,
                       lora_request: LoRARequest | None = None) -> AsyncIterator[RequestOutput]:
        """Yields outputs as tokens arrive (each cumulative, or only what is new with
        ``delta=True``); the last one has ``finished``. Leaving early (the client
        gone) aborts the request. Bad input raises ``ValueError`` before anything is
        queued. ``lora_request``: run on that adapter (registered first if it is not)."""
        request_id = request_id or uuid.uuid4().hex
        params = params or SamplingParams()
        self._check_alive()
        if lora_request is not None and self._loras.get(lora_request.lora_name) != lora_request:
            await self.add_lora(lora_request)
        text, prompt_ids, request = self.inputs.process(request_id, prompt, params,
                                                        lora_request=lora_request)
        collector = RequestCollector(asyncio.get_running_loop(), self._inbox())
        with self._lock:
            self.outputs.add(request_id, text, prompt_ids, params, request.arrival_time)
            self._collectors[request_id] = collector
        finished = False
        client = self.client
        try:
            if request.guided is not None and not client.grammar_vocab_sent:
                # Ahead of the request on the same ordered socket: the ranks have it first.
                vocab = await asyncio.get_running_loop().run_in_executor(
                    None, self.inputs.grammar_vocab)  # 0.6 s, once: off the event loop
                if not client.grammar_vocab_sent:
                    client.grammar_vocab_sent = True
                    client.call("call_all", "set_grammar_vocab", vocab)
            client.send(request)
            total: RequestOutput | None = None
            while not finished:
                out = await collector.get()
                finished = out.finished
                if delta:
                    yield out
                else:
                    total = merge_delta(total, out)
                    yield _snapshot(total)
        finally:
            with self._lock:
                self._collectors.pop(request_id, None)
                running = self.outputs.abort(request_id)
            if running and client is self.client and self._dead is None:
                try:
                    client.send(AbortRequests([request_id]))
                except EngineDeadError:
                    pass

    async def embed(self, prompt, pooling_params: PoolingParams | None = None,
                    request_id: str | None = None) -> EmbeddingRequestOutput:
        """The prompt's embedding (``task="embed"`` engines). Bad input raises ``ValueError``
        before anything is queued; cancelling the call aborts the request."""
        request_id = request_id or uuid.uuid4().hex
        self._check_alive()
        params = pooling_params or PoolingParams()
        if isinstance(prompt, str) and self._tokenizers is not None:
            prompt = (await self.pretokenize([prompt], [params]))[0]
        text, prompt_ids, request = self.inputs.process_pooling(request_id, prompt, params)
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._lock:
            if request_id in self._pool_waiters:
                raise ValueError(f"request_id: {request_id!r} is already running")
            self.pooling.add(request_id, text, prompt_ids, params, request.arrival_time)
            self._pool_waiters[request_id] = (loop, future)
        client = self.client
        try:
            client.send(request)
            return await future
        finally:
            with self._lock:
                self._pool_waiters.pop(request_id, None)
                pending = self.pooling.abort(request_id)
            if pending and client is self.client and self._dead is None:
                try:
                    client.send(AbortRequests([request_id]))
                except EngineDeadError:
                    pass

    async def pretokenize(self, prompts: list, params: list[PoolingParams]) -> list:
        """``InputProcessor.pretokenize`` in the engine's tokenizer threads, off the event
        loop (embedding engines)."""
        if self._tokenizers is None:
            return self.inputs.pretokenize(prompts, params)
        return await self._tokenizers.run(
            lambda tok: self.inputs.pretokenize(prompts, params, tokenizer=tok))

    def _check_alive(self) -> None:
        if self._dead is not None:
            state = "rebuilding after a failure" if self._restarting() else "stopped"
            raise EngineDeadError(f"engine is {state}: {self._dead}")

    def _restarting(self) -> bool:
        return self._restarter is not None and self._restarter.is_alive()

    async def abort(self, request_id: str) -> None:
        with self._lock:
            collector = self._collectors.pop(request_id, None)
            running = self.outputs.abort(request_id)
        if running and self._dead is None:
            try:
                self.client.send(AbortRequests([request_id]))
            except EngineDeadError:  # the core is gone: nothing left to abort
                pass
        if collector is not None:
            collector.fail(asyncio.CancelledError(f"request {request_id} aborted"))

    # ---- LoRA adapters ----------------------------------------------------------------

    def list_loras(self) -> list[LoRARequest]:
        """The adapters registered with the core."""
        return list(self._loras.values())

    def next_lora_id(self) -> int:
        """An adapter id that no adapter of this engine had (ids are never reused)."""
        with self._lora_lock:
            self._next_lora_id += 1
            return self._next_lora_id - 1

    async def add_lora(self, lora: LoRARequest) -> None:
        """Registers ``lora`` with the core, which validates its files (``ValueError``
        naming what is wrong, a name or id already taken among them; nothing changes
        then). Adding it again is a no-op."""
        if self._loras.get(lora.lora_name) == lora:
            return
        self._check_alive()
        await self._call_core("add_lora", lora.lora_name, lora.lora_int_id, lora.lora_path)
        with self._lora_lock:
            self._loras[lora.lora_name] = lora
            self._next_lora_id = max(self._next_lora_id, lora.lora_int_id + 1)

    async def remove_lora(self, lora: str | int) -> LoRARequest:
        """Unregisters the adapter of that name (or id) and returns it:
        ``LoRANotFoundError`` if none is loaded, ``LoRAInUseError`` while unfinished
        requests use it."""
        found = next((x for x in self.list_loras() if lora in (x.lora_name, x.lora_int_id)), None)
        if found is None:
            raise LoRANotFoundError(f"no LoRA adapter {lora!r} is loaded")
        self._check_alive()
        await self._call_core("remove_lora", found.lora_int_id)  # False: the core had none
        with self._lora_lock:
            if self._loras.get(found.lora_name) == found:
                del self._loras[found.lora_name]
        return found

    async def _call_core(self, method: str, *args):
        return await asyncio.wrap_future(self.client.call(method, *args))

    def _readd_loras(self, client: CoreClient) -> None:
        """Registers every adapter with a rebuilt core, before it serves. One that fails
        now (its files changed) is dropped; a dead core raises."""
        for lora in self.list_loras():
            future = client.call("add_lora", lora.lora_name, lora.lora_int_id, lora.lora_path)
            try:
                future.result(timeout=self.config.parallel.start_timeout_s)
            except ValueError as err:
                logger.error("LoRA adapter %r could not be added to the rebuilt engine core "
                             "(%s): it is unloaded", lora.lora_name, err)
                with self._lora_lock:
                    self._loras.pop(lora.lora_name, None)

    # ---- health, stats, rank-state calls ----------------------------------------------

    def check_health(self, *, rebuilding_ok: bool = False) -> None:
        """Raises ``EngineDeadError`` (a plain ``RuntimeError``) if the core is dead,
        silent or being rebuilt; answers from the last heartbeat, without waiting for a
        step. ``rebuilding_ok``: a core being rebuilt passes (Serve's replica check: the
        replica repairs itself; replacing it would only start over)."""
        if rebuilding_ok and self._restarting():
            return
        self._check_alive()
        self.client.check_health()

    def stats(self) -> dict:
        """The core's counters as of its last message (a heartbeat is at most
        ``core_heartbeat_interval_s`` old), and the frontend's own."""
        return dict(_stats_dict(self.client.stats), num_core_restarts=self.num_core_restarts,
                    healthy=self._dead is None)

    async def fresh_stats(self) -> dict:
        """The core's counters read between steps, now."""
        values = await asyncio.wrap_future(self.client.call("stats"))
        return _stats_dict(CoreStats(**values))

    async def call_all(self, method: str, *args) -> list:
        """A rank-state call broadcast to every rank (between two steps)."""
        return await asyncio.wrap_future(self.client.call("call_all", method, *args))

    def num_unfinished_requests(self) -> int:
        return len(self.outputs) + (len(self.pooling) if self.pooling is not None else 0)

    # ---- from the receiver thread ----------------------------------------------------

    def _on_step(self, msg: StepOutputs) -> None:
        if msg.pooled or (self._pool_waiters and msg.errors):
            self._on_pooled(msg)
            if not msg.outputs and not msg.errors:
                return
        by_inbox: dict[LoopInbox, list] = {}
        with self._lock:
            results, stops = self.outputs.process(msg.outputs) if msg.outputs else ([], [])
            step = msg.stats.num_steps if msg.stats is not None else None
            for out in results:
                out.metrics["step"] = step  # the core's step count when it was produced
                collector = self._collectors.get(out.request_id)
                if collector is not None:
                    by_inbox.setdefault(collector.inbox, []).append((collector, out))
            for err in msg.errors:
                collector = self._collectors.pop(err.request_id, None)
                self.outputs.abort(err.request_id)
                if collector is not None:
                    exc = (ValueError(err.message) if err.status == 400
                           else RequestFailedError(err.message, [err.request_id]))
                    by_inbox.setdefault(collector.inbox, []).append((collector, exc))
        if stops:
            ids, indices = zip(*stops)
            try:
                self.client.send(StopSequences(list(ids), list(indices)))
            except EngineDeadError:
                pass
        for inbox, items in by_inbox.items():
            inbox.push(items)

    def _on_pooled(self, msg: StepOutputs) -> None:
        """Hands each finished embedding (or its error) to the call awaiting it."""
        done = []
        with self._lock:
            for out in self.pooling.process(msg.pooled) if msg.pooled else ():
                waiter = self._pool_waiters.pop(out.request_id, None)
                if waiter is not None:
                    done.append((waiter, out))
            for err in msg.errors:
                waiter = self._pool_waiters.pop(err.request_id, None)
                if waiter is not None:
                    self.pooling.abort(err.request_id)
                    done.append((waiter, ValueError(err.message) if err.status == 400
                                 else RequestFailedError(err.message, [err.request_id])))
        for (loop, future), result in done:
            try:
                loop.call_soon_threadsafe(_resolve, future, result)
            except RuntimeError:  # that loop is closed: its caller is gone
                pass

    def _on_dead(self, client: CoreClient, reason: str) -> None:
        """The core (or a rank under it) failed: every request in flight fails with
        ``EngineDeadError``; then, unless shutting down, the core is rebuilt."""
        if client is not getattr(self, "client", client):
            return
        self._dead = reason
        with self._lock:
            collectors = list(self._collectors.values())
            self._collectors.clear()
            self.outputs.clear()
            waiters = list(self._pool_waiters.values())
            self._pool_waiters.clear()
            if self.pooling is not None:
                self.pooling.clear()
        for loop, future in waiters:
            try:
                loop.call_soon_threadsafe(_resolve, future,
                                          EngineDeadError(f"engine is stopped: {reason}"))
            except RuntimeError:
                pass
        by_inbox: dict[LoopInbox, list] = {}
        for c in collectors:
            by_inbox.setdefault(c.inbox, []).append((c, EngineDeadError(f"engine is stopped: {reason}")))
        for inbox, items in by_inbox.items():
            inbox.push(items)
        if self._closing:
            return
        if self.num_core_restarts >= self.config.parallel.max_core_restarts:
            logger.error("engine core failed (%s); %d restarts used up (max_core_restarts): "
                         "the engine stays down", reason, self.num_core_restarts)
            return
        restarter = threading.Thread(target=self._restart, args=(client, reason),
                                     name="spmd-core-restart", daemon=True)
        restarter.start()
        self._restarter = restarter  # only once started: shutdown() may join it at any time

    def _restart(self, old: CoreClient, reason: str) -> None:
        """Rebuilds the engine core (its ranks and compiled graph) after a failure."""
        t0 = time.monotonic()
        self.num_core_restarts += 1
        logger.warning("engine core failed (%s); rebuilding it (restart %d of at most %d)",
                       reason, self.num_core_restarts, self.config.parallel.max_core_restarts)
        old.shutdown(timeout_s=5.0)
        for attempt in range(3):
            if self._closing:
                return
            client = None
            try:
                client = self._start_client()
                self._readd_loras(client)
            except Exception as e:
                logger.error("engine core restart attempt %d failed: %s", attempt + 1, e)
                if client is not None:
                    client.shutdown()
                time.sleep(2.0 * (attempt + 1))
                continue
            if self._closing:
                client.shutdown()
                return
            self.client = client
            self._dead = None
            logger.warning("engine core rebuilt in %.1f s (restart %d); serving again",
                           time.monotonic() - t0, self.num_core_restarts)
            return
        logger.error("engine core could not be rebuilt: the engine stays down")

    def shutdown(self) -> None:
        self._closing = True
        restarter = self._restarter
        if restarter is not None:
            restarter.join(timeout=self.config.parallel.start_timeout_s + 60)
        if self._tokenizers is not None:
            self._tokenizers.shutdown()
        self.client.shutdown()


def _resolve(future: asyncio.Future, result) -> None:
    if future.done():  # its caller was cancelled meanwhile
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)


class LoopInbox:
    """Outputs on their way from the receiver thread to one event loop's collectors, in
    arrival order. The loop wakes ``FAN_OUT_SLICE`` collectors per callback so that one
    big step does not hold it; the rest waits in this queue, ahead of any later step's.
    (Scheduling each step's remainder with ``call_soon`` put it behind the next step's
    callback: a request's final delta could be merged in before an older one, whose
    ``finished=False`` then hid it, and its stream waited forever.)"""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = weakref.ref(loop)  # the engine's map of inboxes is keyed weakly by loop
        self._items: collections.deque = collections.deque()
        self._lock = threading.Lock()
        self._scheduled = False

    def push(self, items: list) -> None:
        """From any thread: ``(collector, output or exception)`` pairs, in order."""
        with self._lock:
            self._items.extend(items)
            if self._scheduled:
                return
            self._scheduled = True
        loop = self._loop()
        try:
            if loop is None:
                raise RuntimeError("event loop gone")
            loop.call_soon_threadsafe(self._drain)
        except RuntimeError:  # that loop is closed: its consumers are gone
            with self._lock:
                self._items.clear()
                self._scheduled = False

    def _drain(self) -> None:
        with self._lock:
            batch = [self._items.popleft() for _ in range(min(FAN_OUT_SLICE, len(self._items)))]
            more = bool(self._items)
            self._scheduled = more
        for collector, item in batch:
            if isinstance(item, BaseException):
                collector.fail(item)
            else:
                collector.put(item)
        if more:
            asyncio.get_running_loop().call_soon(self._drain)


def _snapshot(out: RequestOutput) -> RequestOutput:
    """A copy the consumer may keep while the cumulative output grows."""
    snap = copy.copy(out)
    snap.outputs = [copy.copy(c) for c in out.outputs]
    for c in snap.outputs:
        c.token_ids = list(c.token_ids)
        if c.logprobs is not None:
            c.logprobs = list(c.logprobs)
    return snap


def _stats_dict(stats) -> dict:
    return dict(num_running=stats.num_running, num_waiting=stats.num_waiting,
                kv_usage=stats.kv_usage, num_kv_blocks=stats.num_kv_blocks,
                num_free_blocks=stats.num_free_blocks, num_steps=stats.num_steps,
                num_preemptions=stats.num_preemptions, step_running_s=stats.step_running_s,
                num_failed_steps=stats.num_failed_steps)
