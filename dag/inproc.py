"""tp=1 in the engine's own process: no Ray, no copies. The baseline that the
compiled graph's control-plane cost is measured against. With two steps in flight the
rank runs in a thread of its own (every call goes through it, in order), so that the
engine schedules the next step while this one runs."""

from __future__ import annotations

import gc
import sys
from concurrent.futures import Future, ThreadPoolExecutor

from dag.errors import RankFailure, TransportClosed
from dag.transport import Transport


class InProcTransport(Transport):
    name = "inproc"

    def __init__(self, worker_factory, config, max_inflight: int = 1):
        self._thread = (ThreadPoolExecutor(1, thread_name_prefix="spmd-inproc-rank")
                        if max_inflight > 1 else None)
        self._closed = False
        self.worker = None
        try:
            self.worker = self._in_thread(worker_factory, config, 0).result()
        except BaseException:
            self.shutdown()
            raise

    def _in_thread(self, fn, *args) -> Future:
        if self._thread is not None:
            return self._thread.submit(fn, *args)
        done: Future = Future()
        try:
            done.set_result(fn(*args))
        except BaseException as e:
            done.set_exception(e)
        return done

    def _run(self, data: bytes) -> bytes:
        if self._closed:
            raise TransportClosed("the in-process transport was shut down")
        try:
            return self.worker.execute_model(data)
        except Exception as e:
            raise RankFailure(str(e), [0], fatal=False) from None

    def submit(self, data: bytes) -> Future:
        if self._closed:
            raise TransportClosed("the in-process transport was shut down")
        return self._in_thread(self._run, data)

    def fetch(self, handle: Future) -> bytes:
        return handle.result()

    def step(self, data: bytes) -> bytes:
        return self.submit(data).result()

    def call_all(self, data: bytes) -> list[bytes]:
        return [self.step(data)]

    def shutdown(self) -> None:
        self._closed = True
        if self._thread is not None:
            self._thread.shutdown(wait=True)
        self.worker = None
        # The rank lived in this process: hand its device memory back (a later engine or
        # another library in this process would otherwise find the GPU full).
        gc.collect()
        if "torch" in sys.modules and sys.modules["torch"].cuda.is_initialized():
            sys.modules["torch"].cuda.empty_cache()
