"""tp=1 in the engine's own process: no Ray, no copies. The baseline that the
compiled graph's control-plane cost is measured against."""

from __future__ import annotations

import gc
import sys

from dag.errors import RankFailure, TransportClosed
from dag.transport import Transport


class InProcTransport(Transport):
    name = "inproc"

    def __init__(self, worker_factory, config):
        self.worker = worker_factory(config, 0)
        self._closed = False

    def _run(self, data: bytes) -> bytes:
        if self._closed:
            raise TransportClosed("the in-process transport was shut down")
        try:
            return self.worker.execute_model(data)
        except Exception as e:
            raise RankFailure(str(e), [0], fatal=False) from None

    def step(self, data: bytes, expected_s: float = 0.0) -> bytes:
        return self._run(data)

    def call_all(self, data: bytes) -> list[bytes]:
        return [self._run(data)]

    def shutdown(self) -> None:
        self._closed = True
        self.worker = None
        # The rank lived in this process: hand its device memory back (a later engine or
        # another library in this process would otherwise find the GPU full).
        gc.collect()
        if "torch" in sys.modules and sys.modules["torch"].cuda.is_initialized():
            sys.modules["torch"].cuda.empty_cache()
