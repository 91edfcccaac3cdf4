"""The product transport: a Ray compiled graph (shared-memory channels) that
pushes each step's bytes to every rank at once."""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import time

import ray
from ray.dag import InputNode, MultiOutputNode

from dag.done_pipe import DonePipe
from dag.errors import RankFailure, TransportClosed
from dag.ranks import PARK, RankGroup, _cause
from dag.transport import Transport

logger = logging.getLogger(__name__)


class _LostRankCancelFilter(logging.Filter):
    """Ray's graph monitor logs a full traceback when it cannot cancel the loop of a
    rank whose actor (or node) is gone; the transport names that rank in its own
    RankFailure, so the monitor's record is cut to one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        err = record.exc_info[1] if record.exc_info else None
        lost = isinstance(err, ray.exceptions.RayActorError)
        if lost and record.msg == "Error cancelling worker task":
            record.msg = "compiled graph: a rank's actor is gone (%s); its loop was not cancelled"
            record.args = (type(err).__name__,)
            record.exc_info, record.exc_text = None, None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


logging.getLogger("ray.dag.compiled_dag_node").addFilter(_LostRankCancelFilter())


class CompiledGraphTransport(Transport):
    name = "dag"

    def __init__(self, group: RankGroup, *, step_timeout_s: float, max_inflight: int = 1):
        self.group = group
        self.step_timeout_s = step_timeout_s
        self._done: DonePipe | None = None
        with InputNode() as inp:
            graph = MultiOutputNode([a.execute_model.bind(inp) for a in group.actors])
        try:
            if group.node_ids[0] == ray.get_runtime_context().get_node_id():
                self._done = DonePipe(lambda path: ray.get(
                    group.actors[0].open_done_pipe.remote(path), timeout=step_timeout_s))
            sems_before = _channel_semaphores()
            self.graph = graph.experimental_compile(
                _submit_timeout=step_timeout_s, _max_inflight_executions=max_inflight)
            self._semaphores = _channel_semaphores() - sems_before
        except BaseException:
            self._close_done_pipe()
            group.shutdown()
            raise
        self._closed = False
        self._parked = None  # refs of the park call, while the ranks sleep

    def park(self) -> None:
        if self._parked is None and not self._closed:
            self._parked = self.graph.execute(PARK)

    def _unpark(self) -> None:
        refs, self._parked = self._parked, None
        self.group.wake_all(self.step_timeout_s)
        ray.get(refs, timeout=self.step_timeout_s)

    def _run(self, data: bytes) -> list:
        return self._get(self._execute(data))

    def _execute(self, data: bytes):
        if self._closed:
            raise TransportClosed("the compiled graph was shut down or failed earlier")
        with self._failures():
            if self._parked is not None:
                self._unpark()
            return self.graph.execute(data)

    def _get(self, refs) -> list:
        with self._failures():
            t0 = time.monotonic()
            if self._done is not None:  # ray.get spins on the channel: sleep until it is done
                self._done.wait(self.step_timeout_s, self._loop_ended)
            return ray.get(refs, timeout=max(1.0, self.step_timeout_s - (time.monotonic() - t0)))

    def _loop_ended(self) -> bool:
        """A rank's graph loop has ended (its actor died, say): the read then raises."""
        loops = list(getattr(self.graph, "worker_task_refs", {}).values())
        return bool(loops) and bool(ray.wait(loops, timeout=0)[0])

    @contextlib.contextmanager
    def _failures(self):
        """Turns Ray's errors into a ``RankFailure`` naming the ranks."""
        try:
            yield
        except ray.exceptions.RayTaskError as e:
            # An exception a rank raised (its message names the rank); the graph lives on,
            # unless a peer died under it: then the collective failed on the survivors.
            _, dead = self.group.stuck_ranks()
            if dead:
                self._fail()
                raise RankFailure(f"rank(s) {dead} died ({self.group.where(dead)}); the step "
                                  f"failed on the others: {_cause(e)}", dead, fatal=True) from None
            raise RankFailure(_cause(e), _ranks_named(_cause(e), self.group.tp_size),
                              fatal=False) from None
        except (ray.exceptions.RayChannelTimeoutError, ray.exceptions.GetTimeoutError):
            stuck, dead = self.group.stuck_ranks()
            self._fail()
            raise RankFailure(
                f"step timed out after {self.step_timeout_s:g} s: ranks {stuck} still running, "
                f"ranks {dead} dead ({self.group.where(stuck + dead)})", stuck + dead,
                fatal=True) from None
        except ray.exceptions.RayError as e:
            stuck, dead = self.group.stuck_ranks()
            self._fail()
            failed = dead or stuck
            raise RankFailure(f"rank(s) {failed} failed ({self.group.where(failed)}): "
                              f"{type(e).__name__}: {_cause(e)}", failed, fatal=True) from None

    def submit(self, data: bytes) -> object:
        return self._execute(data)

    def fetch(self, handle: object) -> bytes:
        return self._get(handle)[0]

    def step(self, data: bytes) -> bytes:
        return self._run(data)[0]

    def call_all(self, data: bytes) -> list[bytes]:
        return self._run(data)

    def _fail(self) -> None:
        """After a timeout or a death the graph's channels are unusable: drop it
        without the teardown handshake (which would wait on the broken rank)."""
        self._closed = True
        self._close_done_pipe()
        self.group.shutdown()
        self._unlink_semaphores()

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self._parked is not None:
                self._unpark()
            self.graph.teardown()
        except Exception as e:  # a rank already gone: nothing left to hand back
            logger.debug("compiled graph teardown: %s", e)
        self._close_done_pipe()
        self.group.shutdown()
        self._unlink_semaphores()

    def _close_done_pipe(self) -> None:
        done, self._done = self._done, None
        if done is not None:
            done.close()

    def _unlink_semaphores(self) -> None:
        """The raylet names two POSIX semaphores per graph channel in /dev/shm and
        removes them only when it exits: a long-lived cluster that rebuilds graphs (a
        replica restarting its core) would collect them. The names appeared while this
        graph compiled; after teardown nothing opens them by name again."""
        for path in self._semaphores:
            try:
                os.unlink(path)
            except OSError:
                pass
        self._semaphores = set()


def _channel_semaphores() -> set[str]:
    """This node's named semaphores of Ray's mutable objects (graph channels)."""
    return set(glob.glob("/dev/shm/sem.hdr*")) | set(glob.glob("/dev/shm/sem.obj*"))


def _ranks_named(message: str, tp_size: int) -> list[int]:
    return [r for r in range(tp_size) if f"rank {r}:" in message]
