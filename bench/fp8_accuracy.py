"""FP8 KV cache accuracy on a real model: greedy chat replies and the perplexity of a
fixed text with ``kv_cache_dtype="fp8"`` against the model's own dtype, in one run.

    python -m bench.fp8_accuracy --model path/to/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --device cuda --dtype bfloat16 --num-prompts 64 --max-tokens 64

Reports the share of identical tokens (position by position over every reply), the
share of replies identical in full, the mean length of the common prefix, and each
cache's perplexity of ``TEXT`` (one prefill, every position scored through the paged
cache, so that the FP8 K/V are what attention reads) with their relative difference.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np

TOPICS = ["the ocean", "volcanoes", "a small bakery", "the history of Rome", "black holes",
          "learning to swim", "a robot gardener", "winter in Norway", "honey bees",
          "the printing press", "a lost umbrella", "trains at night", "the Amazon river",
          "chess openings", "a lighthouse keeper", "solar panels"]
TASKS = ["Write a short poem about {}.", "Explain {} to a ten-year-old.",
         "Give three surprising facts about {}.", "Tell a two-sentence story about {}."]

TEXT = (
    "The lighthouse stood at the edge of the cliff for more than a hundred years. Every "
    "night its keeper climbed the narrow stairs, trimmed the wick and wound the clockwork "
    "that turned the great lens. Ships passing in the dark counted the flashes to know "
    "where they were: two short and one long meant the northern cape, and a captain who "
    "saw them turned east to find the harbour. In winter the storms came in from the sea "
    "and the spray reached the lamp room, but the light never failed. When electricity "
    "finally arrived, the clockwork was kept as it was, polished and silent, and visitors "
    "still ask to see it turn. The keeper's logbooks, written in a careful hand, record "
    "the weather, the ships and the birds that rested on the gallery during the autumn "
    "migration, and they are now kept in the town museum, where children read them aloud.")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.fp8_accuracy", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="HF directory or .gguf file (a real model)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--backend", default="dag")
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    if args.num_prompts < 1 or args.max_tokens < 1:
        p.error("--num-prompts and --max-tokens must be >= 1")
    return args


def chats(n: int) -> list[list[dict]]:
    return [[{"role": "user", "content": TASKS[i % len(TASKS)].format(TOPICS[i // len(TASKS) % len(TOPICS)])}]
            for i in range(n)]


def perplexity(logits: np.ndarray, ids: list[int]) -> float:
    """exp of the mean negative log-likelihood of ids[1:] given the logits of ids[:-1]."""
    x = logits[:-1].astype(np.float64)
    x -= x.max(-1, keepdims=True)
    logp = x - np.log(np.exp(x).sum(-1, keepdims=True))
    nll = -logp[np.arange(len(ids) - 1), ids[1:]]
    return float(math.exp(nll.mean()))


def run(args, kv_cache_dtype: str) -> dict:
    from spmd import LLM, SamplingParams

    llm = LLM(args.model, device=args.device, dtype=args.dtype, backend=args.backend,
              kv_cache_dtype=kv_cache_dtype, max_model_len=1024)
    try:
        t0 = time.perf_counter()
        outs = llm.chat(chats(args.num_prompts),
                        SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True),
                        use_tqdm=False)
        elapsed = time.perf_counter() - t0
        ids = llm.get_tokenizer().encode(TEXT)
        raw = llm.engine.call_all("score_prompt", ids, len(ids))[0]
        logits = np.frombuffer(raw, dtype=np.float32).reshape(len(ids), -1)
        return dict(kv_cache_dtype=kv_cache_dtype, num_kv_blocks=llm.engine.num_kv_blocks,
                    tokens=[o.outputs[0].token_ids for o in outs],
                    texts=[o.outputs[0].text for o in outs], generate_s=round(elapsed, 3),
                    perplexity=perplexity(logits, ids), text_tokens=len(ids))
    finally:
        llm.shutdown()


def compare(base: dict, fp8: dict) -> dict:
    same = total = prefix = full = 0
    for a, b in zip(base["tokens"], fp8["tokens"]):
        same += sum(x == y for x, y in zip(a, b))
        total += max(len(a), len(b))
        common = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        prefix += common
        full += a == b
    n = len(base["tokens"])
    return dict(identical_token_share=same / total, identical_reply_share=full / n,
                mean_common_prefix=prefix / n,
                perplexity_base=base["perplexity"], perplexity_fp8=fp8["perplexity"],
                perplexity_delta=(fp8["perplexity"] - base["perplexity"]) / base["perplexity"],
                kv_capacity_ratio=fp8["num_kv_blocks"] / base["num_kv_blocks"])


def main(argv=None) -> dict:
    args = parse_args(argv)
    base, fp8 = run(args, "auto"), run(args, "fp8")
    summary = compare(base, fp8)
    from bench.throughput import machine_info

    record = dict(summary, model=args.model, device=args.device, dtype=args.dtype,
                  num_prompts=args.num_prompts, max_tokens=args.max_tokens,
                  text_tokens=base["text_tokens"],
                  examples=[dict(base=base["texts"][i], fp8=fp8["texts"][i]) for i in range(3)],
                  command=" ".join(["python -m bench.fp8_accuracy", *(argv or [])]),
                  machine=machine_info())
    print(f"identical tokens {summary['identical_token_share']:.1%}, identical replies "
          f"{summary['identical_reply_share']:.1%}, mean common prefix "
          f"{summary['mean_common_prefix']:.1f} of {args.max_tokens}; perplexity "
          f"{summary['perplexity_base']:.4f} -> {summary['perplexity_fp8']:.4f} "
          f"({summary['perplexity_delta']:+.3%}); KV capacity x{summary['kv_capacity_ratio']:.2f}")
    from bench.throughput import emit_json

    return emit_json(record, args.json_out)


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
