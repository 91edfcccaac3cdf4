"""Checks and times the LoRA kernels (``workers.triton_lora``) at Llama-2-7B layer shapes.

    python -m bench.check_lora_kernels [--tokens 1,16,64,256,512,2048] [--adapters 1,4]
    python -m bench.check_lora_kernels --device cpu --small      # tiny shapes, CPU bodies

For each layer (qkv, o, gate_up, down; rank 16, 4 device slots), batch size T and number of
distinct adapters (tokens spread evenly over them): shrink + expand of a mixed batch (one
segmented launch each), the single-adapter fast path (cuBLAS) where one adapter is used, and
the base ``F.linear`` of the same layer for scale. On CUDA each figure is the median of many
replays of a CUDA graph holding ``--graph-iters`` calls (no launch overhead from Python), per
call. Each case is also checked against the lanes formulation (lora_lanes) in float32. Prints one
table and one JSON line (also written to ``--json-out``); exits nonzero if a check fails.
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

from workers import lora_ops

RANK, NUM_SLOTS = 16, 4
# name: (K, slice widths), Llama-2-7B on one rank.
LAYERS = {"qkv": (4096, (4096, 4096, 4096)), "o": (4096, (4096,)),
          "gate_up": (4096, (11008, 11008)), "down": (11008, (4096,))}
SMALL_LAYERS = {"qkv": (64, (64, 32, 32)), "o": (64, (64,)), "gate_up": (64, (96, 96)),
                "down": (96, (64,))}
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}


@dataclass
class Result:
    layer: str
    tokens: int
    adapters: int
    base_us: float
    lora_us: float
    single_us: float | None
    rel_err: float
    ok: bool


def _timer(device: str, graph_iters: int, reps: int):
    """``time_us(fn)``: median µs per call of ``fn``."""
    if device == "cpu":
        def time_us(fn):
            fn()
            samples = []
            for _ in range(reps):
                start = time.perf_counter()
                fn()
                samples.append(time.perf_counter() - start)
            return 1e6 * statistics.median(samples)
        return time_us

    def time_us(fn):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                fn()  # compiles the kernels outside the capture
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(graph_iters):
                fn()
        graph.replay()
        samples = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            samples.append(1e3 * start.elapsed_time(end) / graph_iters)
        return statistics.median(samples)
    return time_us


def _case(layer, hidden, widths, tokens, adapters, dtype, device, time_us) -> Result:
    gen = torch.Generator().manual_seed(tokens * 10 + adapters)
    offsets = [0]
    for width in widths:
        offsets.append(offsets[-1] + width)
    num_slices, width = len(widths), offsets[-1]

    def randn(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=gen)).to(dtype).to(device)

    x = randn(tokens, hidden)
    weight = randn(width, hidden, scale=hidden**-0.5)
    lora_a = randn(NUM_SLOTS, num_slices * RANK, hidden, scale=hidden**-0.5)
    lora_b = randn(NUM_SLOTS, RANK, width, scale=RANK**-0.5)
    out = randn(tokens, width)
    # Tokens spread evenly (round robin) over the first `adapters` slots.
    slots = (torch.arange(tokens) % adapters).to(torch.int32).to(device)
    sorted_idx, seg_starts = (torch.from_numpy(a).to(device)
                              for a in lora_ops.lora_metadata(slots.cpu().numpy(), NUM_SLOTS))

    def lora(single_slot):
        y = lora_ops.lora_shrink(x, lora_a, slots, sorted_idx, seg_starts, single_slot)
        lora_ops.lora_expand(out, y, lora_b, slots, sorted_idx, seg_starts, single_slot, offsets)

    # Check: one call on a copy of out against the lanes formulation in float32.
    b_lanes = torch.cat([lora_ops.lanes_b(lora_b[s].float(), offsets) for s in range(NUM_SLOTS)])
    mask = (slots[:, None] == torch.arange(NUM_SLOTS, device=device)).float()
    expected = lora_ops.lora_lanes(x.float(), out.float(), lora_a.float(), b_lanes, mask)
    start_out = out.clone()
    lora(-1)
    delta, expected_delta = (out.float() - start_out.float()), expected - start_out.float()
    rel_err = float((delta - expected_delta).norm() / expected_delta.norm().clamp_min(1e-30))
    ok = bool(torch.isfinite(out).all()) and rel_err < TOLERANCE[dtype]
    base_us = time_us(lambda: torch.nn.functional.linear(x, weight))
    lora_us = time_us(lambda: lora(-1))
    single_us = time_us(lambda: lora(0)) if adapters == 1 else None
    return Result(layer, tokens, adapters, base_us, lora_us, single_us, rel_err, ok)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--tokens", default="1,16,64,256,512,2048",
                        help="comma-separated batch sizes T")
    parser.add_argument("--adapters", default="1,4", help="comma-separated adapter counts (<= 4)")
    parser.add_argument("--layers", default=",".join(LAYERS), help="subset of " + ",".join(LAYERS))
    parser.add_argument("--small", action="store_true", help="tiny shapes (a smoke test)")
    parser.add_argument("--graph-iters", type=int, default=20, help="calls per CUDA graph")
    parser.add_argument("--reps", type=int, default=50, help="timed replays (or calls on CPU)")
    parser.add_argument("--json-out", default=None, help="also write the JSON line here")
    args = parser.parse_args(argv)
    if args.device == "cuda":
        if not torch.cuda.is_available():
            print("check_lora_kernels needs a CUDA GPU (or --device cpu)", file=sys.stderr)
            return 2
        importlib.import_module("workers.triton_lora")  # registers the CUDA kernels
    dtype = getattr(torch, args.dtype)
    layers = SMALL_LAYERS if args.small else LAYERS
    tokens = [int(t) for t in args.tokens.split(",")]
    adapters = [int(a) for a in args.adapters.split(",")]
    assert all(1 <= a <= NUM_SLOTS for a in adapters), f"--adapters must be in 1..{NUM_SLOTS}"
    time_us = _timer(args.device, args.graph_iters, args.reps)
    cases = [(name, t, a) for name in args.layers.split(",") for t in tokens for a in adapters]
    results = []
    with torch.inference_mode():
        for name, t, a in tqdm(cases, desc="lora kernels"):
            hidden, widths = layers[name]
            results.append(_case(name, hidden, widths, t, a, dtype, args.device, time_us))

    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"\n{device_name}, {args.dtype}, rank {RANK}, {NUM_SLOTS} slots; µs per call")
    print(f"{'layer':8s} {'T':>5s} {'adapters':>8s} {'base':>9s} {'lora':>9s} {'single':>9s} "
          f"{'lora/base':>9s} {'rel err':>9s}")
    for r in results:
        single = f"{r.single_us:9.1f}" if r.single_us is not None else f"{'-':>9s}"
        print(f"{r.layer:8s} {r.tokens:5d} {r.adapters:8d} {r.base_us:9.1f} {r.lora_us:9.1f} "
              f"{single} {r.lora_us / r.base_us:9.2f} {r.rel_err:9.2e}{'' if r.ok else '  FAIL'}")
    line = json.dumps({"device": device_name, "dtype": args.dtype, "rank": RANK,
                       "num_slots": NUM_SLOTS, "small": args.small,
                       "results": [asdict(r) for r in results]})
    print(line)
    if args.json_out:
        with open(args.json_out, "w") as f:
            f.write(line + "\n")
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
