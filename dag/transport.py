"""The transport interface and its factory."""

from __future__ import annotations

import abc
from typing import Callable

from serialization import RankConfig

WorkerFactory = Callable[[RankConfig, int], object]  # (config, tp_rank) -> object with execute_model


class Transport(abc.ABC):
    """Sends one message to every rank and collects the answers."""

    name: str

    @abc.abstractmethod
    def step(self, data: bytes) -> bytes:
        """Runs one step on all ranks; returns rank 0's answer."""

    def submit(self, data: bytes) -> object:
        """Starts a step without waiting for it; ``fetch`` returns its answer. Steps are
        fetched in submission order; a transport that cannot overlap steps runs it at
        ``fetch`` (this default)."""
        return data

    def fetch(self, handle: object) -> bytes:
        """Rank 0's answer to a submitted step."""
        return self.step(handle)

    @abc.abstractmethod
    def call_all(self, data: bytes) -> list[bytes]:
        """Broadcasts one call; returns every rank's answer, rank order."""

    def park(self) -> None:
        """The engine has nothing to do: let the ranks sleep until the next call."""

    @abc.abstractmethod
    def shutdown(self) -> None:
        """Releases ranks and channels; idempotent, prints nothing on a normal exit."""


def make_transport(backend: str, worker_factory: WorkerFactory, config: RankConfig, *,
                   num_cpus_per_rank: float, step_timeout_s: float,
                   placement_strategy: str = "PACK",
                   start_timeout_s: float, max_inflight: int = 1) -> Transport:
    if backend == "inproc":
        from dag.inproc import InProcTransport

        if config.tp_size != 1:
            raise ValueError(f"backend: 'inproc' runs tensor_parallel_size=1 only, got {config.tp_size}")
        return InProcTransport(worker_factory, config, max_inflight=max_inflight)
    from dag.ranks import RankGroup

    group = RankGroup(worker_factory, config, num_cpus_per_rank=num_cpus_per_rank,
                      start_timeout_s=start_timeout_s, placement_strategy=placement_strategy)
    if backend == "dag":
        from dag.compiled import CompiledGraphTransport

        return CompiledGraphTransport(group, step_timeout_s=step_timeout_s, max_inflight=max_inflight)
    if backend == "ray":
        from dag.ray_calls import RayCallTransport

        return RayCallTransport(group, step_timeout_s=step_timeout_s)  # calls queue in order
    group.shutdown()
    raise ValueError(f"backend: unknown {backend!r}; choose dag, ray or inproc")
