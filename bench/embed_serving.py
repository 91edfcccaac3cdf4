"""Embeddings through the real server vs offline ``LLM.embed`` of the same texts, in one run.

    python -m bench.embed_serving --model sentence-transformers/all-MiniLM-L6-v2 \\
        --num-sentences 1024 --concurrency 32 --inputs-per-request 1

Starts the Serve app in this process on a free 127.0.0.1 port (engine options as
``--engine-arg key=value``, the names ``serve run serve_app:deploy`` takes), sends the
sentences as concurrent ``embeddings.create`` calls of the ``openai`` client
(``--inputs-per-request`` sentences each, ``--concurrency`` calls in flight, the client's
default base64 encoding), shuts Serve down, then embeds the same sentences offline with
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

from bench.serving import WORDS, start_serve
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
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    for flag in ("num_sentences", "min_tokens", "concurrency", "inputs_per_request"):
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
    # What bench.serving.start_serve reads.
    args.start_server, args.direct_ingress, args.serve_env = args.model, False, []
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


async def _http(url: str, model: str, batches: list[list[str]], concurrency: int):
    import openai

    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0,
                                timeout=600)
    gate = asyncio.Semaphore(concurrency)

    async def one(batch: list[str]):
        async with gate:
            return await client.embeddings.create(model=model, input=batch)

    try:
        await asyncio.gather(*(one(b) for b in batches[:concurrency]))  # warm-up
        start = time.perf_counter()
        resps = await asyncio.gather(*(one(b) for b in batches))
        elapsed = time.perf_counter() - start
    finally:
        await client.close()
    vectors = [d.embedding for r in resps for d in r.data]
    return elapsed, vectors, sum(r.usage.prompt_tokens for r in resps)


def run_http(args, texts: list[str]) -> tuple[dict, list]:
    """The Serve app in this process, the sentences through it; Serve is shut down after."""
    from ray import serve

    url = start_serve(args)
    try:
        k = args.inputs_per_request
        batches = [texts[i: i + k] for i in range(0, len(texts), k)]
        elapsed, vectors, tokens = asyncio.run(_http(url, args.served_model_name, batches,
                                                     args.concurrency))
    finally:
        serve.shutdown()
    return _rates(elapsed, len(texts), tokens), vectors


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
    import ray
    from transformers import AutoTokenizer

    from serve_app.options import parse_args as parse_serve_args
    from spmd.config import resolve_model

    args = parse_args(argv)
    args.engine_kwargs, options = parse_serve_args({**args.serve_args, "model": args.model})
    args.served_model_name = options.served_model_name
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(args.model))
    texts = make_sentences(tokenizer, args.num_sentences, args.min_tokens, args.max_tokens,
                           args.seed)
    ray_was_up = ray.is_initialized()
    if not ray_was_up:
        ray.init(namespace="serve")
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
        inputs_per_request=args.inputs_per_request, seed=args.seed, http=http,
        offline=offline, http_over_offline=ratio, min_cosine=round(cosine, 8),
        command=" ".join(["python -m bench.embed_serving",
                          *(argv if argv is not None else sys.argv[1:])]),
        machine=machine_info())
    return emit_json(record, args.json_out)


if __name__ == "__main__":
    run_cli(main, (ValueError, RuntimeError))
