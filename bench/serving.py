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
output tokens/s.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import socket
import sys
import time
from dataclasses import dataclass

import numpy as np

from bench.throughput import Workload, check_fits, emit_json, machine_info, make_workload

DEFAULT_VOCAB_SIZE = 49152  # SmolLM2's
SWEEP = "sweep"  # the value of a bare --concurrency / --request-rate
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
    p.add_argument("--seed", type=int, default=0)
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
    for name in ("num_prompts", "input_len", "output_len", "vocab_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}: must be >= 1")
    if args.timeout_s <= 0:
        p.error("--timeout-s: must be > 0")

    if args.start_server is not None and args.base_url is not None:
        p.error("--base-url, --start-server: give one of them")
    if args.start_server is None:
        args.base_url = (args.base_url or "http://127.0.0.1:8000").rstrip("/")
        if args.engine_arg:
            p.error("--engine-arg: needs --start-server")
    args.serve_args = {}
    for item in args.engine_arg:
        key, eq, val = item.partition("=")
        if not eq or not key:
            p.error(f"--engine-arg: expected KEY=VALUE, got {item!r}")
        args.serve_args[key.strip()] = val
    if args.start_server is not None:
        from serve_app.options import parse_args as parse_serve_args

        try:  # the same conversions and checks as `serve run serve_app:deploy`
            args.engine_kwargs, _ = parse_serve_args({**args.serve_args, "model": args.start_server})
        except ValueError as e:
            p.error(f"--engine-arg: {e}")
    return args


# ---- workload ---------------------------------------------------------------------------

def request_bodies(workload: Workload, endpoint: str, model: str | None) -> list[dict]:
    """One streamed request per prompt: greedy, ``max_tokens`` always reached."""
    common = dict(temperature=0.0, ignore_eos=True, stream=True,
                  stream_options={"include_usage": True})
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


async def run_level(client, url: str, bodies: list[dict], load: str, level: float,
                    seed: int) -> tuple[list[RequestResult], float]:
    """All requests of one load level; returns the results and the wall time."""
    from tqdm.auto import tqdm

    if load == "request_rate" and level != float("inf"):
        gaps = np.random.default_rng(seed).exponential(1.0 / level, len(bodies))
        offsets = np.concatenate([[0.0], np.cumsum(gaps[:-1])])
    else:
        offsets = np.zeros(len(bodies))
    gate = asyncio.Semaphore(int(level) if load == "concurrency" else len(bodies))
    bar = tqdm(total=len(bodies), desc=f"{load.replace('_', ' ')} {level:g}", unit="req")
    start = time.perf_counter()

    async def one(body: dict, offset: float) -> RequestResult:
        await asyncio.sleep(max(0.0, start + offset - time.perf_counter()))
        async with gate:
            result = await send(client, url, body)
        bar.update(1)
        return result

    try:
        results = await asyncio.gather(*(one(b, o) for b, o in zip(bodies, offsets)))
    finally:
        bar.close()
    return list(results), time.perf_counter() - start


async def run_load(args, model: str | None, workloads: list[Workload]) -> list[dict]:
    import httpx

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=args.base_url, headers=headers, limits=limits,
                                 timeout=httpx.Timeout(args.timeout_s, connect=30.0),
                                 trust_env=False) as client:
        if model is None:
            resp = await client.get("/v1/models")
            resp.raise_for_status()
            model = resp.json()["data"][0]["id"]
        path = "/v1/completions" if args.endpoint == "completions" else "/v1/chat/completions"
        warmup = request_bodies(Workload([[1, 2, 3, 4]], [2]), args.endpoint, model)[0]
        first = await send(client, path, warmup)
        if not first.ok:
            raise RuntimeError(f"warm-up request to {args.base_url}{path} failed: {first.error}")
        levels = []
        for i, (level, workload) in enumerate(zip(args.levels, workloads)):
            bodies = request_bodies(workload, args.endpoint, model)
            results, duration = await run_level(client, path, bodies, args.load, level,
                                                args.seed + i)
            levels.append(summarize(results, duration, args.load, level))
            print_level(levels[-1])
    return levels


# ---- report -----------------------------------------------------------------------------

def summarize(results: list[RequestResult], duration_s: float, load: str, level: float) -> dict:
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
        e2e_ms=_stats([r.e2e_s for r in ok]), errors=errors[:5])


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
                       ("Total token throughput (tok/s)", "total_tokens_per_s")):
        print(f"{label:<38}{s[key]:>18}")
    print(f"{'':<14}{'mean':>14}{'p50':>14}{'p99':>14}")
    for label, key in (("TTFT (ms)", "ttft_ms"), ("TPOT (ms)", "tpot_ms"), ("E2E (ms)", "e2e_ms")):
        cells = "".join(f"{'-' if v is None else f'{v:.1f}':>14}" for v in s[key].values())
        print(f"{label:<14}{cells}")
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


def start_serve(args) -> str:
    """The Serve app on a free 127.0.0.1 port; returns its base URL."""
    from ray import serve

    from serve_app import deploy

    port = _free_port()
    quiet = {"enable_access_log": False}  # a log line per request would bury the report
    serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config=quiet)
    serve.run(deploy({**args.serve_args, "model": args.start_server}), name="bench-serving",
              route_prefix="/", blocking=False, logging_config=quiet)
    return f"http://127.0.0.1:{port}"


def run_offline(args, workload: Workload) -> dict:
    """``LLM.generate`` on the same prompts with the same engine options; only generate is timed."""
    from spmd import LLM, SamplingParams

    llm = LLM(**args.engine_kwargs)
    try:
        prompts = [{"prompt_token_ids": ids} for ids in workload.prompts]
        if args.endpoint == "chat":
            tok = llm.get_tokenizer()
            prompts = [{"prompt_token_ids": tok.encode(tok.apply_chat_template(
                [{"role": "user", "content": chat_text(ids)}], add_generation_prompt=True,
                tokenize=False), add_special_tokens=False)} for ids in workload.prompts]
        params = [SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=k)
                  for k in workload.output_lens]
        llm.generate([{"prompt_token_ids": [1, 2, 3, 4]}], SamplingParams(max_tokens=2),
                     use_tqdm=False)  # warm-up, as the HTTP run has
        start = time.perf_counter()
        outputs = llm.generate(prompts, params)
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
    workloads = [make_workload(_reseeded(args, args.seed + i), vocab_size)
                 for i in range(len(args.levels))]
    if max_model_len is not None:
        for w in workloads:
            check_fits(w, max_model_len)

    offline = None
    if args.start_server is None:
        levels = asyncio.run(run_load(args, args.model, workloads))
    else:
        import ray
        from ray import serve

        ray_was_up = ray.is_initialized()
        try:
            args.base_url = start_serve(args)
            try:
                levels = asyncio.run(run_load(args, args.model, workloads))
            finally:
                serve.shutdown()
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
        finally:
            if not ray_was_up and ray.is_initialized():
                ray.shutdown()

    if args.plot:
        plot(levels, args.plot, f"{args.endpoint}, {args.num_prompts} requests per level, "
             f"{'mixed lengths' if args.mixed else f'{args.input_len} in / {args.output_len} out'}")
        print(f"plot: {args.plot}")
    record = dict(
        base_url=args.base_url, start_server=args.start_server, engine_args=args.serve_args,
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
    try:
        main()
    except (ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
