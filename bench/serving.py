"""Online serving benchmark: streamed requests against the OpenAI-compatible HTTP
server, shaped like vLLM's ``benchmark_serving``.

    python -m bench.serving --base-url http://127.0.0.1:8000 --num-prompts 200 \\
        --concurrency --sweep 1,4,16,64 --plot latency.png
    python -m bench.serving --start-server HuggingFaceTB/SmolLM2-135M-Instruct \\
        --engine-arg max_model_len=2048 --num-prompts 200 --concurrency 64

Requests arrive as a Poisson process (``--request-rate``, ``inf``: all at once) or
with a fixed number in flight (``--concurrency``); ``--sweep`` runs several levels
(bare ``--concurrency`` or ``--request-rate`` says which), each on fresh prompts so
that no level hits the prefix cache of another. Prompts are random token ids
(completions) or random words (chat); decoding is greedy and never stops early.
Per request: TTFT (until the first chunk carrying a choice), TPOT ((e2e - TTFT) /
(output tokens - 1)), e2e latency, and output tokens from the usage chunk.

``--start-server MODEL`` runs the whole HTTP-vs-offline comparison in one command:
it starts the Serve app in this process on a free 127.0.0.1 port (engine options
as ``--engine-arg key=value``, the names ``serve run serve_app:deploy`` takes),
runs the load, shuts Serve down, then runs offline ``LLM.generate`` with the same
options on the prompts of the fastest HTTP level and prints the ratio of their
output tokens/s. It also counts the replica health checks that failed during the run
(from the Serve controller's log files of the Ray session), and ``--serve-env
KEY=VALUE`` sets environment variables for Serve before it starts (in this process,
and for Serve's actors through the ``runtime_env`` of the ``ray.init`` it makes and of
the Serve controller).

The client must not be the bottleneck: each level reports the load generator's own CPU
use (process CPU seconds over the level's wall seconds, summed over client processes;
1.0 is one core busy). ``--num-clients N`` spreads each level over N client processes
(spawned once, each with its own asyncio + httpx client): requests are dealt out
round-robin with the arrival times they would have had in one process, a concurrency
level is split as evenly as possible, and the per-request results are merged into
the same summary, timed from the earliest client start to the latest client end.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import glob
import json
import os
import re
import socket
import sys
import time
from dataclasses import astuple, dataclass

import numpy as np

from bench.throughput import (STRUCTURED_SCHEMA, Workload, check_fits, emit_json, machine_info,
                              make_workload, run_cli)

DEFAULT_VOCAB_SIZE = 49152  # SmolLM2's
SWEEP = "sweep"
PROBE_DELAY_S = 1.0  # the value of a bare --concurrency / --request-rate
# Chat prompts: one common word is about one token.
WORDS = ("the of and to in is you that it he was for on are as with his they at be this have "
         "from or one had by word but not what all were we when your can said there use an "
         "each which she do how their if will up other about out many then them these so some "
         "her would make like him into time has look two more write go see number no way could "
         "people my than first water been call who oil its now find long down day did get come "
         "made may part").split()


@dataclass
class RequestResult:
    ok: bool
    ttft_s: float = 0.0
    e2e_s: float = 0.0
    prompt_tokens: int = 0
    output_tokens: int = 0
    error: str | None = None

    @property
    def tpot_s(self) -> float | None:
        if not self.ok or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.serving", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default=None, help="the server (default http://127.0.0.1:8000)")
    p.add_argument("--start-server", metavar="MODEL", default=None,
                   help="start the Serve app on MODEL in this process, then compare with offline "
                        "LLM.generate")
    p.add_argument("--engine-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="with --start-server: an engine or server option of serve_app:deploy "
                        "(repeat); the offline run gets the engine options")
    p.add_argument("--skip-offline", action="store_true", help="with --start-server: HTTP only")
    p.add_argument("--num-loras", type=int, default=0,
                   help="with --start-server: deploy this many random LoRA adapters "
                        "(lora_modules) and spread the requests over them, model=<adapter>; "
                        "the offline run uses the same adapters")
    p.add_argument("--lora-rank", type=int, default=16, help="rank of those adapters")
    p.add_argument("--probe", action="store_true",
                   help="per level: the TTFT of single requests sent idle and then while the "
                        f"level's streams decode ({PROBE_DELAY_S:g} s in), median of 3 each "
                        "(--num-clients 1 only)")
    p.add_argument("--offline-matched", action="store_true",
                   help="with --start-server and --concurrency: also run offline with "
                        "max_num_seqs = the compared level (the same cap on requests in flight)")
    p.add_argument("--direct-ingress", action="store_true",
                   help="with --start-server: send the load to the replica's own port (Serve's "
                        "direct ingress; needs --serve-env RAY_SERVE_ENABLE_DIRECT_INGRESS=1), "
                        "bypassing the proxy")
    p.add_argument("--serve-env", action="append", default=[], metavar="KEY=VALUE",
                   dest="serve_env_items",
                   help="with --start-server: an environment variable for Serve (repeat), e.g. "
                        "RAY_SERVE_THROUGHPUT_OPTIMIZED=1; set in this process before Ray Serve "
                        "is imported and passed to Serve's actors through runtime_env (of the "
                        "ray.init this command makes, and of the Serve controller)")
    p.add_argument("--model", default=None, help="model name sent in requests (default: the "
                                                 "first one GET /v1/models lists)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--endpoint", default="completions", choices=("completions", "chat"))
    p.add_argument("--num-prompts", type=int, default=200, help="requests per load level")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--mixed", action="store_true",
                   help="input length and max_tokens each uniform in 16..256 per request")
    p.add_argument("--vocab-size", type=int, default=None,
                   help=f"token ids are drawn below this (default: the model's with "
                        f"--start-server, else {DEFAULT_VOCAB_SIZE})")
    p.add_argument("--request-rate", nargs="?", const=SWEEP, default=None,
                   help="Poisson arrivals, requests/s ('inf': all at once, the default); bare "
                        "with --sweep")
    p.add_argument("--concurrency", nargs="?", const=SWEEP, default=None,
                   help="requests kept in flight; bare with --sweep")
    p.add_argument("--sweep", default=None, help="comma list of load levels for a bare "
                                                 "--concurrency or --request-rate")
    p.add_argument("--timeout-s", type=float, default=600.0, help="per request")
    p.add_argument("--num-clients", type=int, default=1,
                   help="client processes that share each level's requests and concurrency "
                        "(spawned once; 1: the load runs in this process)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--structured", default=None, choices=("json",),
                   help="every request (and the offline run) constrained by bench.throughput's "
                        "STRUCTURED_SCHEMA, as response_format json_schema")
    p.add_argument("--json-out", default=None, help="also write the JSON line to this file")
    p.add_argument("--plot", default=None, help="PNG of latency and throughput vs load")
    args = p.parse_args(argv)

    if args.request_rate is not None and args.concurrency is not None:
        p.error("--request-rate, --concurrency: give one of them")
    args.load = "concurrency" if args.concurrency is not None else "request_rate"
    flag = f"--{args.load.replace('_', '-')}"
    value = getattr(args, args.load)
    if args.sweep is not None and value not in (None, SWEEP):
        p.error(f"--sweep: replaces the value of {flag}; give {flag} without one")
    if args.sweep is None and value == SWEEP:
        p.error(f"{flag}: needs a value, or --sweep with the levels")
    if args.sweep is not None and value is None:
        p.error("--sweep: say what it sweeps with a bare --concurrency or --request-rate")
    text = args.sweep if args.sweep is not None else (value or "inf")
    try:
        kind = int if args.load == "concurrency" else float
        args.levels = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        p.error(f"{'--sweep' if args.sweep is not None else flag}: expected comma-separated "
                f"{'ints' if kind is int else 'numbers'}, got {text!r}")
    if not args.levels or min(args.levels) <= 0:
        p.error(f"{flag}: every level must be > 0, got {text!r}")
    for name in ("num_prompts", "input_len", "output_len", "vocab_size", "num_clients"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}: must be >= 1")
    if args.timeout_s <= 0:
        p.error("--timeout-s: must be > 0")

    if args.probe and args.num_clients != 1:
        p.error("--probe: needs --num-clients 1")
    if args.direct_ingress and args.start_server is None:
        p.error("--direct-ingress: needs --start-server")
    if args.start_server is not None and args.base_url is not None:
        p.error("--base-url, --start-server: give one of them")
    if args.start_server is None:
        args.base_url = (args.base_url or "http://127.0.0.1:8000").rstrip("/")
        for flag, items in (("--engine-arg", args.engine_arg),
                            ("--serve-env", args.serve_env_items)):
            if items:
                p.error(f"{flag}: needs --start-server")
    args.serve_args, args.serve_env = {}, {}
    for flag, items, out in (("--engine-arg", args.engine_arg, args.serve_args),
                             ("--serve-env", args.serve_env_items, args.serve_env)):
        for item in items:
            key, eq, val = item.partition("=")
            if not eq or not key.strip():
                p.error(f"{flag}: expected KEY=VALUE, got {item!r}")
            out[key.strip()] = val
    args.lora_names = []
    if args.num_loras:
        if args.start_server is None:
            p.error("--num-loras: needs --start-server")
        import tempfile

        from bench.adapters import write_random_adapters
        from spmd.config import resolve_model
        from workers.model_loader import load_hf_config

        paths = write_random_adapters(tempfile.mkdtemp(prefix="spmd-bench-lora-"),
                                      load_hf_config(resolve_model(args.start_server)),
                                      args.lora_rank, args.num_loras, seed=args.seed,
                                      dtype="bfloat16")
        args.lora_names = [f"adapter{i}" for i in range(args.num_loras)]
        args.serve_args.update(
            lora_modules=",".join(f"{n}={p}" for n, p in zip(args.lora_names, paths)),
            enable_lora="true", max_loras=str(args.num_loras), max_lora_rank=str(args.lora_rank))
    if args.start_server is not None:
        # Serve reads many of its settings from the environment when it is imported; in a
        # fresh `python -m bench.serving` the import below is its first one: set them now.
        os.environ.update(args.serve_env)
        from serve_app.options import parse_args as parse_serve_args

        try:  # the same conversions and checks as `serve run serve_app:deploy`
            args.engine_kwargs, _ = parse_serve_args({**args.serve_args, "model": args.start_server})
        except ValueError as e:
            p.error(f"--engine-arg: {e}")
    return args


# ---- workload ---------------------------------------------------------------------------

def request_bodies(workload: Workload, endpoint: str, model: str | None,
                   lora_names: list[str] = (), structured: str | None = None) -> list[dict]:
    """One streamed request per prompt: greedy, ``max_tokens`` always reached; with
    ``lora_names``, request i names adapter i mod n as its model."""
    bodies = _bodies(workload, endpoint, model, structured)
    for i, body in enumerate(bodies if lora_names else ()):
        body["model"] = lora_names[i % len(lora_names)]
    return bodies


def _bodies(workload: Workload, endpoint: str, model: str | None,
            structured: str | None = None) -> list[dict]:
    common = dict(temperature=0.0, ignore_eos=True, stream=True,
                  stream_options={"include_usage": True})
    if structured:
        common["response_format"] = {"type": "json_schema", "json_schema": {
            "name": "bench", "schema": STRUCTURED_SCHEMA}}
    if model is not None:
        common["model"] = model
    if endpoint == "completions":
        return [dict(common, prompt=ids, max_tokens=k)
                for ids, k in zip(workload.prompts, workload.output_lens)]
    return [dict(common, messages=[{"role": "user", "content": chat_text(ids)}],
                 max_completion_tokens=k)
            for ids, k in zip(workload.prompts, workload.output_lens)]


def chat_text(ids: list[int]) -> str:
    return " ".join(WORDS[i % len(WORDS)] for i in ids)


# ---- load -------------------------------------------------------------------------------

async def send(client, url: str, body: dict) -> RequestResult:
    """One streamed request, timed from before the send to ``data: [DONE]``."""
    start = time.perf_counter()
    ttft = None
    usage = None
    try:
        async with client.stream("POST", url, json=body) as resp:
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")
                return RequestResult(False, error=f"HTTP {resp.status_code}: {text[:300]}")
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: "):]
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    return RequestResult(False, error=f"in-band: {chunk['error']}")
                if ttft is None and chunk.get("choices"):
                    ttft = time.perf_counter() - start
                usage = chunk.get("usage") or usage
    except Exception as e:  # a failed request is counted, never fatal
        return RequestResult(False, error=f"{type(e).__name__}: {e}")
    e2e = time.perf_counter() - start
    if ttft is None or usage is None:
        return RequestResult(False, error="stream ended without a choice or a usage chunk")
    return RequestResult(True, ttft, e2e, usage["prompt_tokens"], usage["completion_tokens"])


def arrival_offsets(n: int, load: str, level: float, seed: int) -> np.ndarray:
    """Seconds after the level's start at which each request may be sent."""
    if load == "request_rate" and level != float("inf"):
        gaps = np.random.default_rng(seed).exponential(1.0 / level, n)
        return np.concatenate([[0.0], np.cumsum(gaps[:-1])])
    return np.zeros(n)


async def drive(client, url: str, bodies: list[dict], offsets, concurrency: int,
                start_at: float | None = None,
                on_done=None) -> tuple[list[RequestResult], float, float]:
    """Sends ``bodies`` at ``offsets`` after the start (``start_at``, a ``perf_counter`` time,
    or now), at most ``concurrency`` in flight; returns the results, start and end."""
    if start_at is not None:
        await asyncio.sleep(max(0.0, start_at - time.perf_counter()))
    start = time.perf_counter()
    base = start if start_at is None else start_at
    gate = asyncio.Semaphore(concurrency)

    async def one(body: dict, offset: float) -> RequestResult:
        await asyncio.sleep(max(0.0, base + offset - time.perf_counter()))
        async with gate:
            result = await send(client, url, body)
        if on_done is not None:
            on_done()
        return result

    results = await asyncio.gather(*(one(b, o) for b, o in zip(bodies, offsets)))
    return list(results), start, time.perf_counter()


async def run_level(client, url: str, bodies: list[dict], load: str, level: float,
                    seed: int) -> tuple[list[RequestResult], float]:
    """All requests of one load level in this process; returns the results and the wall time."""
    from tqdm.auto import tqdm

    offsets = arrival_offsets(len(bodies), load, level, seed)
    concurrency = int(level) if load == "concurrency" else len(bodies)
    bar = tqdm(total=len(bodies), desc=f"{load.replace('_', ' ')} {level:g}", unit="req")
    try:
        results, start, end = await drive(client, url, bodies, offsets, concurrency,
                                          on_done=lambda: bar.update(1))
    finally:
        bar.close()
    return results, end - start


def split_level(n: int, load: str, level: float, num_clients: int) -> list[tuple[list[int], int]]:
    """(request indices, concurrency) per client process for one level of ``n`` requests.

    At most ``num_clients`` processes, and no more than there are requests or (for
    ``--concurrency``) slots. A concurrency level is split as evenly as possible and
    request i goes to the owner of slot i % level, so that each process's share of
    requests follows its share of the slots; with a request rate, request i goes to
    process i % k and keeps its arrival time, and nothing gates the sends."""
    k = min(num_clients, n, int(level) if load == "concurrency" else n)
    if load == "concurrency":
        slots = int(level)
        owner = [(i % slots) % k for i in range(n)]
        caps = [slots // k + (1 if c < slots % k else 0) for c in range(k)]
    else:
        owner = [i % k for i in range(n)]
        caps = None
    shares = [[i for i in range(n) if owner[i] == c] for c in range(k)]
    return [(idx, caps[c] if caps else len(idx)) for c, idx in enumerate(shares)]


def _client(args):
    import httpx

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    return httpx.AsyncClient(base_url=args.base_url, headers=headers, limits=limits,
                             timeout=httpx.Timeout(args.timeout_s, connect=30.0),
                             trust_env=False)


def _path(args) -> str:
    return "/v1/completions" if args.endpoint == "completions" else "/v1/chat/completions"


async def _model_and_warmup(client, args, model: str | None) -> str:
    """The model name (the first one the server lists unless given), after one warm-up
    request that must succeed."""
    if model is None:
        resp = await client.get("/v1/models")
        resp.raise_for_status()
        model = resp.json()["data"][0]["id"]
    warmup = request_bodies(Workload([[1, 2, 3, 4]], [2]), args.endpoint, model,
                            structured=args.structured)[0]
    first = await send(client, _path(args), warmup)
    if not first.ok:
        raise RuntimeError(f"warm-up request to {args.base_url}{_path(args)} failed: "
                           f"{first.error}")
    return model


def run_load(args, model: str | None, workloads: list[Workload]) -> list[dict]:
    """Every load level, in this process (``--num-clients 1``) or in client processes."""
    if args.num_clients == 1:
        return asyncio.run(_load_in_process(args, model, workloads))
    return _load_in_processes(args, model, workloads)


async def _load_in_process(args, model: str | None, workloads: list[Workload]) -> list[dict]:
    async with _client(args) as client:
        model = await _model_and_warmup(client, args, model)
        levels = []
        for i, (level, workload) in enumerate(zip(args.levels, workloads)):
            bodies = request_bodies(workload, args.endpoint, model, args.lora_names,
                                    args.structured)
            probes = _probe_bodies(args, model, i) if args.probe else []
            idle = await asyncio.to_thread(_probe_thread, args, probes[:3], 0.0)
            loaded = (asyncio.ensure_future(asyncio.to_thread(
                _probe_thread, args, probes[3:], PROBE_DELAY_S)) if probes else None)
            cpu = time.process_time()
            results, duration = await run_level(client, _path(args), bodies, args.load, level,
                                                args.seed + i)
            cpu = time.process_time() - cpu
            levels.append(summarize(results, duration, args.load, level, client_cpu_s=[cpu]))
            if loaded is not None:
                levels[-1]["probe_ttft_ms"] = _probe_summary(idle, await loaded)
            print_level(levels[-1])
    return levels


def _probe_bodies(args, model: str | None, level_index: int) -> list[dict]:
    """Six one-off requests (fresh prompts: no prefix-cache hit), 3 idle then 3 under load."""
    rng = np.random.default_rng(10_000 + args.seed + level_index)
    prompts = [rng.integers(0, args.probe_vocab, args.input_len).tolist() for _ in range(6)]
    return request_bodies(Workload(prompts, [2] * 6), args.endpoint, model)


def _probe_thread(args, bodies: list[dict], delay_s: float) -> list[RequestResult]:
    """The probes, one after another, from their own thread, event loop and connection, so
    that the load generator's loop does not delay what they measure."""

    async def probe() -> list[RequestResult]:
        await asyncio.sleep(delay_s)  # under load: the level's streams are decoding by now
        results = []
        async with _client(args) as client:
            for body in bodies:
                results.append(await send(client, _path(args), body))
                await asyncio.sleep(0.2)
        return results

    return asyncio.run(probe())


def _probe_summary(idle: list[RequestResult], loaded: list[RequestResult]) -> dict:
    med = lambda rs: (round(float(np.median([r.ttft_s for r in rs if r.ok])) * 1000, 2)
                      if any(r.ok for r in rs) else None)
    out = dict(idle=med(idle), loaded=med(loaded))
    out["ratio"] = round(out["loaded"] / out["idle"], 2) if out["idle"] and out["loaded"] else None
    return out


def _load_in_processes(args, model: str | None, workloads: list[Workload]) -> list[dict]:
    from tqdm.auto import tqdm

    if model is None:  # the client processes warm up themselves; this one names the model
        async def lookup() -> str:
            async with _client(args) as client:
                return await _model_and_warmup(client, args, None)

        model = asyncio.run(lookup())
    levels = []
    with ClientPool(args, model, args.num_clients) as pool:
        for i, (level, workload) in enumerate(zip(args.levels, workloads)):
            bodies = request_bodies(workload, args.endpoint, model, args.lora_names,
                                    args.structured)
            offsets = arrival_offsets(len(bodies), args.load, level, args.seed + i)
            bar = tqdm(total=len(bodies), desc=f"{args.load.replace('_', ' ')} {level:g}",
                       unit="req")
            try:
                results, duration, cpu = pool.run_level(
                    bodies, offsets, split_level(len(bodies), args.load, level, args.num_clients),
                    progress=lambda done: bar.update(done - bar.n))
            finally:
                bar.close()
            levels.append(summarize(results, duration, args.load, level, client_cpu_s=cpu))
            print_level(levels[-1])
    return levels


class ClientPool:
    """``--num-clients`` processes (the "spawn" context), each an asyncio loop with its own
    httpx client, kept for all levels; each warms up once when it starts."""

    START_DELAY_S = 0.2  # between handing out a level and its common start

    def __init__(self, args, model: str, num_clients: int):
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        config = dict(base_url=args.base_url, api_key=args.api_key, timeout_s=args.timeout_s,
                      endpoint=args.endpoint, model=model, structured=args.structured)
        self.procs, self.conns, self.counters = [], [], []
        try:
            for _ in range(num_clients):
                ours, theirs = ctx.Pipe()
                counter = ctx.Value("q", 0)
                proc = ctx.Process(target=_client_main, args=(theirs, counter, config),
                                   daemon=True)
                proc.start()
                theirs.close()
                self.procs.append(proc)
                self.conns.append(ours)
                self.counters.append(counter)
            for c, conn in enumerate(self.conns):
                reply = self._recv(c, conn)
                if reply != "ready":
                    raise RuntimeError(f"client process {c}: {reply}")
        except BaseException:
            self.close()
            raise

    def _recv(self, c: int, conn):
        return recv_reply(c, conn, self.procs[c])

    def run_level(self, bodies: list[dict], offsets, split, progress=None
                  ) -> tuple[list[RequestResult], float, list[float]]:
        """One level over ``split`` (from ``split_level``); returns the results in request
        order, the wall time from the earliest client start to the latest end, and the CPU
        seconds of each client process that took part."""
        from multiprocessing.connection import wait

        for counter in self.counters:
            counter.value = 0
        # perf_counter is one system-wide monotonic clock, the same in every process.
        start_at = time.perf_counter() + self.START_DELAY_S
        used = []
        for c, (idx, concurrency) in enumerate(split):
            self.conns[c].send(("level", [bodies[i] for i in idx],
                                [float(offsets[i]) for i in idx], concurrency, start_at))
            used.append(c)
        pending, replies = set(used), {}
        while pending:
            for conn in wait([self.conns[c] for c in pending], timeout=0.25):
                c = self.conns.index(conn)
                replies[c] = self._recv(c, conn)
                pending.discard(c)
            if progress is not None:
                progress(sum(self.counters[c].value for c in used))
        results: list[RequestResult | None] = [None] * len(bodies)
        for c, (idx, _) in enumerate(split):
            rows, _, _, _ = replies[c]
            for i, row in zip(idx, rows):
                results[i] = RequestResult(*row)
        start = min(replies[c][1] for c in used)
        end = max(replies[c][2] for c in used)
        return results, end - start, [replies[c][3] for c in used]

    def close(self) -> None:
        for conn in self.conns:
            try:
                conn.send(None)
            except (BrokenPipeError, OSError):
                pass
        for proc in self.procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.terminate()
                proc.join()
        for conn in self.conns:
            conn.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def recv_reply(c: int, conn, proc):
    """Client process ``c``'s next message; its error (``("error", text)``) or its exit
    raised here as a ``RuntimeError`` naming it."""
    try:
        reply = conn.recv()
    except EOFError:
        raise RuntimeError(f"client process {c} exited (exit code {proc.exitcode})") from None
    if isinstance(reply, tuple) and reply and reply[0] == "error":
        raise RuntimeError(f"client process {c}: {reply[1]}")
    return reply


def _client_main(conn, counter, config: dict) -> None:
    """A client process: warm up, then run the levels it is sent until it gets None."""
    try:
        asyncio.run(_client_loop(conn, counter, config))
    except BaseException as e:  # the parent raises it
        try:
            conn.send(("error", f"{type(e).__name__}: {e}"))
        except (BrokenPipeError, OSError):
            pass


async def _client_loop(conn, counter, config: dict) -> None:
    args = argparse.Namespace(**config)
    path = _path(args)

    def done() -> None:
        with counter.get_lock():
            counter.value += 1

    async with _client(args) as client:
        await _model_and_warmup(client, args, args.model)
        conn.send("ready")
        while True:
            msg = await asyncio.to_thread(conn.recv)
            if msg is None:
                return
            _, bodies, offsets, concurrency, start_at = msg
            cpu = time.process_time()
            results, start, end = await drive(client, path, bodies, offsets, concurrency,
                                              start_at, on_done=done)
            cpu = time.process_time() - cpu
            conn.send(([astuple(r) for r in results], start, end, cpu))


# ---- report -----------------------------------------------------------------------------

def summarize(results: list[RequestResult], duration_s: float, load: str, level: float,
              client_cpu_s: list[float]) -> dict:
    """One level's summary; ``client_cpu_s``: CPU seconds of each client process in it."""
    ok = [r for r in results if r.ok]
    output = sum(r.output_tokens for r in ok)
    prompt = sum(r.prompt_tokens for r in ok)
    errors = list(dict.fromkeys(r.error for r in results if not r.ok))
    return dict(
        load=load, level=level if level != float("inf") else "inf",
        completed=len(ok), failed=len(results) - len(ok), duration_s=round(duration_s, 3),
        prompt_tokens=prompt, output_tokens=output,
        requests_per_s=round(len(ok) / duration_s, 4),
        output_tokens_per_s=round(output / duration_s, 2),
        total_tokens_per_s=round((prompt + output) / duration_s, 2),
        ttft_ms=_stats([r.ttft_s for r in ok]), tpot_ms=_stats([r.tpot_s for r in ok]),
        e2e_ms=_stats([r.e2e_s for r in ok]),
        # The load generator's own CPU use: 1.0 is one core busy (summed over processes;
        # _max: the busiest process, the one that would saturate first).
        num_clients=len(client_cpu_s),
        client_cpu_util=round(sum(client_cpu_s) / duration_s, 3),
        client_cpu_util_max=round(max(client_cpu_s) / duration_s, 3),
        errors=errors[:5])


def _stats(values_s: list[float | None]) -> dict:
    ms = np.array([v for v in values_s if v is not None]) * 1000.0
    if not ms.size:
        return dict(mean=None, p50=None, p99=None)
    return dict(mean=round(float(ms.mean()), 2), p50=round(float(np.percentile(ms, 50)), 2),
                p99=round(float(np.percentile(ms, 99)), 2))


def print_level(s: dict) -> None:
    title = f" {s['load'].replace('_', ' ')} {_level(s)} "
    print(f"{title:=^56}")
    for label, key in (("Successful requests", "completed"), ("Failed requests", "failed"),
                       ("Duration (s)", "duration_s"), ("Request throughput (req/s)", "requests_per_s"),
                       ("Output token throughput (tok/s)", "output_tokens_per_s"),
                       ("Total token throughput (tok/s)", "total_tokens_per_s"),
                       ("Client processes", "num_clients"),
                       ("Client CPU (cores busy, all)", "client_cpu_util"),
                       ("Client CPU (cores busy, busiest)", "client_cpu_util_max")):
        print(f"{label:<38}{s[key]:>18}")
    print(f"{'':<14}{'mean':>14}{'p50':>14}{'p99':>14}")
    for label, key in (("TTFT (ms)", "ttft_ms"), ("TPOT (ms)", "tpot_ms"), ("E2E (ms)", "e2e_ms")):
        cells = "".join(f"{'-' if v is None else f'{v:.1f}':>14}" for v in s[key].values())
        print(f"{label:<14}{cells}")
    if "probe_ttft_ms" in s:
        probe = s["probe_ttft_ms"]
        print(f"Probe TTFT (ms): idle {probe['idle']}, under load {probe['loaded']}, "
              f"ratio {probe['ratio']}")
    for error in s["errors"]:
        print(f"  error: {error}")
    print(flush=True)


def _level(summary: dict) -> str:
    level = summary["level"]
    return level if isinstance(level, str) else f"{level:g}"


def plot(levels: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Evenly spaced levels: sweeps double, and "inf" has no place on a numeric axis.
    x = np.arange(len(levels))
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for key, stat, style, label in (("ttft_ms", "p50", "o-", "TTFT p50"),
                                    ("ttft_ms", "p99", "o--", "TTFT p99"),
                                    ("tpot_ms", "p50", "s-", "TPOT p50")):
        ys = [np.nan if s[key][stat] is None else s[key][stat] for s in levels]
        ax.plot(x, ys, style, label=label)
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(matplotlib.ticker.StrMethodFormatter("{x:g}"))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_ylabel("latency (ms)")
    ax.set_xlabel("concurrency" if levels[0]["load"] == "concurrency" else "request rate (req/s)")
    ax.set_xticks(x, [_level(s) for s in levels])
    ax.grid(True, which="both", alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot(x, [s["output_tokens_per_s"] for s in levels], "^:", color="black",
             label="output tok/s")
    ax2.set_ylabel("output tokens/s")
    ax2.set_ylim(bottom=0)
    (h1, l1), (h2, l2) = ax.get_legend_handles_labels(), ax2.get_legend_handles_labels()
    fig.legend(h1 + h2, l1 + l2, loc="lower center", ncol=4, fontsize=9, frameon=False)
    ax.set_title(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- in-process server and offline reference ---------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ray(args) -> None:
    """``ray.init`` as ``serve.start`` would make it, plus ``--serve-env`` in the job's
    ``runtime_env`` so that Serve's actors (and what they start) inherit it."""
    import ray

    runtime_env = {"env_vars": dict(args.serve_env)} if args.serve_env else None
    ray.init(namespace="serve", runtime_env=runtime_env)


def start_serve(args) -> str:
    """The Serve app on a free 127.0.0.1 port; returns its base URL."""
    from ray import serve

    from serve_app import deploy

    port = _free_port()
    quiet = {"enable_access_log": False}  # a log line per request would bury the report
    # Also the controller's own runtime_env (its proxies and replicas inherit it): the one
    # way in for --serve-env when Ray was already running.
    controller = ({"runtime_env": {"env_vars": dict(args.serve_env)}} if args.serve_env
                  else None)
    serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config=quiet,
                controller_options=controller)
    serve.run(deploy({**args.serve_args, "model": args.start_server}), name="bench-serving",
              route_prefix="/", blocking=False, logging_config=quiet)
    if args.direct_ingress:
        return replica_url("bench-serving")
    return f"http://127.0.0.1:{port}"


def replica_url(app: str) -> str:
    """The ingress replica's own HTTP address under Serve's direct ingress
    (``RAY_SERVE_ENABLE_DIRECT_INGRESS=1``, implied by ``RAY_SERVE_THROUGHPUT_OPTIMIZED=1``)."""
    import ray
    from ray.serve.context import _get_global_client

    controller = _get_global_client()._controller
    for group in ray.get(controller.get_target_groups.remote(app)):
        if str(getattr(group.protocol, "value", group.protocol)).upper() == "HTTP" and group.targets:
            # The replica binds Serve's HTTP host (127.0.0.1 here); the target names the node IP.
            return f"http://127.0.0.1:{group.targets[0].port}"
    raise RuntimeError("--direct-ingress: Serve lists no replica target; set "
                       "RAY_SERVE_ENABLE_DIRECT_INGRESS=1 (--serve-env)")


# What the Ray 2.60 Serve controller logs (ray/serve/_private/deployment_state.py,
# DeploymentReplica.check_health) for each replica health check that fails: one line per
# failed check (the lines that follow, "failed the health check N times in a row" and
# "failed health check, stopping it", are consequences and are not counted again).
HEALTH_CHECK_FAILURES = {
    "error": re.compile(r"Health check for Replica\(.*\) failed: "),  # it raised
    "timeout": re.compile(r"Didn't receive health check response for replica "),
    "crashed": re.compile(r"Actor for Replica\(.*\) crashed, marking it unhealthy"),
}


class ControllerLogs:
    """Counts the failed replica health checks the Serve controller logs after ``__init__``:
    notes the size of each ``<session>/logs/serve/controller_*.log`` now and later reads
    only what was appended (all of a file that is new; of a file rotated meanwhile, the
    rest of its ``.1`` and then all of the new one)."""

    def __init__(self, session_dir: str | None = None):
        if session_dir is None:  # this process's Ray session (a private API; Serve uses it too)
            import ray

            session_dir = ray._private.worker._global_node.get_session_dir_path()
        self.dir = os.path.join(session_dir, "logs", "serve")
        self.start = {}  # path: (inode, size)
        for path in self._files():
            st = os.stat(path)
            self.start[path] = (st.st_ino, st.st_size)

    def _files(self) -> list[str]:
        return glob.glob(os.path.join(self.dir, "controller_*.log"))

    def count(self) -> dict | None:
        """``{"total": n, kind: n...}``; None if there is no controller log to read."""
        files = self._files()
        if not files:
            return None
        text = []
        for path in files:
            inode, offset = self.start.get(path, (None, 0))
            if inode is not None and _inode(path) != inode:  # rotated
                if _inode(path + ".1") == inode:
                    text.append(_read_from(path + ".1", offset))
                offset = 0
            text.append(_read_from(path, offset))
        counts = dict.fromkeys(HEALTH_CHECK_FAILURES, 0)
        for line in "".join(text).splitlines():
            for kind, pattern in HEALTH_CHECK_FAILURES.items():
                if pattern.search(line):
                    counts[kind] += 1
                    break
        return {"total": sum(counts.values()), **counts}


def _inode(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        return None


def _read_from(path: str, offset: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")
    except FileNotFoundError:
        return ""


def run_offline(args, workload: Workload, max_num_seqs: int | None = None) -> dict:
    """``LLM.generate`` on the same prompts with the same engine options (``max_num_seqs``
    replaced when given); only generate is timed."""
    from spmd import LLM, LoRARequest, SamplingParams

    kwargs = dict(args.engine_kwargs)
    if max_num_seqs is not None:
        kwargs["max_num_seqs"] = max_num_seqs
    llm = LLM(**kwargs)
    try:
        prompts = [{"prompt_token_ids": ids} for ids in workload.prompts]
        if args.endpoint == "chat":
            tok = llm.get_tokenizer()
            prompts = [{"prompt_token_ids": tok.encode(tok.apply_chat_template(
                [{"role": "user", "content": chat_text(ids)}], add_generation_prompt=True,
                tokenize=False), add_special_tokens=False)} for ids in workload.prompts]
        guided = ({"json": STRUCTURED_SCHEMA} if args.structured else None)
        params = [SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=k,
                                 structured_outputs=guided) for k in workload.output_lens]
        llm.generate([{"prompt_token_ids": [1, 2, 3, 4]}], SamplingParams(
            max_tokens=2, structured_outputs=guided), use_tqdm=False)  # warm-up, as HTTP's
        loras = None
        if args.lora_names:
            paths = dict(item.split("=", 1) for item in args.serve_args["lora_modules"].split(","))
            adapters = [LoRARequest(n, i + 1, paths[n]) for i, n in enumerate(args.lora_names)]
            for lora in adapters:  # loaded before the clock starts, as the server's are
                llm.engine.add_lora(lora)
            loras = [adapters[i % len(adapters)] for i in range(len(prompts))]
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, lora_request=loras)
        elapsed = time.perf_counter() - start
    finally:
        llm.shutdown()
    output = sum(len(o.outputs[0].token_ids) for o in outputs)
    prompt = sum(len(o.prompt_token_ids) for o in outputs)
    return dict(elapsed_s=round(elapsed, 3), output_tokens=output,
                requests_per_s=round(len(outputs) / elapsed, 4),
                output_tokens_per_s=round(output / elapsed, 2),
                total_tokens_per_s=round((prompt + output) / elapsed, 2))


def _model_limits(args) -> tuple[int, int | None]:
    """(vocab size, max_model_len or None) for --start-server's model."""
    from spmd.config import resolve_model
    from workers.model_loader import load_hf_config

    config = load_hf_config(resolve_model(args.start_server))
    max_len = (args.engine_kwargs.get("max_model_len")
               or getattr(config, "max_position_embeddings", None))
    return config.vocab_size, max_len


# ---- main -------------------------------------------------------------------------------

def main(argv=None) -> dict:
    """Runs the benchmark; returns the dict printed as the JSON line."""
    args = parse_args(argv)
    vocab_size, max_model_len = args.vocab_size or DEFAULT_VOCAB_SIZE, None
    if args.start_server is not None:
        model_vocab, max_model_len = _model_limits(args)
        vocab_size = args.vocab_size or model_vocab
    args.probe_vocab = vocab_size
    workloads = [make_workload(_reseeded(args, args.seed + i), vocab_size)
                 for i in range(len(args.levels))]
    if max_model_len is not None:
        for w in workloads:
            check_fits(w, max_model_len)

    offline = health = None
    if args.start_server is None:
        levels = run_load(args, args.model, workloads)
    else:
        import ray
        from ray import serve

        ray_was_up = ray.is_initialized()
        if ray_was_up and args.serve_env:
            print("warning: Ray was already running: --serve-env reaches Serve's actors only "
                  "through the runtime_env of a Serve controller started now, and none of "
                  "Ray's own processes", file=sys.stderr)
        try:
            if not ray_was_up:
                start_ray(args)
            controller_logs = ControllerLogs()
            args.base_url = start_serve(args)
            try:
                levels = run_load(args, args.model, workloads)
                health = controller_logs.count()
            finally:
                serve.shutdown()
            if health is None:
                print(f"Failed replica health checks: unknown (no controller log in "
                      f"{controller_logs.dir})", flush=True)
            else:
                print(f"Failed replica health checks: {health['total']} (" + ", ".join(
                    f"{k} {v}" for k, v in health.items() if k != "total") + ")", flush=True)
            if not args.skip_offline:
                best = max(range(len(levels)), key=lambda i: levels[i]["output_tokens_per_s"])
                offline = run_offline(args, workloads[best])
                offline["vs_level"] = levels[best]["level"]
                offline["http_over_offline"] = round(
                    levels[best]["output_tokens_per_s"] / offline["output_tokens_per_s"], 4)
                print(f"Output tokens/s: HTTP {levels[best]['output_tokens_per_s']:.1f} "
                      f"({args.load.replace('_', ' ')} {_level(levels[best])}), offline "
                      f"LLM.generate {offline['output_tokens_per_s']:.1f}, HTTP/offline "
                      f"{offline['http_over_offline']:.3f}", flush=True)
                if args.offline_matched and args.load == "concurrency":
                    # The same cap on requests in flight as the HTTP level had.
                    level = int(levels[best]["level"])
                    matched = run_offline(args, workloads[best], max_num_seqs=level)
                    matched["max_num_seqs"] = level
                    matched["http_over_offline"] = round(
                        levels[best]["output_tokens_per_s"] / matched["output_tokens_per_s"], 4)
                    offline["matched"] = matched
                    print(f"Output tokens/s: offline LLM.generate at max_num_seqs={level} "
                          f"{matched['output_tokens_per_s']:.1f}, HTTP/offline "
                          f"{matched['http_over_offline']:.3f}", flush=True)
        finally:
            if not ray_was_up and ray.is_initialized():
                ray.shutdown()

    if args.plot:
        plot(levels, args.plot, f"{args.endpoint}, {args.num_prompts} requests per level, "
             f"{'mixed lengths' if args.mixed else f'{args.input_len} in / {args.output_len} out'}")
        print(f"plot: {args.plot}")
    record = dict(
        base_url=args.base_url, start_server=args.start_server, engine_args=args.serve_args,
        serve_env=args.serve_env, num_clients=args.num_clients,
        health_check_failures=None if health is None else health["total"],
        health_check_failures_by_kind=None if health is None else {
            k: v for k, v in health.items() if k != "total"},
        endpoint=args.endpoint, num_prompts=args.num_prompts,
        input_len=None if args.mixed else args.input_len,
        output_len=None if args.mixed else args.output_len, mixed=args.mixed,
        vocab_size=vocab_size, seed=args.seed, load=args.load, levels=levels, offline=offline,
        command=" ".join(["python -m bench.serving", *(argv if argv is not None else sys.argv[1:])]),
        machine=machine_info())
    return emit_json(record, args.json_out)


def _reseeded(args, seed: int) -> argparse.Namespace:
    args = copy.copy(args)
    args.seed = seed
    return args


if __name__ == "__main__":
    run_cli(main, (ValueError, RuntimeError))
