"""Sweeps the Triton decode kernel's tile and launch shape (BLOCK_N, num_warps, num_stages,
partition size) over bf16 and FP8 KV caches, on the GPU; one JSON line per run.

    python -m bench.sweep_decode --json-out sweep.jsonl

Each configuration's output is checked against the default configuration's (relative
error); ``DECODE_CONFIG`` in ``workers/triton_ops.py`` holds the winners.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import torch

from bench.check_kernels import HEAD_DIM, _bench_us, _paged_batch, _rel_err
from bench.throughput import run_cli
from workers import ops, triton_ops

CASES = (  # label, batch, context, kv heads
    ("B512 L384 32/32 (7B decode)", 512, 384, 32),
    ("B256 L2048 32/32", 256, 2048, 32),
    ("B256 L2048 32/8 (GQA)", 256, 2048, 8),
)


def _run(args, kv_scales, context, partition, config):
    q, kv, tables, lens, starts = args
    return triton_ops.paged_attention(q, kv, tables, lens, starts, 1, context, HEAD_DIM**-0.5,
                                      kv_scales, partition_size=partition, decode_config=config)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json-out")
    parser.add_argument("--kinds", default="bf16,fp8")
    parser.add_argument("--block-n", default="32,64,128")
    parser.add_argument("--warps", default="2,4,8")
    parser.add_argument("--stages", default="1,2,3")
    parser.add_argument("--partitions", default="128,256,512,1024")
    parser.add_argument("--budget-s", type=float, default=400.0,
                        help="stop sweeping after this long (what ran is kept)")
    a = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise ValueError("bench.sweep_decode needs a CUDA GPU")
    grid = list(itertools.product(*([int(x) for x in s.split(",")]
                                    for s in (a.block_n, a.warps, a.stages))))
    out = open(a.json_out, "a") if a.json_out else None
    t0 = time.monotonic()

    def emit(row):
        print(json.dumps(row), flush=True)
        if out:
            out.write(json.dumps(row) + "\n")
            out.flush()

    gen = torch.Generator(device="cuda").manual_seed(0)
    for label, batch, context, nkv in CASES:
        args = _paged_batch([(context, 1)] * batch, nkv, torch.bfloat16, gen, context,
                            poison=False)
        fp8_values, fp8_scales = ops.fp8_quantize_cache(args[1])
        for kind in a.kinds.split(","):
            cache_args = args if kind == "bf16" else (args[0], fp8_values, *args[2:])
            scales = None if kind == "bf16" else fp8_scales
            bytes_per_pos = 2 * HEAD_DIM * (2 if kind == "bf16" else 1) + (0 if kind == "bf16" else 8)
            kv_bytes = batch * context * nkv * bytes_per_pos
            ref = _run(cache_args, scales, context, triton_ops.DECODE_PARTITION_SIZE, None)
            best = None
            tried = [(c, triton_ops.DECODE_PARTITION_SIZE) for c in grid]
            for phase in (0, 1):
                for config, partition in tried:
                    if time.monotonic() - t0 > a.budget_s:
                        break
                    row = dict(case=label, kv=kind, block_n=config[0], warps=config[1],
                               stages=config[2], partition=partition)
                    try:
                        err = _rel_err(_run(cache_args, scales, context, partition, config), ref)
                        us = _bench_us(lambda: _run(cache_args, scales, context, partition, config))
                    except Exception as e:  # a tile that does not compile (shared memory)
                        row["error"] = f"{type(e).__name__}: {str(e)[:120]}"
                        emit(row)
                        continue
                    row.update(us=round(us, 1), GB_per_s=round(kv_bytes / us / 1e3, 1),
                               rel_err=err)
                    emit(row)
                    if err < 1e-2 and (best is None or us < best[0]):
                        best = (us, config, partition)
                if best is None or phase == 1:
                    break
                tried = [(best[1], p) for p in (int(x) for x in a.partitions.split(","))
                         if p % best[1][0] == 0 and p != triton_ops.DECODE_PARTITION_SIZE]
            if best:
                emit(dict(case=label, kv=kind, best_us=round(best[0], 1), best_config=best[1],
                          best_partition=best[2], GB_per_s=round(kv_bytes / best[0] / 1e3, 1)))
        del args, fp8_values, fp8_scales
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    run_cli(main)
