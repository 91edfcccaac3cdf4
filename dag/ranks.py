"""The rank actors of one TP group, placed by one placement group."""

from __future__ import annotations

import logging
import socket
import os
import threading
import time

import msgspec
import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from dag.done_pipe import DoneWriter
from dag.errors import RankFailure
from serialization import RankConfig

logger = logging.getLogger(__name__)

PARK = b"\x00park"  # transport-level: not a serialization message (those are msgpack arrays)


def _unnice() -> None:
    """Ray starts worker processes at niceness 15 (to keep its own daemons responsive);
    a rank is the workload itself, and at 15 any other runnable thread on its cores (the
    engine, a tokenizer) preempts one of its OpenMP threads and stalls the whole parallel
    region: on a 2-core host the model ran 35% slower in the actor than in the engine's
    process. Every thread of the rank goes back to 0 where the OS allows it (on Linux
    niceness is per thread, and new threads inherit their creator's)."""
    try:
        tids = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        tids = [0]
    for tid in tids:
        try:
            if os.getpriority(os.PRIO_PROCESS, tid) > 0:
                os.setpriority(os.PRIO_PROCESS, tid, 0)
        except OSError:  # no CAP_SYS_NICE (an unprivileged user): stay as Ray set it
            return


def _in_passing_thread(fn, *args):
    """``fn(*args)`` in a thread that ends when it returns. The rank's steps run in the
    graph's loop thread; had loading and warm-up run in the actor's main thread, its
    OpenMP team would live on beside the loop thread's, and with more OpenMP threads than
    cores libgomp cuts its spin-wait to a few hundred iterations: the model's threads
    then sleep on a futex between parallel regions (~2,000 times a second) and the model
    ran 1.9x slower in the actor than in the engine's process (2-core host). A thread's
    team ends with the thread."""
    result: list = []

    def run():
        try:
            result.append((True, fn(*args)))
        except BaseException as e:  # re-raised in the caller: the actor fails to start
            result.append((False, e))

    thread = threading.Thread(target=run, name="rank-init")
    thread.start()
    thread.join()
    ok, value = result[0]
    if not ok:
        raise value
    return value


@ray.remote(concurrency_groups={"ctl": 1})
class RankActor:
    """Hosts one rank's worker. ``progress`` answers from its own thread, so the
    engine can ask which rank is stuck while the graph loop is busy."""

    def __init__(self, worker_factory, config: RankConfig, tp_rank: int):
        _unnice()
        self.worker = _in_passing_thread(worker_factory, config, tp_rank)
        self.started = 0
        self.finished = 0
        self._wake = threading.Event()
        self._loop_thread = None
        self._done = None  # DoneWriter, on rank 0 beside the engine

    def open_done_pipe(self, path: str) -> None:
        self._done = DoneWriter(path)

    def execute_model(self, data: bytes) -> bytes | None:
        if data == PARK:
            # A graph's channel read spins while it waits for input; an idle rank
            # sleeps here instead, until the engine wakes it through the ctl thread.
            self._wake.wait()
            self._wake.clear()
            return None
        if self._loop_thread != threading.get_ident():  # the graph's loop: a thread of its own
            self._loop_thread = threading.get_ident()
            _unnice()
        self.started += 1
        try:
            return self.worker.execute_model(data)
        finally:
            self.finished += 1
            if self._done is not None:
                self._done.done()

    @ray.method(concurrency_group="ctl")
    def progress(self) -> tuple[int, int]:
        return self.started, self.finished

    @ray.method(concurrency_group="ctl")
    def wake(self) -> None:
        self._wake.set()

    @ray.method(concurrency_group="ctl")
    def inject_fault(self, kind: str, arg) -> None:
        """Test hook, from outside the engine: the next step fails ("fail", message) or
        stalls ("hang", seconds) on this rank."""
        self.worker._fault = (kind, arg)


class RankGroup:
    """Starts ``tp_size`` rank actors in one placement group (one bundle per rank,
    placed by ``placement_strategy``: PACK, SPREAD, STRICT_PACK or STRICT_SPREAD)."""

    def __init__(self, worker_factory, config: RankConfig, *, num_cpus_per_rank: float,
                 start_timeout_s: float, placement_strategy: str = "PACK"):
        if not ray.is_initialized():
            raise RuntimeError("Ray is not initialised: the engine calls ray.init first")
        self.tp_size = config.tp_size
        # One accelerator per rank: Ray sets CUDA_VISIBLE_DEVICES, so each rank sees cuda:0.
        num_gpus = 1 if config.device == "cuda" else 0
        bundle = {"CPU": num_cpus_per_rank, **({"GPU": num_gpus} if num_gpus else {})}
        self.pg = placement_group([bundle] * self.tp_size, strategy=placement_strategy)
        self.actors: list = []
        self.node_ids: list[str] = []  # rank -> the Ray node id its bundle was placed on
        try:
            ready = self.pg.wait(timeout_seconds=start_timeout_s)
            if not ready:
                avail = ray.available_resources()
                nodes = sum(n["Alive"] for n in ray.nodes())
                raise RuntimeError(
                    f"placement group for tensor_parallel_size={self.tp_size} ranks × {bundle} "
                    f"({placement_strategy}) not satisfied within {start_timeout_s:.0f} s "
                    f"(cluster has {nodes} live node(s), {avail.get('CPU', 0.0):g} CPU, "
                    f"{avail.get('GPU', 0.0):g} GPU available); "
                    "lower num_cpus_per_rank or tensor_parallel_size, or add nodes")
            table = ray.util.placement_group_table(self.pg)["bundles_to_node_id"]
            self.node_ids = [table[rank] for rank in range(self.tp_size)]
            if self.tp_size > 1 and not config.dist_init_method:
                config = msgspec.structs.replace(
                    config, dist_init_method=self._rendezvous_address(start_timeout_s))
            for rank in range(self.tp_size):
                strategy = PlacementGroupSchedulingStrategy(
                    placement_group=self.pg, placement_group_bundle_index=rank)
                self.actors.append(RankActor.options(
                    name=f"spmd-rank-{self.pg.id.hex()[:12]}-{rank}",  # `ray list actors`
                    num_cpus=num_cpus_per_rank, num_gpus=num_gpus, scheduling_strategy=strategy,
                ).remote(worker_factory, config, rank))
            self._wait_ready(start_timeout_s)
        except BaseException:
            self.shutdown()
            raise

    def _rendezvous_address(self, timeout_s: float) -> str:
        """A free TCP port on rank 0's node, for torch.distributed's rendezvous."""
        strategy = PlacementGroupSchedulingStrategy(placement_group=self.pg,
                                                    placement_group_bundle_index=0)
        ref = _free_port.options(scheduling_strategy=strategy, num_cpus=0).remote()
        ip, port = ray.get(ref, timeout=timeout_s)
        return f"tcp://{ip}:{port}"

    def _wait_ready(self, timeout_s: float) -> None:
        refs = [a.__ray_ready__.remote() for a in self.actors]
        deadline = time.monotonic() + timeout_s
        for rank, ref in enumerate(refs):
            try:
                ray.get(ref, timeout=max(0.0, deadline - time.monotonic()))
            except ray.exceptions.GetTimeoutError:
                raise RankFailure(f"rank {rank} did not start within {timeout_s:.0f} s",
                                  [rank], fatal=True) from None
            except ray.exceptions.RayError as e:
                raise RankFailure(f"rank {rank} failed to start: {_cause(e)}", [rank],
                                  fatal=True) from None

    def where(self, ranks: list[int]) -> str:
        """``rank 1 on node <id>``: a lost node takes its ranks with it, so errors say which."""
        return ", ".join(f"rank {r} on node {self.node_ids[r]}" for r in ranks)

    def stuck_ranks(self, timeout_s: float = 2.0) -> tuple[list[int], list[int]]:
        """(ranks still inside a call, dead ranks), asked through the ctl thread."""
        stuck, dead = [], []
        refs = [a.progress.remote() for a in self.actors]
        for rank, ref in enumerate(refs):
            try:
                started, finished = ray.get(ref, timeout=timeout_s)
                if started != finished:
                    stuck.append(rank)
            except ray.exceptions.GetTimeoutError:
                stuck.append(rank)
            except ray.exceptions.RayError:
                dead.append(rank)
        return stuck, dead

    def wake_all(self, timeout_s: float) -> None:
        ray.get([a.wake.remote() for a in self.actors], timeout=timeout_s)

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []
        if self.pg is not None:
            try:
                remove_placement_group(self.pg)
            except Exception:  # already gone with the cluster
                pass
            self.pg = None


@ray.remote
def _free_port() -> tuple[str, int]:
    with socket.socket() as s:
        s.bind(("", 0))
        return ray.util.get_node_ip_address(), s.getsockname()[1]


def _cause(err: Exception) -> str:
    """The innermost message of a Ray error (the rank's own exception text)."""
    cause = getattr(err, "cause", None)
    return str(cause) if cause is not None else str(err)
