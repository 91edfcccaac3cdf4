"""Online serving: per-request async streams over the same ``Engine.step()``.

One background thread owns the step loop; requests enter and leave under a lock
taken off the event loop, and outputs cross back with ``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import threading
import uuid
from collections.abc import AsyncIterator

from spmd.config import EngineConfig
from spmd.engine import Engine
from spmd.outputs import RequestOutput
from spmd.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine stopped (a rank failed, or shutdown); no more requests are served."""


class AsyncEngine:
    def __init__(self, config: EngineConfig | None = None, **kwargs):
        self.engine = Engine(config or EngineConfig.from_kwargs(**kwargs))
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._dead: BaseException | None = None
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="spmd-engine-loop", daemon=True)
        self._thread.start()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    async def generate(self, prompt, params: SamplingParams | None = None,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Yields cumulative outputs as tokens arrive; the last one has ``finished``.
        Cancelling the consumer (client gone) aborts the request."""
        request_id = request_id or uuid.uuid4().hex
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        if self._dead is not None:
            raise EngineDeadError(f"engine is stopped: {self._dead}")
        self._streams[request_id] = (loop, queue)
        try:
            await loop.run_in_executor(None, self._add, request_id, prompt, params)
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    return
        finally:
            if self._streams.pop(request_id, None) is not None:
                await loop.run_in_executor(None, self._abort, request_id)

    async def abort(self, request_id: str) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self._abort, request_id)
        entry = self._streams.pop(request_id, None)
        if entry is not None:
            entry[1].put_nowait(asyncio.CancelledError(f"request {request_id} aborted"))

    async def call_all(self, method: str, *args) -> list:
        loop = asyncio.get_running_loop()

        def call():
            with self._lock:
                return self.engine.call_all(method, *args)

        return await loop.run_in_executor(None, call)

    def stats(self) -> dict:
        sched = self.engine.scheduler
        return dict(num_running=sched.num_running, num_waiting=sched.num_waiting,
                    kv_usage=sched.kv_usage, num_kv_blocks=self.engine.num_kv_blocks,
                    num_free_blocks=sched.block_pool.num_free_blocks)

    def _add(self, request_id, prompt, params) -> None:
        with self._lock:
            if self._dead is not None:
                raise EngineDeadError(f"engine is stopped: {self._dead}")
            self.engine.add_request(request_id, prompt, params)
        self._wake.set()

    def _abort(self, request_id: str) -> None:
        with self._lock:
            self.engine.abort_request(request_id)
        self._wake.set()

    def _loop(self) -> None:
        while not self._stopping:
            with self._lock:
                busy = self.engine.has_unfinished_requests() or self.engine.scheduler.has_pending_frees()
                if busy:
                    try:
                        outputs = self.engine.step()
                    except BaseException as e:  # a rank failed: every open stream learns why
                        self._fail(e)
                        return
                    for out in outputs:
                        self._deliver(out)
            if not busy:
                with self._lock:
                    self.engine.park()
                self._wake.wait(timeout=0.5)
                self._wake.clear()

    def _deliver(self, out: RequestOutput) -> None:
        entry = self._streams.get(out.request_id)
        if entry is None:
            return
        snapshot = copy.copy(out)
        snapshot.outputs = [copy.copy(c) for c in out.outputs]
        for c in snapshot.outputs:
            c.token_ids = list(c.token_ids)
            if c.logprobs is not None:
                c.logprobs = list(c.logprobs)
        loop, queue = entry
        loop.call_soon_threadsafe(queue.put_nowait, snapshot)

    def _fail(self, err: BaseException) -> None:
        self._dead = err
        logger.error("engine loop stopped: %s", err)
        for loop, queue in list(self._streams.values()):
            loop.call_soon_threadsafe(queue.put_nowait, EngineDeadError(str(err)))

    def shutdown(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=30)
        self.engine.shutdown()
