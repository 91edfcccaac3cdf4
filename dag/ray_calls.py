"""Plain Ray actor calls: the same interface, each step a fresh remote call per
rank (object store instead of shared-memory channels). For comparison."""

from __future__ import annotations

import ray

from dag.errors import RankFailure, TransportClosed
from dag.ranks import RankGroup, _cause
from dag.transport import Transport


class RayCallTransport(Transport):
    name = "ray"

    def __init__(self, group: RankGroup, *, step_timeout_s: float):
        self.group = group
        self.step_timeout_s = step_timeout_s
        self._closed = False

    def submit(self, data: bytes) -> list:
        """Actor calls run in the order they were made: a second step queues behind."""
        if self._closed:
            raise TransportClosed("the ray transport was shut down or failed earlier")
        return [a.execute_model.remote(data) for a in self.group.actors]

    def fetch(self, handle: list) -> bytes:
        return self._wait(handle)[0]

    def _run(self, data: bytes) -> list:
        return self._wait(self.submit(data))

    def _wait(self, refs: list) -> list:
        out = []
        for rank, ref in enumerate(refs):
            try:
                out.append(ray.get(ref, timeout=self.step_timeout_s))
            except ray.exceptions.RayTaskError as e:
                # Let the other ranks finish this call before reporting.
                ray.wait(refs, num_returns=len(refs), timeout=self.step_timeout_s)
                _, dead = self.group.stuck_ranks()
                if dead:  # a peer died under the collective: the group is gone
                    self.shutdown()
                    raise RankFailure(f"rank(s) {dead} died ({self.group.where(dead)}); the step "
                                      f"failed on the others: {_cause(e)}", dead,
                                      fatal=True) from None
                raise RankFailure(_cause(e), [rank], fatal=False) from None
            except ray.exceptions.GetTimeoutError:
                stuck, dead = self.group.stuck_ranks()
                self.shutdown()
                raise RankFailure(
                    f"step timed out after {self.step_timeout_s:g} s: ranks {stuck} still "
                    f"running, ranks {dead} dead ({self.group.where(stuck + dead)})",
                    stuck + dead, fatal=True) from None
            except ray.exceptions.RayError as e:
                self.shutdown()
                raise RankFailure(f"rank {rank} failed ({self.group.where([rank])}): "
                                  f"{type(e).__name__}: {_cause(e)}", [rank], fatal=True) from None
        return out

    def step(self, data: bytes) -> bytes:
        return self._run(data)[0]

    def call_all(self, data: bytes) -> list[bytes]:
        return self._run(data)

    def shutdown(self) -> None:
        if not self._closed:
            self._closed = True
            self.group.shutdown()
