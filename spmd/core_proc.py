"""The engine core in its own process (a Ray actor beside the Serve replica): a
busy step loop between two zmq sockets. It shares no lock and no GIL with the
HTTP side. Between steps it drains adds, aborts, stops and calls; after each step
it sends one ``StepOutputs``; a heartbeat thread reports it alive, busy or idle."""

from __future__ import annotations

import logging
import os
import threading
import time

import msgspec
import ray
import zmq

from serialization import (
    AbortRequests,
    CoreDead,
    EngineCoreRequest,
    Heartbeat,
    PoolingRequest,
    RequestError,
    Shutdown,
    StepOutputs,
    StopSequences,
    UtilityCall,
    UtilityResult,
    decode_core_input,
    encode_core,
)
from spmd.config import EngineConfig
from spmd.engine_core import EngineCore
from spmd.input_processor import ModelInfo
from spmd.lora import LoRAInUseError

logger = logging.getLogger(__name__)

_IDLE_POLL_MS = 200  # an idle loop wakes this often to check for shutdown and dead ranks
_RANK_CHECK_S = 2.0  # how often the heartbeat thread asks whether every rank is alive
_LORA_CALLS = ("add_lora", "remove_lora", "list_loras")  # EngineCore methods, run as named


class EngineCoreProc:
    def __init__(self, config: EngineConfig, input_addr: str, output_addr: str,
                 heartbeat_interval_s: float, hf_config: bytes = b""):
        self.core = EngineCore(config, ModelInfo(config, hf_config))
        self.heartbeat_interval_s = heartbeat_interval_s
        self._ctx = zmq.Context()
        self._input = self._ctx.socket(zmq.PULL)
        self._input.setsockopt(zmq.RCVHWM, 0)
        self._input.connect(input_addr)
        self._output = self._ctx.socket(zmq.PUSH)
        self._output.setsockopt(zmq.SNDHWM, 0)
        self._output.connect(output_addr)
        self._output_addr = output_addr
        self._errors: list[RequestError] = []
        self._step_started = 0.0  # time.monotonic() of the step in flight; 0: between steps
        self._stats = self.core.stats()
        self.running = True
        self.fatal: str | None = None  # set by the heartbeat thread: a rank died
        self.stopped = threading.Event()

    def run(self) -> None:
        """The step loop (its own thread); returns after ``Shutdown`` or a fatal error."""
        beat = threading.Thread(target=self._heartbeat, name="spmd-core-heartbeat", daemon=True)
        beat.start()
        reason = "shutdown"
        try:
            while self.running:
                self._drain(block=not self.core.has_work())
                if self.fatal is not None:
                    raise RuntimeError(self.fatal)
                if not self.running:
                    break
                out = None
                if self.core.has_work():
                    self._step_started = time.monotonic()
                    try:
                        out = self.core.step()
                    finally:
                        self._step_started = 0.0
                    self._stats = self.core.stats()
                if out is not None or self._errors:
                    out = out or StepOutputs(step_id=-1)
                    errors, self._errors = [*out.errors, *self._errors], []
                    self._send(StepOutputs(out.step_id, out.outputs, errors, self._stats,
                                           out.timestamp or time.time(), pooled=out.pooled))
        except BaseException as e:  # a rank died or hung, or the transport broke
            reason = f"{type(e).__name__}: {e}"
            logger.error("engine core stopped: %s", reason)
        finally:
            self.running = False
            try:
                self._send(CoreDead(reason))
            finally:
                self.core.shutdown()
                self._output.close(linger=1000)
                self._input.close(linger=0)
                self.stopped.set()

    def _drain(self, block: bool) -> None:
        """Applies every message that has arrived; idle, waits for the first one."""
        if block:
            self.core.park()
            while self.running and self.fatal is None and not self._input.poll(_IDLE_POLL_MS):
                pass
        while self.running:
            try:
                data = self._input.recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self._apply(decode_core_input(data.buffer))

    def _apply(self, msg) -> None:
        if isinstance(msg, EngineCoreRequest):
            try:
                self.core.add_request(msg)
            except ValueError as e:
                self._errors.append(RequestError(msg.request_id, str(e), 400))
        elif isinstance(msg, PoolingRequest):
            try:
                self.core.add_pooling_request(msg)
            except ValueError as e:
                self._errors.append(RequestError(msg.request_id, str(e), 400))
        elif isinstance(msg, AbortRequests):
            for request_id in msg.request_ids:
                self.core.abort_request(request_id)
        elif isinstance(msg, StopSequences):
            for request_id, index in zip(msg.request_ids, msg.indices):
                self.core.stop_sequence(request_id, index)
        elif isinstance(msg, UtilityCall):
            self._send(self._call(msg))
        elif isinstance(msg, Shutdown):
            self.running = False

    def _call(self, msg: UtilityCall) -> UtilityResult:
        try:
            if msg.method == "stats":
                self._stats = self.core.stats()
                return UtilityResult(msg.call_id, msgspec.structs.asdict(self._stats))
            if msg.method == "call_all":
                return UtilityResult(msg.call_id, self.core.call_all(*msg.args))
            if msg.method in _LORA_CALLS:
                return UtilityResult(msg.call_id, getattr(self.core, msg.method)(*msg.args))
            return UtilityResult(msg.call_id, error=f"unknown engine-core call {msg.method!r}")
        except Exception as e:
            kind = _error_kind(e)
            return UtilityResult(msg.call_id, error=str(e) if kind else f"{type(e).__name__}: {e}",
                                 error_type=kind)

    def _send(self, msg) -> None:
        self._output.send(encode_core(msg), copy=False)

    def _heartbeat(self) -> None:
        sock = self._ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.connect(self._output_addr)
        next_rank_check = time.monotonic() + _RANK_CHECK_S
        try:
            while self.running:
                if time.monotonic() >= next_rank_check:
                    dead = self.core.dead_ranks()
                    next_rank_check = time.monotonic() + _RANK_CHECK_S
                    if dead:
                        self.fatal = f"rank(s) {dead} died"
                        logger.error("engine core: %s", self.fatal)
                started = self._step_started
                stats = self._stats
                if started:
                    stats = msgspec.structs.replace(stats, step_running_s=time.monotonic() - started)
                sock.send(encode_core(Heartbeat(time.time(), stats)), copy=False)
                self.stopped.wait(self.heartbeat_interval_s)
        finally:
            sock.close(linger=0)


def _error_kind(err: Exception) -> str | None:
    """What the frontend re-raises a failed call as (``UtilityResult.error_type``)."""
    if isinstance(err, LoRAInUseError):
        return "LoRAInUseError"
    if isinstance(err, ValueError):  # the caller's input: a 400 at the API
        return "ValueError"
    return None


@ray.remote(num_cpus=0, max_concurrency=4)
class EngineCoreActor:
    """Hosts ``EngineCoreProc``; its methods run beside the loop thread."""

    def __init__(self, config: EngineConfig, input_addr: str, output_addr: str,
                 heartbeat_interval_s: float, hf_config: bytes = b""):
        self.proc = EngineCoreProc(config, input_addr, output_addr, heartbeat_interval_s,
                                   hf_config)
        self.thread = threading.Thread(target=self.proc.run, name="spmd-core-loop", daemon=True)
        self.thread.start()

    def ready(self) -> dict:
        core = self.proc.core
        group = getattr(core.transport, "group", None)
        return dict(pid=os.getpid(), max_model_len=core.max_model_len,
                    num_kv_blocks=core.num_kv_blocks, warmup_times_s=core.warmup_times_s,
                    placement_group=group.pg.id.hex() if group is not None else None)

    def watch(self) -> str:
        """Returns when the loop ends (its ref doubles as a liveness probe)."""
        self.proc.stopped.wait()
        return "stopped"

    def wait_stopped(self, timeout_s: float) -> bool:
        return self.proc.stopped.wait(timeout_s)
