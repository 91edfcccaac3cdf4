"""The frontend's end of the link to the engine core: starts the core actor on
this node, sends it requests over zmq (ipc sockets), and runs one receiver thread
that hands each decoded message to the frontend. Liveness comes from the core's
heartbeats and from the actor itself, never from waiting behind a step."""

from __future__ import annotations

import itertools
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future

import ray
import zmq
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from serialization import (
    CoreDead,
    CoreStats,
    Heartbeat,
    Shutdown,
    StepOutputs,
    UtilityCall,
    UtilityResult,
    decode_core_output,
    encode_core,
)
from spmd.config import EngineConfig
from spmd.core_proc import EngineCoreActor
from spmd.engine_core import ensure_ray
from spmd.lora import LoRAInUseError

logger = logging.getLogger(__name__)

# UtilityResult.error_type -> the exception a failed core call raises here
_CALL_ERRORS = {"ValueError": ValueError, "LoRAInUseError": LoRAInUseError}

_POLL_MS = 100
_WATCH_EVERY_S = 0.25  # how often the receiver asks Ray whether the core actor is gone


class EngineDeadError(RuntimeError):
    """The engine stopped (its core or a rank failed, or shutdown); no more requests are served."""


class CoreClient:
    def __init__(self, config: EngineConfig, on_step: Callable[[StepOutputs], None],
                 on_dead: Callable[[str], None], hf_config: bytes = b""):
        """``hf_config``: the model's ``config_json`` as the frontend read it, so that the
        core process (and its ranks) need not read it again through transformers."""
        ensure_ray(config)
        self.config = config
        self.heartbeat_timeout_s = config.parallel.core_heartbeat_timeout_s
        self._on_step = on_step
        self._on_dead = on_dead
        self._dir = tempfile.mkdtemp(prefix="spmd-core-")
        self._ctx = zmq.Context()
        self._input = self._ctx.socket(zmq.PUSH)
        self._input.setsockopt(zmq.SNDHWM, 0)
        self._input.setsockopt(zmq.LINGER, 0)
        self._input.bind(f"ipc://{self._dir}/in")
        self._output = self._ctx.socket(zmq.PULL)
        self._output.setsockopt(zmq.RCVHWM, 0)
        self._output.setsockopt(zmq.LINGER, 0)
        self._output.bind(f"ipc://{self._dir}/out")
        self._send_lock = threading.Lock()
        self._calls: dict[int, Future] = {}
        self._call_ids = itertools.count()
        self.stats = CoreStats()
        self.dead: str | None = None
        self._closing = False
        here = ray.get_runtime_context().get_node_id()
        self.actor = EngineCoreActor.options(
            name=f"spmd-engine-core-{os.path.basename(self._dir)}",  # findable for operators
            scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False),  # ipc: same node
        ).remote(config, f"ipc://{self._dir}/in", f"ipc://{self._dir}/out",
                 config.parallel.core_heartbeat_interval_s, hf_config)
        try:
            self.info = ray.get(self.actor.ready.remote(),
                                timeout=config.parallel.start_timeout_s + 60)
        except BaseException as e:
            self._close_sockets()
            ray.kill(self.actor)
            raise RuntimeError(f"the engine core failed to start: {_cause(e)}") from None
        self.pid = self.info["pid"]
        self._watch = self.actor.watch.remote()
        self._last_seen = time.monotonic()
        self._thread = threading.Thread(target=self._receive, name="spmd-core-receiver",
                                        daemon=True)
        self._thread.start()

    # ---- to the core --------------------------------------------------------------

    def send(self, msg) -> None:
        if self.dead is not None:
            raise EngineDeadError(f"engine is stopped: {self.dead}")
        data = encode_core(msg)
        try:
            with self._send_lock:  # zmq sockets are not thread-safe; this one is only sent on
                self._input.send(data, copy=False)
        except zmq.ZMQError as e:  # closed by the death handler between the check and here
            raise EngineDeadError(f"engine is stopped: {self.dead or e}") from None

    grammar_vocab_sent = False  # set_grammar_vocab went to this core's ranks

    def call(self, method: str, *args) -> Future:
        """A call the core runs between steps; its result (or error) as a ``Future``."""
        future: Future = Future()
        call_id = next(self._call_ids)
        self._calls[call_id] = future
        try:
            self.send(UtilityCall(call_id, method, list(args)))
        except BaseException:
            self._calls.pop(call_id, None)
            raise
        return future

    # ---- liveness -----------------------------------------------------------------

    def check_health(self) -> None:
        """Raises ``EngineDeadError`` if the core is gone or silent; answers at once."""
        if self.dead is not None:
            raise EngineDeadError(f"engine is stopped: {self.dead}")
        silent_s = time.monotonic() - self._last_seen
        if silent_s > self.heartbeat_timeout_s:
            raise EngineDeadError(f"engine core sent nothing for {silent_s:.1f} s "
                                  f"(core_heartbeat_timeout_s={self.heartbeat_timeout_s:g})")

    # ---- from the core (receiver thread) -------------------------------------------

    def _receive(self) -> None:
        next_watch = 0.0
        while not self._closing:
            try:
                if self._output.poll(_POLL_MS):
                    while True:
                        try:
                            data = self._output.recv(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        self._last_seen = time.monotonic()
                        if not self._dispatch(decode_core_output(data.buffer)):
                            return
            except zmq.ZMQError:
                if self._closing:
                    return
                raise
            except Exception:  # a bug in a frontend callback must not stop the receiver
                logger.exception("engine-core output handling failed")
            now = time.monotonic()
            if now >= next_watch:
                next_watch = now + _WATCH_EVERY_S
                try:
                    alive = self._alive(now)
                except Exception as e:  # Ray itself is gone (shut down under us)
                    self._die(f"Ray is gone ({type(e).__name__})")
                    return
                if not alive:
                    return

    def _dispatch(self, msg) -> bool:
        if isinstance(msg, StepOutputs):
            if msg.stats is not None:
                self.stats = msg.stats
            self._on_step(msg)
        elif isinstance(msg, Heartbeat):
            self.stats = msg.stats
        elif isinstance(msg, UtilityResult):
            future = self._calls.pop(msg.call_id, None)
            if future is not None:
                if msg.error is not None:
                    future.set_exception(_CALL_ERRORS.get(msg.error_type, RuntimeError)(msg.error))
                else:
                    future.set_result(msg.value)
        elif isinstance(msg, CoreDead):
            self._die(msg.reason)
            return False
        return True

    def _alive(self, now: float) -> bool:
        done, _ = ray.wait([self._watch], timeout=0)
        if done:
            try:
                ray.get(self._watch)
                reason = "the engine core stopped"
            except Exception as e:
                reason = f"the engine core process died ({type(e).__name__})"
            self._die(reason)
            return False
        silent_s = now - self._last_seen
        if silent_s > self.heartbeat_timeout_s:
            self._die(f"the engine core sent nothing for {silent_s:.1f} s")
            return False
        return True

    def _die(self, reason: str) -> None:
        if self.dead is not None:
            return
        self.dead = reason if not self._closing else "shut down"
        if not self._closing:
            logger.error("engine core is gone: %s", reason)
        for future in self._calls.values():
            future.set_exception(EngineDeadError(f"engine is stopped: {reason}"))
        self._calls.clear()
        self._on_dead(self.dead)

    # ---- shutdown -----------------------------------------------------------------

    def shutdown(self, timeout_s: float = 30.0) -> None:
        if self._closing:
            return
        self._closing = True
        if self.dead is None:
            try:
                with self._send_lock:
                    self._input.send(encode_core(Shutdown()))
                ray.get(self.actor.wait_stopped.remote(timeout_s), timeout=timeout_s + 5)
            except Exception as e:  # already gone: nothing to hand back
                logger.debug("engine core shutdown: %s", e)
        self._thread.join(timeout=2)
        self._die("shut down")
        try:
            ray.kill(self.actor)
        except Exception:
            pass
        self._remove_placement_group()
        self._close_sockets()

    def _remove_placement_group(self) -> None:
        """The ranks' placement group outlives a core killed by a signal (its lifetime is
        the job's): without this its GPUs stay reserved and a rebuilt core waits forever."""
        pg_hex = self.info.get("placement_group")
        if not pg_hex:
            return
        from ray._raylet import PlacementGroupID
        from ray.util.placement_group import PlacementGroup, remove_placement_group

        try:
            remove_placement_group(PlacementGroup(PlacementGroupID(bytes.fromhex(pg_hex))))
        except Exception as e:  # already removed by the core's own shutdown
            logger.debug("placement group %s: %s", pg_hex, e)

    def _close_sockets(self) -> None:
        self._input.close(linger=0)
        self._output.close(linger=0)
        self._ctx.term()
        shutil.rmtree(self._dir, ignore_errors=True)


def _cause(err: BaseException) -> str:
    cause = getattr(err, "cause", None) or err
    text = str(cause).strip().splitlines()
    return text[-1] if text else type(err).__name__
