"""Embeddings through the real server vs offline ``LLM.embed`` of the same texts, in one run.

    python -m bench.embed_serving --model sentence-transformers/all-MiniLM-L6-v2 \\
        --num-sentences 1024 --concurrency 32 --inputs-per-request 1

Starts the Serve app in this process on a free 127.0.0.1 port (engine options as
``--engine-arg key=value``, the names ``serve run serve_app:deploy`` takes), sends the
sentences as concurrent ``embeddings.create`` calls of the ``openai`` client from
``--num-clients`` processes (``--inputs-per-request`` sentences each, ``--concurrency`` calls
in flight in all, the client's default base64 encoding; Serve's ingress settings with
``--serve-env``, py-spy profiles of the server's processes with ``--py-spy``), shuts Serve down, then embeds the same sentences offline with
``LLM.embed`` and the same options. Both sides are warmed up first; only the embedding of
all sentences is timed. Prints sentences/s and tokens/s both ways, HTTP/offline, and the
smallest cosine between the two sides' embeddings; then one JSON line.

Sentences have mixed lengths: token counts uniform in ``[--min-tokens, --max-tokens]``
(special tokens included), made of common English words cut to length with the model's
tokenizer, deterministic for a ``--seed``.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time

import numpy as np

from bench.serving import WORDS, recv_reply, start_ray, start_serve
from bench.throughput import emit_json, machine_info, run_cli


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="an embedding model (folder or known name)")
    p.add_argument("--num-sentences", type=int, default=1024)
    p.add_argument("--min-tokens", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--concurrency", type=int, default=32, help="embeddings.create calls in flight")
    p.add_argument("--inputs-per-request", type=int, default=1)
    p.add_argument("--engine-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="an engine or server option of serve_app:deploy (repeat)")
    p.add_argument("--num-clients", type=int, default=1,
                   help="client processes sharing the load (each its own openai client and "
                        "event loop; one tops out near 250 calls/s on an H200 host's core)")
    p.add_argument("--serve-env", action="append", default=[], metavar="KEY=VALUE",
                   dest="serve_env_items",
                   help="an environment variable for Serve (repeat), e.g. "
                        "RAY_SERVE_THROUGHPUT_OPTIMIZED=1 or RAY_SERVE_ENABLE_HA_PROXY=1")
    p.add_argument("--direct-ingress", action="store_true",
                   help="send the load to the replica's own port (Serve's direct ingress), "
                        "bypassing the proxy")
    p.add_argument("--py-spy", default=None, metavar="DIR",
                   help="during the timed HTTP run, sample the proxy, the replica, the engine "
                        "core and the rank with py-spy; raw profiles and a summary to DIR")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    for flag in ("num_sentences", "min_tokens", "concurrency", "inputs_per_request",
                 "num_clients"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')}: must be >= 1")
    if args.max_tokens < args.min_tokens:
        p.error("--max-tokens: must be >= --min-tokens")
    args.serve_args = {}
    for item in args.engine_arg:
        key, sep, value = item.partition("=")
        if not sep:
            p.error(f"--engine-arg: {item!r} is not KEY=VALUE")
        args.serve_args[key] = value
    args.serve_env = {}
    for item in args.serve_env_items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            p.error(f"--serve-env: {item!r} is not KEY=VALUE")
        args.serve_env[key.strip()] = value
    args.start_server = args.model  # what bench.serving.start_serve reads
    return args


def make_sentences(tokenizer, n: int, lo: int, hi: int, seed: int) -> list[str]:
    """``n`` texts of ``lo``..``hi`` tokens each (uniform), special tokens included."""
    rng = random.Random(seed)
    specials = len(tokenizer("a")["input_ids"]) - len(tokenizer("a", add_special_tokens=False)
                                                      ["input_ids"])
    texts = []
    for _ in range(n):
        target = max(rng.randint(lo, hi) - specials, 1)
        words = " ".join(rng.choice(WORDS) for _ in range(target))
        ids = tokenizer(words, add_special_tokens=False)["input_ids"][:target]
        texts.append(tokenizer.decode(ids))
    return texts


async def _http(url: str, model: str, batches: list[list[str]], concurrency: int, ready):
    """``batches`` as ``embeddings.create`` calls, ``concurrency`` in flight, after a warm-up;
    ``ready()`` (run in a thread) returns the ``perf_counter`` time to start at (the same
    clock in every process). Returns (start, end, vectors, prompt tokens)."""
    import openai

    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0,
                                timeout=600)
    gate = asyncio.Semaphore(concurrency)

    async def one(batch: list[str]):
        async with gate:
            return await client.embeddings.create(model=model, input=batch)

    try:
        await asyncio.gather(*(one(b) for b in batches[:concurrency]))  # warm-up
        start_at = await asyncio.to_thread(ready)
        await asyncio.sleep(max(start_at - time.perf_counter(), 0.0))
        start = time.perf_counter()
        resps = await asyncio.gather(*(one(b) for b in batches))
        end = time.perf_counter()
    finally:
        await client.close()
    vectors = [d.embedding for r in resps for d in r.data]
    return start, end, vectors, sum(r.usage.prompt_tokens for r in resps)


def _client_main(conn, url: str, model: str, batches: list[list[str]], concurrency: int):
    """A client process: warm up, say so, wait for the common start time, run, reply."""
    def ready() -> float:
        conn.send("ready")
        return conn.recv()

    try:
        cpu = time.process_time()
        start, end, vectors, tokens = asyncio.run(_http(url, model, batches, concurrency, ready))
        conn.send((start, end, vectors, tokens, time.process_time() - cpu))
    except BaseException as e:  # the parent raises it
        conn.send(("error", f"{type(e).__name__}: {e}"))


def _http_clients(url: str, model: str, batches: list[list[str]], concurrency: int,
                  num_clients: int, on_start=None) -> tuple[float, list, int, float]:
    """The load from ``num_clients`` processes, each a contiguous share of the batches and
    of the concurrency, started together once all have warmed up (``on_start()`` first);
    returns (elapsed, vectors in input order, tokens, the clients' CPU seconds)."""
    import multiprocessing

    k = min(num_clients, len(batches), concurrency)
    bounds = np.linspace(0, len(batches), k + 1).round().astype(int)
    ctx = multiprocessing.get_context("spawn")
    procs, conns = [], []
    try:
        for c in range(k):
            ours, theirs = ctx.Pipe()
            share = concurrency // k + (c < concurrency % k)
            proc = ctx.Process(target=_client_main, daemon=True,
                               args=(theirs, url, model, batches[bounds[c]:bounds[c + 1]], share))
            proc.start()
            theirs.close()
            procs.append(proc)
            conns.append(ours)
        for c, conn in enumerate(conns):
            recv_reply(c, conn, procs[c])  # "ready": warmed up
        if on_start is not None:
            on_start()
        start_at = time.perf_counter() + 0.2
        for conn in conns:
            conn.send(start_at)
        replies = [recv_reply(c, conn, procs[c]) for c, conn in enumerate(conns)]
    finally:
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.terminate()
        for conn in conns:
            conn.close()
    start, end, vectors, tokens, cpu = zip(*replies)
    return (max(end) - min(start), [v for vecs in vectors for v in vecs], sum(tokens), sum(cpu))


def run_http(args, texts: list[str]) -> tuple[dict, list]:
    """The Serve app in this process, the sentences through it; Serve is shut down after."""
    from ray import serve

    url = start_serve(args)
    spies = []
    try:
        k = args.inputs_per_request
        batches = [texts[i: i + k] for i in range(0, len(texts), k)]
        on_start = None
        if args.py_spy:
            on_start = lambda: spies.extend(start_py_spy(args.py_spy))  # noqa: E731
        elapsed, vectors, tokens, cpu = _http_clients(url, args.served_model_name, batches,
                                                      args.concurrency, args.num_clients,
                                                      on_start)
        profiles = stop_py_spy(spies, elapsed) if spies else None
    finally:
        for proc, _, _ in spies:
            if proc.poll() is None:
                proc.kill()
        serve.shutdown()
    rates = _rates(elapsed, len(texts), tokens)
    rates["client_cpu_util"] = round(cpu / elapsed, 3)
    if profiles is not None:
        rates["profiles"] = profiles
    return rates, vectors


# ---- py-spy on the server's processes ------------------------------------------------

# Ray actor class names -> a short role (the engine core and the rank are ours).
ROLES = (("ProxyActor", "proxy"), ("ServeReplica", "replica"), ("EngineCoreActor", "core"),
         ("RankActor", "rank"))
PY_SPY_RATE = 200  # samples/s


def start_py_spy(out_dir: str) -> list:
    """``py-spy record`` (raw collapsed stacks, a frame per thread, only samples where the
    thread is on a CPU) on each alive proxy, replica, engine core and rank actor."""
    import os
    import shutil
    import subprocess

    from ray.util.state import list_actors

    exe = shutil.which("py-spy") or shutil.which("py-spy", path=os.path.dirname(sys.executable))
    if exe is None:
        raise RuntimeError("--py-spy: py-spy is not installed (pip install py-spy)")
    os.makedirs(out_dir, exist_ok=True)
    spies = []
    for actor in list_actors(filters=[("state", "=", "ALIVE")], limit=1000):
        role = next((r for name, r in ROLES if name in actor.class_name), None)
        if role is None or not actor.pid:
            continue
        path = os.path.join(out_dir, f"{role}_{actor.pid}.txt")
        proc = subprocess.Popen([exe, "record", "--pid", str(actor.pid), "--rate",
                                 str(PY_SPY_RATE), "--format", "raw", "--threads",
                                 "--nonblocking", "--output", path],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        spies.append((proc, role, path))
    time.sleep(1.0)  # py-spy attaches
    alive = []
    for proc, role, path in spies:
        if proc.poll() is None:
            alive.append((proc, role, path))
        else:  # e.g. no ptrace permission: the run goes on without this profile
            print(f"warning: --py-spy: py-spy on the {role} exited: "
                  f"{proc.stderr.read().decode().strip()[-500:]}", file=sys.stderr)
    return alive


def stop_py_spy(spies: list, elapsed_s: float) -> dict:
    """Stops the samplers (SIGINT: py-spy writes its file) and summarizes each profile over
    the timed run's ``elapsed_s`` (the samplers ran ~1 s longer, idle then)."""
    import signal

    for proc, _, _ in spies:
        proc.send_signal(signal.SIGINT)
    out = {}
    for proc, role, path in spies:
        try:
            proc.wait(timeout=30)
        except Exception:
            proc.kill()
        try:
            with open(path) as f:
                summary = summarize_collapsed(f.read(), PY_SPY_RATE * elapsed_s)
        except OSError as e:
            summary = dict(error=str(e))
        out[f"{role}_{path.rsplit('_', 1)[1][:-4]}"] = summary
        threads = ", ".join(f"{t} {v}" for t, v in list(summary.get("threads", {}).items())[:3])
        print(f"py-spy {role}: busy threads {threads}; top self: "
              + "; ".join(f"{f} {v}" for f, v in list(summary.get("self", {}).items())[:5]))
    return out


def summarize_collapsed(text: str, ticks: float, top: int = 15) -> dict:
    """From py-spy's raw output (``thread;frame;...;leaf count`` a line, on-CPU samples
    only): per thread the share of the ``ticks`` sampling instants it was on a CPU, and the
    leaves and frames (inclusive) that take the most of all on-CPU samples."""
    threads: dict[str, int] = {}
    leaves: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    busy = 0
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        thread, *frames = stack.split(";")
        busy += n
        threads[thread] = threads.get(thread, 0) + n
        if frames:
            leaves[frames[-1]] = leaves.get(frames[-1], 0) + n
        for f in set(frames):
            inclusive[f] = inclusive.get(f, 0) + n

    def best(d, scale):
        return {k: round(v / scale, 3) for k, v in sorted(d.items(), key=lambda kv: -kv[1])[:top]}

    return dict(samples=busy, threads=best(threads, ticks),
                self=best(leaves, busy) if busy else {},
                inclusive=best(inclusive, busy) if busy else {})


def run_offline(args, texts: list[str]) -> tuple[dict, list]:
    from spmd import LLM

    llm = LLM(**args.engine_kwargs)
    try:
        llm.embed(texts[: args.concurrency], use_tqdm=False)  # warm-up, as the HTTP run has
        start = time.perf_counter()
        outs = llm.embed(texts, use_tqdm=False)
        elapsed = time.perf_counter() - start
    finally:
        llm.shutdown()
    tokens = sum(len(o.prompt_token_ids) for o in outs)
    return _rates(elapsed, len(texts), tokens), [o.outputs.embedding for o in outs]


def _rates(elapsed_s: float, sentences: int, tokens: int) -> dict:
    return dict(elapsed_s=round(elapsed_s, 3), tokens=tokens,
                sentences_per_s=round(sentences / elapsed_s, 2),
                tokens_per_s=round(tokens / elapsed_s, 1))


def min_cosine(a: list, b: list) -> float:
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    cos = (x * y).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1))
    return float(cos.min())


def main(argv=None) -> dict:
    import os

    args = parse_args(argv)
    # Serve reads its settings from the environment when it is first imported: set them now.
    os.environ.update(args.serve_env)
    import ray
    from transformers import AutoTokenizer

    from serve_app.options import parse_args as parse_serve_args
    from spmd.config import resolve_model

    args.engine_kwargs, options = parse_serve_args({**args.serve_args, "model": args.model})
    args.served_model_name = options.served_model_name
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(args.model))
    texts = make_sentences(tokenizer, args.num_sentences, args.min_tokens, args.max_tokens,
                           args.seed)
    ray_was_up = ray.is_initialized()
    if not ray_was_up:
        start_ray(args)
    try:
        http, http_vectors = run_http(args, texts)
        offline, offline_vectors = run_offline(args, texts)
    finally:
        if not ray_was_up and ray.is_initialized():
            ray.shutdown()
    ratio = round(http["sentences_per_s"] / offline["sentences_per_s"], 4)
    cosine = min_cosine(http_vectors, offline_vectors)
    print(f"{'':8} {'sentences/s':>12} {'tokens/s':>10} {'elapsed s':>10}")
    for name, r in (("HTTP", http), ("offline", offline)):
        print(f"{name:8} {r['sentences_per_s']:12.1f} {r['tokens_per_s']:10.1f} "
              f"{r['elapsed_s']:10.2f}")
    print(f"HTTP/offline {ratio:.3f}; min cosine HTTP vs offline {cosine:.7f}", flush=True)
    record = dict(
        model=args.model, engine_args=args.serve_args, num_sentences=args.num_sentences,
        min_tokens=args.min_tokens, max_tokens=args.max_tokens, concurrency=args.concurrency,
        inputs_per_request=args.inputs_per_request, num_clients=args.num_clients,
        serve_env=args.serve_env, direct_ingress=args.direct_ingress, seed=args.seed, http=http,
        offline=offline, http_over_offline=ratio, min_cosine=round(cosine, 8),
        command=" ".join(["python -m bench.embed_serving",
                          *(argv if argv is not None else sys.argv[1:])]),
        machine=machine_info())
    return emit_json(record, args.json_out)


if __name__ == "__main__":
    run_cli(main, (ValueError, RuntimeError))
