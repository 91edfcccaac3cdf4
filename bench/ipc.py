"""Frontend <-> engine-core IPC candidates, measured side by side on one machine.

    python -m bench.ipc --sizes 1,64,512 --num-messages 2000

The frontend (in serving: the Ray Serve replica) is this driver process; the
engine core is a Ray actor, one actor of the same class per candidate, so every
candidate crosses the same process boundary. All candidates are opened first and
then measured size by size, taking turns, so the machine's load drifts spread
over all of them. Per engine step the core
sends ONE msgspec (msgpack) message with, for each request that advanced, its
new token ids; the frontend sends small "add request" / "abort" messages the
other way. Candidates:

* ``zmq-ipc``:    pyzmq PUSH/PULL over ``ipc://`` (socket files in a temp dir);
                  the frontend binds both sockets, the core connects;
* ``zmq-tcp``:    the same over ``tcp://127.0.0.1`` (ports picked by the OS);
* ``ray-stream``: a long-lived Ray streaming actor call (``num_returns="streaming"``,
                  an async generator in the actor), frontend messages as actor calls;
* ``ray-call``:   one plain actor call per step message (``ray.get(core.step.remote(add))``).

For each candidate and step size (1, 64, 512 requests) it reports:

* round trip: the frontend encodes and sends an "add" message, the core decodes
  it and answers with one encoded step message, the frontend decodes that;
  p50 / p99 in µs, and the core-to-frontend one-way p50 from ``time.time_ns()``
  stamps (the same clock in both processes);
* throughput: the core sends ``--num-messages`` step messages back to back (for
  ``ray-call``, which cannot push, the frontend submits that many calls at once
  and gets them in order); messages/s until the last one is decoded;
* CPU per message: ``time.process_time()`` deltas / messages, of the frontend
  (the whole driver process, Ray's core-worker threads included: what competes
  with HTTP serving) and of the core's actor process.

All frontends are synchronous (blocking ``recv`` / ``next`` / ``ray.get``); an
asyncio frontend would add its own per-message cost to every candidate.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
import uuid

import msgspec
import numpy as np

CANDIDATES = ("zmq-ipc", "zmq-tcp", "ray-stream", "ray-call")
VOCAB = 32000
TIMEOUT_S = 60.0


# ---- messages ---------------------------------------------------------------------------

class RequestOutput(msgspec.Struct, array_like=True, gc=False):
    """One request's progress in one engine step."""
    request_id: str  # 32 hex characters
    new_token_ids: list[int]
    finish_reason: str | None = None


class StepOutputs(msgspec.Struct, array_like=True, gc=False, tag="out"):
    """The core's one message per engine step."""
    step_id: int
    timestamp_ns: int  # time.time_ns() when the core built the message
    outputs: list[RequestOutput]


class AddRequest(msgspec.Struct, array_like=True, gc=False, tag="add"):
    request_id: str
    prompt_token_ids: list[int]
    max_tokens: int


class AbortRequests(msgspec.Struct, array_like=True, gc=False, tag="abort"):
    request_ids: list[str]


class Burst(msgspec.Struct, array_like=True, gc=False, tag="burst"):
    """Benchmark control: send ``count`` step messages back to back."""
    count: int


class Stop(msgspec.Struct, array_like=True, gc=False, tag="stop"):
    """Benchmark control: end the core's loop (zmq) or output stream (ray-stream)."""


FrontendMessage = AddRequest | AbortRequests | Burst | Stop


def step_outputs(num_requests: int, seed: int = 0) -> list[RequestOutput]:
    """What ``num_requests`` decoding requests produce in one step: one token each; one
    request in 32 finishes."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, VOCAB, num_requests).tolist()
    return [RequestOutput(rng.bytes(16).hex(), [tokens[i]], "stop" if i % 32 == 31 else None)
            for i in range(num_requests)]


def add_request(prompt_len: int, seed: int = 0) -> AddRequest:
    rng = np.random.default_rng(seed)
    return AddRequest(uuid.uuid4().hex, rng.integers(0, VOCAB, prompt_len).tolist(), 128)


# ---- the engine-core side (one Ray actor per candidate) ---------------------------------

class _Core:
    """Engine-core stand-in: decodes frontend messages and, per "step", builds and encodes
    one ``StepOutputs``. An async actor, so the output stream and the frontend's calls
    run concurrently; the zmq loop runs in its own thread."""

    def __init__(self):
        import asyncio

        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(FrontendMessage)
        self._outputs: list[RequestOutput] = []
        self._step_id = 0
        self._queue: asyncio.Queue = asyncio.Queue()
        self._zmq_thread: threading.Thread | None = None
        self._zmq_error: BaseException | None = None

    async def ready(self) -> int:
        return os.getpid()

    async def configure(self, num_requests: int, seed: int) -> None:
        self._outputs = step_outputs(num_requests, seed)

    async def cpu_time(self) -> float:
        return time.process_time()

    def _next_step(self) -> bytes:
        self._step_id += 1
        return self._encoder.encode(StepOutputs(self._step_id, time.time_ns(), self._outputs))

    # -- ray-call
    async def step(self, data: bytes) -> bytes:
        self._decoder.decode(data)
        return self._next_step()

    # -- ray-stream
    async def send(self, data: bytes) -> None:
        msg = self._decoder.decode(data)
        if isinstance(msg, AddRequest):
            self._queue.put_nowait(1)
        elif isinstance(msg, Burst):
            self._queue.put_nowait(msg.count)
        elif isinstance(msg, Stop):
            self._queue.put_nowait(None)

    async def outputs(self):
        while True:
            count = await self._queue.get()
            if count is None:
                return
            for _ in range(count):
                yield self._next_step()

    # -- zmq
    async def start_zmq(self, in_address: str, out_address: str) -> None:
        import zmq

        ctx = zmq.Context.instance()
        pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
        for s in (pull, push):
            s.setsockopt(zmq.LINGER, 0)
        pull.connect(in_address)
        push.connect(out_address)
        self._zmq_thread = threading.Thread(target=self._zmq_loop, args=(pull, push), daemon=True,
                                            name="core-zmq")
        self._zmq_thread.start()

    def _zmq_loop(self, pull, push) -> None:
        try:
            while True:
                msg = self._decoder.decode(pull.recv())
                if isinstance(msg, AddRequest):
                    push.send(self._next_step())
                elif isinstance(msg, Burst):
                    for _ in range(msg.count):
                        push.send(self._next_step())
                elif isinstance(msg, Stop):
                    return
        except BaseException as e:  # reported by stop_zmq
            self._zmq_error = e
        finally:
            pull.close()
            push.close()

    async def stop_zmq(self) -> None:
        if self._zmq_thread is not None:
            self._zmq_thread.join(timeout=TIMEOUT_S)
            alive = self._zmq_thread.is_alive()
            self._zmq_thread = None
            if alive:
                raise RuntimeError("the core's zmq loop did not stop")
        if self._zmq_error is not None:
            raise RuntimeError(f"the core's zmq loop failed: {self._zmq_error!r}")


def _core_actor_class():
    import ray

    return ray.remote(num_cpus=0)(_Core)


# ---- the frontend side (this process) ---------------------------------------------------

class _Link:
    """Frontend end of one candidate: ``round_trip`` sends bytes and returns the answer;
    ``burst(n)`` asks for n step messages and yields them as they arrive."""

    name = ""

    def __init__(self, core):
        self.core = core

    def round_trip(self, data: bytes) -> bytes:
        raise NotImplementedError

    def burst(self, n: int, add: bytes):
        raise NotImplementedError

    def close(self) -> None:
        pass


class ZmqLink(_Link):
    def __init__(self, core, transport: str):
        import ray
        import zmq

        super().__init__(core)
        self.name = f"zmq-{transport}"
        self._started = False
        self._dir = tempfile.mkdtemp(prefix="spmd-ipc-") if transport == "ipc" else None
        self._ctx = zmq.Context()
        self._push, self._pull = self._ctx.socket(zmq.PUSH), self._ctx.socket(zmq.PULL)
        try:
            for s in (self._push, self._pull):
                s.setsockopt(zmq.LINGER, 0)
            # a core that died shows up as zmq.Again, not as a hang
            self._pull.setsockopt(zmq.RCVTIMEO, int(TIMEOUT_S * 1000))
            self._push.setsockopt(zmq.SNDTIMEO, int(TIMEOUT_S * 1000))
            if transport == "ipc":
                self._push.bind(f"ipc://{self._dir}/in.sock")
                self._pull.bind(f"ipc://{self._dir}/out.sock")
            else:
                self._push.bind("tcp://127.0.0.1:*")
                self._pull.bind("tcp://127.0.0.1:*")
            addresses = [s.getsockopt(zmq.LAST_ENDPOINT).decode() for s in (self._push, self._pull)]
            ray.get(core.start_zmq.remote(*addresses), timeout=TIMEOUT_S)
            self._started = True
        except BaseException:
            self.close()
            raise

    def round_trip(self, data: bytes) -> bytes:
        self._push.send(data)
        return self._pull.recv()

    def burst(self, n: int, add: bytes):
        self._push.send(msgspec.msgpack.encode(Burst(n)))
        for _ in range(n):
            yield self._pull.recv()

    def close(self) -> None:
        import ray

        try:
            if self._started:
                self._started = False
                self._push.send(msgspec.msgpack.encode(Stop()))
                ray.get(self.core.stop_zmq.remote(), timeout=TIMEOUT_S)
        finally:
            self._push.close()
            self._pull.close()
            self._ctx.term()
            if self._dir:
                shutil.rmtree(self._dir, ignore_errors=True)


class RayStreamLink(_Link):
    name = "ray-stream"

    def __init__(self, core):
        super().__init__(core)
        self._stream = core.outputs.options(num_returns="streaming").remote()

    def round_trip(self, data: bytes) -> bytes:
        import ray

        self.core.send.remote(data)  # fire and forget, as a frontend would
        return ray.get(next(self._stream), timeout=TIMEOUT_S)

    def burst(self, n: int, add: bytes):
        import ray

        self.core.send.remote(msgspec.msgpack.encode(Burst(n)))
        for _ in range(n):
            yield ray.get(next(self._stream), timeout=TIMEOUT_S)

    def close(self) -> None:
        import ray

        if self._stream is None:
            return
        stream, self._stream = self._stream, None
        ray.get(self.core.send.remote(msgspec.msgpack.encode(Stop())), timeout=TIMEOUT_S)
        for ref in stream:  # ends once the generator returns
            ray.get(ref, timeout=TIMEOUT_S)


class RayCallLink(_Link):
    name = "ray-call"

    def round_trip(self, data: bytes) -> bytes:
        import ray

        return ray.get(self.core.step.remote(data), timeout=TIMEOUT_S)

    def burst(self, n: int, add: bytes):
        import ray

        refs = [self.core.step.remote(add) for _ in range(n)]
        for i in range(n):
            ref, refs[i] = refs[i], None
            yield ray.get(ref, timeout=TIMEOUT_S)


def open_link(candidate: str, core) -> _Link:
    if candidate in ("zmq-ipc", "zmq-tcp"):
        return ZmqLink(core, candidate.split("-", 1)[1])
    if candidate == "ray-stream":
        return RayStreamLink(core)
    if candidate == "ray-call":
        return RayCallLink(core)
    raise ValueError(f"unknown candidate {candidate!r}")


# ---- measurement ------------------------------------------------------------------------

def _pct(values, q: float) -> float:
    return round(float(np.percentile(values, q)), 1)


def measure_cell(link: _Link, num_requests: int, args) -> dict:
    import ray

    ray.get(link.core.configure.remote(num_requests, args.seed), timeout=TIMEOUT_S)
    decoder = msgspec.msgpack.Decoder(StepOutputs)
    add = add_request(args.prompt_len, args.seed)
    encode = msgspec.msgpack.encode

    def check(msg: StepOutputs) -> None:
        if len(msg.outputs) != num_requests:
            raise RuntimeError(f"{link.name}: {len(msg.outputs)} outputs, expected {num_requests}")

    size = len(link.round_trip(encode(add)))
    for _ in range(args.warmup):
        check(decoder.decode(link.round_trip(encode(add))))

    # (a) round trip: encode add -> core decodes, builds, encodes a step -> decode
    rt_ns, one_way_ns = np.empty(args.num_messages), np.empty(args.num_messages)
    cpu0 = time.process_time()
    for i in range(args.num_messages):
        t0 = time.perf_counter_ns()
        msg = decoder.decode(link.round_trip(encode(add)))
        t1 = time.perf_counter_ns()
        one_way_ns[i] = time.time_ns() - msg.timestamp_ns
        rt_ns[i] = t1 - t0
        check(msg)
    rt_cpu_s = time.process_time() - cpu0

    # (b) throughput and (c) CPU per message, the core streaming back to back
    for data in link.burst(min(args.warmup, args.num_messages), encode(add)):
        decoder.decode(data)
    core_cpu0 = ray.get(link.core.cpu_time.remote(), timeout=TIMEOUT_S)
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    received = 0
    for data in link.burst(args.num_messages, encode(add)):
        check(decoder.decode(data))
        received += 1
    elapsed = time.perf_counter() - t0
    cpu_s = time.process_time() - cpu0
    core_cpu_s = ray.get(link.core.cpu_time.remote(), timeout=TIMEOUT_S) - core_cpu0
    if received != args.num_messages:
        raise RuntimeError(f"{link.name}: received {received} of {args.num_messages} messages")
    n = args.num_messages
    return dict(
        candidate=link.name, num_requests=num_requests, message_bytes=size,
        round_trip_us=dict(p50=_pct(rt_ns / 1e3, 50), p99=_pct(rt_ns / 1e3, 99),
                           mean=round(float(rt_ns.mean() / 1e3), 1)),
        one_way_us=dict(p50=_pct(one_way_ns / 1e3, 50), p99=_pct(one_way_ns / 1e3, 99)),
        round_trip_frontend_cpu_us=round(rt_cpu_s / n * 1e6, 1),
        throughput_msgs_per_s=round(n / elapsed, 1),
        stream_frontend_cpu_us=round(cpu_s / n * 1e6, 1),
        stream_core_cpu_us=round(core_cpu_s / n * 1e6, 1),
        num_messages=n)


def measure_codec(num_requests: int, args) -> dict:
    """The msgspec part of every candidate, in this process with no IPC: build + encode one
    step message (core side) and decode it (frontend side), µs per message (median)."""
    outputs = step_outputs(num_requests, args.seed)
    encoder, decoder = msgspec.msgpack.Encoder(), msgspec.msgpack.Decoder(StepOutputs)
    n = min(args.num_messages, 1000)
    enc_ns, dec_ns = np.empty(n), np.empty(n)
    size = 0
    for i in range(n):
        t0 = time.perf_counter_ns()
        data = encoder.encode(StepOutputs(i + 1, time.time_ns(), outputs))
        t1 = time.perf_counter_ns()
        decoder.decode(data)
        t2 = time.perf_counter_ns()
        enc_ns[i], dec_ns[i] = t1 - t0, t2 - t1
        size = size if i else len(data)
    return dict(num_requests=num_requests, message_bytes=size,
                encode_us=_pct(enc_ns / 1e3, 50), decode_us=_pct(dec_ns / 1e3, 50))


def measure_all(args, bar) -> list[dict]:
    """Opens every candidate (one core actor each) first, then measures size by size and,
    within a size, candidate by candidate: slow drifts of the machine's load spread over
    all candidates instead of landing on whichever ran first."""
    import ray

    actor_class = _core_actor_class()
    cores = [actor_class.remote() for _ in args.candidates]
    links: list[_Link] = []
    rows = []
    try:
        ray.get([c.ready.remote() for c in cores], timeout=TIMEOUT_S)
        for candidate, core in zip(args.candidates, cores):
            links.append(open_link(candidate, core))
        time.sleep(args.settle_s)
        for num_requests in args.sizes:
            for link in links:
                if bar is not None:
                    bar.set_postfix_str(f"{link.name} x{num_requests}")
                rows.append(measure_cell(link, num_requests, args))
                if bar is not None:
                    bar.update(1)
    finally:
        try:
            for link in links:
                link.close()
        finally:
            for core in cores:
                ray.kill(core)
    return rows


# ---- report -----------------------------------------------------------------------------

_HEADER = (f"{'candidate':<10} {'reqs':>4} {'bytes':>6} | {'rt p50':>7} {'rt p99':>7} {'1-way':>6} "
           f"{'fe CPU':>6} | {'msgs/s':>8} {'fe CPU':>6} {'core':>6} | {'rt vs best':>10} {'thru vs best':>12}")


def print_table(rows: list[dict], codec: list[dict]) -> None:
    print("\nmsgspec alone, in one process (µs per step message, median)")
    print(f"{'reqs':>4} {'bytes':>6} | {'build+encode':>12} {'decode':>7}")
    for c in codec:
        print(f"{c['num_requests']:>4} {c['message_bytes']:>6} | {c['encode_us']:>12.1f} {c['decode_us']:>7.1f}")
    print("\nround trip: µs (p50, p99), core->frontend one-way p50 µs, frontend CPU µs per round trip")
    print("stream: messages/s back to back, frontend and core CPU µs per message")
    print(_HEADER)
    print("-" * len(_HEADER))
    sizes = list(dict.fromkeys(r["num_requests"] for r in rows))
    for size in sizes:
        mine = [r for r in rows if r["num_requests"] == size]
        best_rt = min(r["round_trip_us"]["p50"] for r in mine)
        best_thru = max(r["throughput_msgs_per_s"] for r in mine)
        for r in mine:
            print(f"{r['candidate']:<10} {size:>4} {r['message_bytes']:>6} | "
                  f"{r['round_trip_us']['p50']:>7.0f} {r['round_trip_us']['p99']:>7.0f} "
                  f"{r['one_way_us']['p50']:>6.0f} {r['round_trip_frontend_cpu_us']:>6.0f} | "
                  f"{r['throughput_msgs_per_s']:>8.0f} {r['stream_frontend_cpu_us']:>6.0f} "
                  f"{r['stream_core_cpu_us']:>6.0f} | "
                  f"{r['round_trip_us']['p50'] / best_rt:>9.2f}x {best_thru / r['throughput_msgs_per_s']:>11.2f}x")
    sys.stdout.flush()


# ---- main -------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.ipc", description=__doc__.split("\n\n")[0])
    p.add_argument("--candidates", default=",".join(CANDIDATES), help=f"comma list of {', '.join(CANDIDATES)}")
    p.add_argument("--sizes", default="1,64,512", help="requests per step message, comma list")
    p.add_argument("--num-messages", type=int, default=2000,
                   help="round trips, and messages streamed, per candidate and size")
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--prompt-len", type=int, default=32, help="prompt tokens in each add message")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--settle-s", type=float, default=3.0,
                   help="idle seconds after start-up (Ray's start-up work) before measuring")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar on stderr")
    p.add_argument("--json-out", default=None, help="also write the JSON line to this file")
    args = p.parse_args(argv)
    try:
        args.sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        p.error(f"--sizes: expected a comma list of ints, got {args.sizes!r}")
    if not args.sizes or min(args.sizes) < 1:
        p.error("--sizes: every size must be >= 1")
    args.candidates = [c.strip() for c in args.candidates.split(",") if c.strip()]
    for c in args.candidates:
        if c not in CANDIDATES:
            p.error(f"--candidates: unknown candidate {c!r}; choose from {', '.join(CANDIDATES)}")
    if not args.candidates:
        p.error("--candidates: at least one")
    if args.num_messages < 1:
        p.error("--num-messages: must be >= 1")
    if args.warmup < 0 or args.prompt_len < 0 or args.settle_s < 0:
        p.error("--warmup, --prompt-len and --settle-s: must be >= 0")
    return args


def _progress_bar(total: int, disabled: bool):
    if disabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="ipc cells", unit="cell", file=sys.stderr)


def main(argv=None) -> dict:
    args = parse_args(argv)
    from bench.throughput import emit_json, machine_info

    if any(c.startswith("zmq") for c in args.candidates):
        try:
            import zmq  # noqa: F401
        except ImportError:
            raise ValueError("the zmq candidates need pyzmq (pip install pyzmq)") from None
    import ray

    ray_was_up = ray.is_initialized()
    if not ray_was_up:
        ray.init(num_cpus=8, include_dashboard=False, log_to_driver=True, logging_level="WARNING")
    rows = []
    bar = _progress_bar(len(args.candidates) * len(args.sizes), args.no_progress)
    try:
        rows = measure_all(args, bar)
    finally:
        if bar is not None:
            bar.close()
        if not ray_was_up and ray.is_initialized():
            ray.shutdown()
    codec = [measure_codec(n, args) for n in args.sizes]
    print_table(rows, codec)
    encode = msgspec.msgpack.encode
    record = dict(
        benchmark="ipc", candidates=args.candidates, sizes=args.sizes, num_messages=args.num_messages,
        warmup=args.warmup, prompt_len=args.prompt_len, seed=args.seed, settle_s=args.settle_s,
        add_bytes=len(encode(add_request(args.prompt_len, args.seed))),
        abort_bytes=len(encode(AbortRequests([uuid.uuid4().hex]))),
        results=rows, codec=codec, command=" ".join(["python -m bench.ipc", *(sys.argv[1:] if argv is None else argv)]),
        machine=machine_info())
    return emit_json(record, args.json_out)


if __name__ == "__main__":
    # Run from the importable module, not __main__: Ray then sends the core actor's class
    # (and the tagged msgspec Structs it decodes) by reference, not rebuilt by value.
    from bench.ipc import main as _main
    from bench.throughput import run_cli

    run_cli(_main)
