"""Checks and times the Triton varlen attention kernel (``workers.triton_varlen``) on one GPU.

    python -m bench.check_varlen_kernels [--shapes minilm,bge-large] [--num-seqs 64]
        [--min-tokens 8 --max-tokens 256] [--dtypes bfloat16,float32] [--sweep]

For each model shape (MiniLM: 12 heads of 32; bge-large: 16 heads of 64), non-causal and
causal: a batch of ``--num-seqs`` sequences of uniform random lengths packed into one
``[T, heads, head_dim]`` batch (+3 padding tokens). Correctness in each dtype: the kernel's
output (over NaN-poisoned memory) against the CPU op ``spmd::varlen_attention`` run in float64,
as ``|out - ref| / |ref|``. Speed in the first dtype: the median per call of CUDA-graph replays
(no Python launch overhead; also the eager figure) of the kernel, of torch SDPA once per
sequence (what the CPU op does), and of torch's flash-attention ``varlen_attn`` where this torch
has it; TFLOP/s counts the useful FLOPs only (4·L²·d per head, half that when causal).
``--sweep`` also times other tile configs of the kernel. Prints one table and one JSON line;
exits nonzero if a check fails.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from workers import ops

# name: (num_heads, num_kv_heads, head_dim)
SHAPES = {"minilm": (12, 12, 32), "bge-large": (16, 16, 64), "llama-gqa": (32, 8, 128)}
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
PADDING_TOKENS = 3
DEVICE = "cuda"
SWEEP = [(64, 64, 4, 2), (64, 64, 4, 3), (64, 32, 4, 2), (128, 64, 4, 2), (128, 64, 8, 2),
         (128, 64, 8, 3), (128, 128, 8, 2), (32, 32, 4, 2)]


@dataclass
class Result:
    shape: str
    causal: bool
    dtype: str
    num_seqs: int
    num_tokens: int
    rel_err: float
    ok: bool
    kernel_us: float = 0.0
    kernel_eager_us: float = 0.0
    sdpa_per_seq_us: float = 0.0
    sdpa_per_seq_eager_us: float = 0.0
    flash_varlen_us: float | None = None
    kernel_tflops: float = 0.0
    speedup_vs_sdpa: float = 0.0
    flash_varlen_tflops: float | None = None
    config: str = ""
    sweep: dict | None = None


def _batch(lens, num_heads, num_kv_heads, head_dim, dtype, seed):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    cu_seqlens = torch.zeros(len(lens) + 1, dtype=torch.int32, device=DEVICE)
    cu_seqlens[1:] = torch.tensor(lens, device=DEVICE).cumsum(0)
    num_tokens = sum(lens) + PADDING_TOKENS
    q, k, v = (torch.randn(num_tokens, n, head_dim, generator=gen, device=DEVICE).to(dtype)
               for n in (num_heads, num_kv_heads, num_kv_heads))
    return q, k, v, cu_seqlens


def _flops(lens, num_heads, head_dim, causal) -> float:
    pairs = sum(n * (n + 1) / 2 if causal else n * n for n in lens)
    return 4.0 * pairs * head_dim * num_heads


def _graph_us(fn, iters: int = 20) -> float:
    """Median per call over replays of one CUDA graph holding ``iters`` calls."""
    import triton.testing

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # compiles and warms up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(iters):
            fn()
    return 1e3 * triton.testing.do_bench(graph.replay, warmup=5, rep=50,
                                         return_mode="median") / iters


def _eager_us(fn) -> float:
    import triton.testing

    return 1e3 * triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")


def _sdpa_per_seq(q, k, v, bounds, scale, causal):
    out = torch.zeros_like(q)
    for start, end in zip(bounds[:-1], bounds[1:]):
        out[start:end] = F.scaled_dot_product_attention(
            q[start:end].transpose(0, 1), k[start:end].transpose(0, 1),
            v[start:end].transpose(0, 1), is_causal=causal, scale=scale,
            enable_gqa=True).transpose(0, 1)
    return out


def _flash_varlen():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def _check(q, k, v, cu_seqlens, max_seqlen, scale, causal, config=None) -> float:
    from workers import triton_varlen

    # Poisoned memory for the output: an element the kernel leaves unwritten shows up as NaN.
    poison = torch.full(q.shape, float("nan"), dtype=q.dtype, device=DEVICE)
    del poison
    out = triton_varlen.varlen_attention(q, k, v, cu_seqlens, max_seqlen, scale, causal,
                                         config=config).cpu().double()
    ref = ops._varlen_attention(q.cpu().double(), k.cpu().double(), v.cpu().double(),
                                cu_seqlens.cpu(), max_seqlen, scale, causal)
    if not torch.isfinite(out).all():
        return float("inf")
    return float((out - ref).norm() / ref.norm())


def _time(result: Result, q, k, v, cu_seqlens, lens, scale, causal, sweep: bool) -> None:
    from workers import triton_varlen

    max_seqlen = max(lens)
    num_heads, head_dim = q.shape[1:]
    bounds = cu_seqlens.tolist()
    flops = _flops(lens, num_heads, head_dim, causal)

    def kernel(config=None):
        return lambda: triton_varlen.varlen_attention(q, k, v, cu_seqlens, max_seqlen, scale,
                                                      causal, config=config)

    default = triton_varlen.varlen_config(head_dim, q.dtype)
    result.config = "x".join(map(str, (default.block_m, default.block_n, default.num_warps,
                                       default.num_stages)))
    result.kernel_us = _graph_us(kernel())
    result.kernel_eager_us = _eager_us(kernel())
    result.kernel_tflops = flops / result.kernel_us / 1e6
    sdpa = lambda: _sdpa_per_seq(q, k, v, bounds, scale, causal)  # noqa: E731
    result.sdpa_per_seq_us = _graph_us(sdpa, iters=2)
    result.sdpa_per_seq_eager_us = _eager_us(sdpa)
    result.speedup_vs_sdpa = result.sdpa_per_seq_us / result.kernel_us
    varlen_attn = _flash_varlen()
    if varlen_attn is not None:
        # torch 2.9/2.10 took is_causal; later versions take a window (left, right).
        params = inspect.signature(varlen_attn).parameters
        kwargs = ({"scale": scale, "is_causal": causal} if "is_causal" in params
                  else {"scale": scale, "window_size": (-1, 0) if causal else (-1, -1)})
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = k.shape[1] != num_heads
        flash = lambda: varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen,  # noqa: E731
                                    max_seqlen, **kwargs)
        try:
            try:
                result.flash_varlen_us = _graph_us(flash)
            except RuntimeError:  # not capturable in this torch: timed eagerly
                result.flash_varlen_us = _eager_us(flash)
            result.flash_varlen_tflops = flops / result.flash_varlen_us / 1e6
        except Exception as exc:  # noqa: BLE001 (a baseline this torch cannot run is skipped)
            result.flash_varlen_us = None
            print(f"  flash varlen_attn unavailable: {type(exc).__name__}: {exc}"[:200])
    if sweep:
        result.sweep = {}
        for block_m, block_n, num_warps, num_stages in SWEEP:
            config = triton_varlen.VarlenConfig(block_m, block_n, num_warps, num_stages)
            name = f"{block_m}x{block_n}x{num_warps}x{num_stages}"
            try:
                err = _check(q, k, v, cu_seqlens, max_seqlen, scale, causal, config)
                assert err <= TOLERANCE[q.dtype], f"rel err {err:.2e}"
                result.sweep[name] = round(_graph_us(kernel(config)), 2)
            except Exception as exc:  # noqa: BLE001 (report every config)
                result.sweep[name] = f"{type(exc).__name__}: {exc}"[:120]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="minilm,bge-large", help=",".join(SHAPES))
    parser.add_argument("--num-seqs", type=int, default=64)
    parser.add_argument("--min-tokens", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--dtypes", default="bfloat16,float32",
                        help="correctness in each; timing in the first")
    parser.add_argument("--sweep", action="store_true", help="also time other tile configs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("check_varlen_kernels needs a CUDA GPU", file=sys.stderr)
        return 2
    import workers.triton_varlen  # noqa: F401  (registers the CUDA kernel)

    gen = torch.Generator().manual_seed(args.seed)
    lens = torch.randint(args.min_tokens, args.max_tokens + 1, (args.num_seqs,),
                         generator=gen).tolist()
    dtypes = [getattr(torch, name) for name in args.dtypes.split(",")]
    results: list[Result] = []
    for shape in args.shapes.split(","):
        num_heads, num_kv_heads, head_dim = SHAPES[shape]
        scale = head_dim**-0.5
        for causal in (False, True):
            for i, dtype in enumerate(dtypes):
                q, k, v, cu_seqlens = _batch(lens, num_heads, num_kv_heads, head_dim, dtype,
                                             args.seed + 1)
                err = _check(q, k, v, cu_seqlens, max(lens), scale, causal)
                result = Result(shape, causal, str(dtype).removeprefix("torch."), len(lens),
                                q.shape[0], err, err <= TOLERANCE[dtype])
                if i == 0:
                    _time(result, q, k, v, cu_seqlens, lens, scale, causal, args.sweep)
                print(f"{shape:10s} causal={causal!s:5s} {result.dtype:9s} rel err {err:.2e} "
                      f"{'ok' if result.ok else 'FAIL'}", flush=True)
                results.append(result)
                torch.cuda.empty_cache()

    print(f"\n{torch.cuda.get_device_name()}: {len(lens)} sequences of {args.min_tokens}.."
          f"{args.max_tokens} tokens ({sum(lens)} in all), times per call from CUDA graphs")
    print(f"{'shape':10s} {'causal':6s} {'dtype':9s} {'rel err':>9s} {'tiles':>10s} "
          f"{'µs kernel':>10s} {'TFLOP/s':>8s} {'µs eager':>9s} {'µs sdpa/seq':>12s} "
          f"{'(eager)':>9s} {'×sdpa':>6s} {'µs flash':>9s} {'TFLOP/s':>8s}  ok")
    for r in results:
        timed = r.kernel_us > 0
        flash = (f"{r.flash_varlen_us:9.1f} {r.flash_varlen_tflops:8.1f}"
                 if r.flash_varlen_us else f"{'-':>9s} {'-':>8s}")
        times = (f"{r.kernel_us:10.1f} {r.kernel_tflops:8.1f} {r.kernel_eager_us:9.1f} "
                 f"{r.sdpa_per_seq_us:12.1f} {r.sdpa_per_seq_eager_us:9.1f} "
                 f"{r.speedup_vs_sdpa:6.1f} {flash}" if timed else " " * 83)
        print(f"{r.shape:10s} {r.causal!s:6s} {r.dtype:9s} {r.rel_err:9.2e} {r.config:>10s} "
              f"{times}  {'ok' if r.ok else 'FAIL'}")
    for r in results:
        if r.sweep:
            print(f"sweep {r.shape} causal={r.causal}: "
                  + ", ".join(f"{name} {us}" for name, us in r.sweep.items()))
    failures = [f"{r.shape} causal={r.causal} {r.dtype}: rel err {r.rel_err:.2e}"
                for r in results if not r.ok]
    for failure in failures:
        print("FAIL", failure)
    line = json.dumps({"device": torch.cuda.get_device_name(), "num_seqs": len(lens),
                       "num_tokens": sum(lens), "results": [asdict(r) for r in results],
                       "failures": failures})
    print(line)
    if args.json_out:
        with open(args.json_out, "w") as f:
            f.write(line + "\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
