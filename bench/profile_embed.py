"""Where ``LLM.embed``'s time goes: engine-side Python against the model on the device.

    python -m bench.profile_embed --random-bert minilm --device cuda --dtype bfloat16 \\
        --num-sentences 4096 --batch-size 256

One engine with ``backend="inproc"`` (the rank's model lives in this process, so one
profile sees both sides), warmed up, then:

* the phases timed apart: tokenizing every sentence with one batched tokenizer call and
  one call per sentence; adding the requests; the whole ``embed``; the model alone on
  the same packed batches (``Worker._run_encoder``, synchronized);
* ``embed`` under cProfile: the top functions by own time and by cumulative time.

Prints the tables and one JSON line.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time

import numpy as np

from bench.embed import engine_sizes, make_sentences, model_path
from bench.throughput import emit_json, machine_info, run_cli


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--random-bert", default=None, choices=["minilm", "bge-large", "tiny"])
    p.add_argument("--save-dir", default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--num-sentences", type=int, default=4096)
    p.add_argument("--min-tokens", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    if (args.model is None) == (args.random_bert is None):
        p.error("give one of --model, --random-bert")
    return args


def _sync(device: str) -> None:
    import torch

    if device != "cpu" and torch.cuda.is_available():
        torch.cuda.synchronize()


def main(argv=None) -> dict:
    args = parse_args(argv)
    from transformers import AutoTokenizer

    from spmd import LLM

    path = model_path(args)
    tokenizer = AutoTokenizer.from_pretrained(path)
    texts, counts = make_sentences(tokenizer, args.num_sentences, args.min_tokens,
                                   args.max_tokens, args.seed)
    n, b = len(texts), args.batch_size
    times = {}
    t0 = time.perf_counter()
    tokenizer(texts)
    times["tokenize_batched_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    for t in texts:
        tokenizer(t)
    times["tokenize_one_by_one_s"] = time.perf_counter() - t0

    llm = LLM(path, task="embed", dtype=args.dtype, device=args.device, backend="inproc",
              **engine_sizes(b, args.max_tokens))
    try:
        worker = llm.engine.transport.worker
        device = str(worker.device)
        llm.embed(texts[:b], use_tqdm=False)
        llm.embed(texts[:8], use_tqdm=False)
        t0 = time.perf_counter()
        llm.embed(texts, use_tqdm=False)
        times["embed_s"] = time.perf_counter() - t0

        # the model alone, on the same batches of b sentences
        ids = [np.asarray(i, dtype=np.int32) for i in tokenizer(texts)["input_ids"]]
        batches = [(np.array([len(x) for x in ids[i:i + b]], dtype=np.int32),
                    np.concatenate(ids[i:i + b])) for i in range(0, n, b)]
        worker._run_encoder(*batches[0])
        _sync(device)
        t0 = time.perf_counter()
        for lens, tok in batches:
            worker._run_encoder(lens, tok)
        _sync(device)
        times["model_s"] = time.perf_counter() - t0

        prof = cProfile.Profile()
        prof.enable()
        t0 = time.perf_counter()
        llm.embed(texts, use_tqdm=False)
        times["embed_profiled_s"] = time.perf_counter() - t0
        prof.disable()
    finally:
        llm.shutdown()

    for key in ("tottime", "cumulative"):
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats(key).print_stats(args.top)
        print(f"==== cProfile of embed, by {key}")
        print("\n".join(s.getvalue().splitlines()[4:]))
    print(f"{n} sentences, {sum(counts)} tokens, batches of {b}, device {device}")
    for k, v in times.items():
        print(f"{k:24s} {v:8.3f} s  {n / v:10.1f} sent/s")
    result = dict(model=args.model or f"random-bert:{args.random_bert}", device=device,
                  dtype=args.dtype, num_sentences=n, num_tokens=int(sum(counts)), batch_size=b,
                  **{k: round(v, 4) for k, v in times.items()},
                  command=" ".join(["python -m bench.profile_embed", *(argv or sys.argv[1:])]),
                  machine=machine_info())
    emit_json(result, args.json_out)
    return result


if __name__ == "__main__":
    run_cli(main)
