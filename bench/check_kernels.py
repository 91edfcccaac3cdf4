"""Checks and times the Triton kernels of ``workers.triton_ops`` and ``triton_moe`` on one GPU.

    python -m bench.check_kernels [--dtypes bfloat16,float32] [--skip-bandwidth]
                                  [--skip-fp8] [--skip-moe]

For each op, in each dtype, at Llama-2-7B sizes (hidden 4096, 32 heads of 128, 32 or
8 kv heads): fresh random inputs, the CUDA kernel against the reference op run in
float64 on the CPU (relative error ``|out - ref| / |ref|``), outputs allocated over
NaN-poisoned memory (every element must be written), stale KV slots poisoned with NaN
(they must be masked), ``torch.library.opcheck`` with CUDA inputs, then the median
time of the kernel next to the eager reference body on the GPU. Last, decode attention
at batch 256 over 512 and 2048 tokens of context, with the achieved KV read bandwidth.
Then the FP8 KV cache (``--skip-fp8`` to leave it out): the CUDA write kernel against
the CPU reference quantizer (same e4m3 bytes and scales), decode and mixed attention of
bf16 queries over an FP8 cache against the float64 reference on the dequantized cache,
and decode over FP8 next to bf16 at batch 256 (time, and bytes read per second).
Then ``fused_moe`` in bf16 (``--skip-moe`` to leave it out) at Qwen3-30B-A3B and
Mixtral-8x7B sizes for 1 to 2048 tokens: against the float64 CPU op up to 256 tokens,
the median time next to the eager reference body, the bytes moved per second (the
weights of the experts hit, x, the output and the kernels' intermediates) and TFLOP/s;
decode batches are also captured in a CUDA graph and replayed on a new routing.
Prints one table and one JSON line; exits nonzero if any check fails.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass

import torch

from workers import ops

BLOCK_SIZE = 16
HIDDEN, NUM_HEADS, HEAD_DIM, INTERMEDIATE = 4096, 32, 128, 11008
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
# opcheck's schema, autograd-registration and fake-tensor checks; not
# test_aot_dispatch_dynamic: these are inference ops with no autograd formula.
OPCHECK_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor")
# fused_moe: (model, hidden, moe_intermediate_size, experts, top_k), in bf16.
MOE_SHAPES = (("Qwen3-30B-A3B", 2048, 768, 128, 8), ("Mixtral-8x7B", 4096, 14336, 8, 2))
MOE_TOKENS = (1, 16, 64, 256, 2048)
MOE_MAX_CHECKED_TOKENS = 256  # larger batches are timed only (the float64 CPU op is slow)
MOE_MAX_GRAPH_TOKENS = 16  # decode batches: also captured in a CUDA graph


@dataclass
class Result:
    op: str
    dtype: str
    shape: str
    rel_err: float
    kernel_us: float
    torch_us: float
    ok: bool
    note: str = ""


def _poison_next_alloc(*shapes_dtypes) -> None:
    """Fills freed blocks of these sizes with NaN, so the caching allocator hands them
    back poisoned to the kernel's own ``torch.empty``: unwritten outputs show up as NaN."""
    blocks = [torch.full(shape, float("nan"), dtype=dtype, device="cuda")
              for shape, dtype in shapes_dtypes]
    del blocks


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().cpu().double(), ref.detach().cpu().double()
    if not torch.isfinite(out).all():
        return float("inf")
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def _cpu64(args):
    return tuple(a.detach().cpu().double() if isinstance(a, torch.Tensor) and a.is_floating_point()
                 else a.cpu() if isinstance(a, torch.Tensor) else a for a in args)


def _bench_us(fn) -> float:
    import triton.testing

    return 1e3 * triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")


# --------------------------------------------------------------------------- inputs


def _paged_batch(seqs, num_kv_heads, dtype, gen, max_model_len, poison=True):
    """``seqs`` [(seq_len, query_len)]: q, a KV cache with shuffled blocks and stale slots
    (NaN when ``poison``), block tables, seq_lens, query_start_loc (+2 padding tokens)."""
    blocks_per_seq = [-(-s // BLOCK_SIZE) for s, _ in seqs]
    num_blocks = sum(blocks_per_seq) + 4
    kv_cache = torch.randn(2, num_blocks, BLOCK_SIZE, num_kv_heads, HEAD_DIM, generator=gen,
                           device="cuda").to(dtype)
    perm = torch.randperm(num_blocks, generator=gen, device="cuda")
    max_blocks = -(-max_model_len // BLOCK_SIZE)
    block_tables = torch.randint(0, num_blocks, (len(seqs), max_blocks), generator=gen,
                                 device="cuda", dtype=torch.int32)
    used = 0
    for i, ((seq_len, _), n) in enumerate(zip(seqs, blocks_per_seq)):
        block_tables[i, :n] = perm[used:used + n].to(torch.int32)
        if poison and seq_len % BLOCK_SIZE:  # stale slots at the end of the last block
            kv_cache[:, perm[used + n - 1], seq_len % BLOCK_SIZE:] = float("nan")
        used += n
    if poison:
        kv_cache[:, perm[used:]] = float("nan")  # blocks no sequence owns
    query_lens = torch.tensor([n for _, n in seqs], device="cuda")
    query_start_loc = torch.zeros(len(seqs) + 1, dtype=torch.int32, device="cuda")
    query_start_loc[1:] = query_lens.cumsum(0)
    num_tokens = int(query_lens.sum()) + 2
    q = torch.randn(num_tokens, NUM_HEADS, HEAD_DIM, generator=gen, device="cuda").to(dtype)
    seq_lens = torch.tensor([s for s, _ in seqs], dtype=torch.int32, device="cuda")
    return q, kv_cache, block_tables, seq_lens, query_start_loc


def _attention_reference(q, kv_cache, block_tables, seq_lens, query_start_loc, max_query_len,
                         max_seq_len, scale):
    """float64 on the CPU over the sequences with a context; zeros elsewhere."""
    q64, kv64 = q.cpu().double(), torch.nan_to_num(kv_cache.cpu().double())
    starts, lens = query_start_loc.cpu(), seq_lens.cpu()
    live = (lens > 0).nonzero().view(-1).tolist()
    tokens = torch.cat([torch.arange(int(starts[i]), int(starts[i + 1])) for i in live])
    live_starts = torch.zeros(len(live) + 1, dtype=torch.int32)
    live_starts[1:] = (starts[1:] - starts[:-1])[live].cumsum(0)
    ref = torch.zeros(q64.shape, dtype=torch.float64)
    ref[tokens] = torch.ops.spmd.paged_attention(
        q64[tokens], kv64, block_tables.cpu()[live], lens[live], live_starts, max_query_len,
        max_seq_len, scale)
    return ref


def _cases(dtype, gen):
    """(op name, shape label, CUDA args, output shapes/dtypes to poison)."""
    def randn(*shape):
        return torch.randn(*shape, generator=gen, device="cuda").to(dtype)

    tokens = 2048
    x, residual, weight = randn(tokens, HIDDEN), randn(tokens, HIDDEN), randn(HIDDEN)
    yield "rms_norm", f"{tokens}x{HIDDEN}", (x, weight, 1e-6), [((tokens, HIDDEN), dtype)]
    yield ("fused_add_rms_norm", f"{tokens}x{HIDDEN}", (x, residual, weight, 1e-6),
           [((tokens, HIDDEN), dtype)] * 2)
    yield ("silu_and_mul", f"{tokens}x{2 * INTERMEDIATE}", (randn(tokens, 2 * INTERMEDIATE),),
           [((tokens, INTERMEDIATE), dtype)])
    cache = ops.build_cos_sin_cache(HEAD_DIM, 4096, 10000.0, None, dtype).cuda()
    positions = torch.randint(0, 4096, (tokens,), generator=gen, device="cuda")
    for num_kv_heads in (32, 8):
        kv_size = num_kv_heads * HEAD_DIM
        q, k, v = randn(tokens, HIDDEN + 2 * kv_size).split([HIDDEN, kv_size, kv_size], -1)
        yield ("rotary_embedding", f"T{tokens} {NUM_HEADS}/{num_kv_heads}x{HEAD_DIM} split",
               (positions, q, k, cache, HEAD_DIM), [((tokens, HIDDEN), dtype),
                                                     ((tokens, kv_size), dtype)])
        num_blocks = 4096
        kv_cache = torch.full((2, num_blocks, BLOCK_SIZE, num_kv_heads, HEAD_DIM), float("nan"),
                              dtype=dtype, device="cuda")
        slots = torch.randperm(num_blocks * BLOCK_SIZE, generator=gen, device="cuda")[:tokens]
        slots[::7] = -1
        yield ("write_kv_cache", f"T{tokens} kv{num_kv_heads}x{HEAD_DIM}",
               (k.view(tokens, num_kv_heads, HEAD_DIM), v.view(tokens, num_kv_heads, HEAD_DIM),
                kv_cache, slots), [])
        max_model_len = 4096
        lens = torch.randint(1, max_model_len, (62,), generator=gen, device="cuda").tolist()
        decode = [(s, 1) for s in lens] + [(0, 1), (0, 1)]  # two CUDA-graph padding rows
        yield ("paged_attention", f"decode S64 L<=4096 {NUM_HEADS}/{num_kv_heads}",
               (*_paged_batch(decode, num_kv_heads, dtype, gen, max_model_len), 1,
                max_model_len, HEAD_DIM**-0.5), [])
        mixed = [(1000, 1000), (700, 300), (2000, 37), (513, 513)] + [(s, 1) for s in lens[:8]]
        yield ("paged_attention", f"mixed 4 prefill+8 decode {NUM_HEADS}/{num_kv_heads}",
               (*_paged_batch(mixed, num_kv_heads, dtype, gen, max_model_len), 1000,
                max_model_len, HEAD_DIM**-0.5), [])


def _check_case(name, shape, args, poison, dtype) -> Result:
    op = getattr(torch.ops.spmd, name)
    eager = getattr(ops, f"_{name}")._init_fn
    if name == "write_kv_cache":
        key, value, kv_cache, slots = args
        op(*args)
        written, keep = kv_cache.view(2, -1, *kv_cache.shape[3:]), slots >= 0
        expected = torch.stack([key[keep], value[keep]]).to(dtype)
        err = _rel_err(written[:, slots[keep]], expected)
        untouched = torch.ones(written.shape[1], dtype=torch.bool, device="cuda")
        untouched[slots[keep]] = False
        ok = err == 0.0 and bool(written[:, untouched].isnan().all())
        note = "" if ok else "wrong slots written"
    else:
        _poison_next_alloc(*poison)
        outs = op(*args)
        torch.cuda.synchronize()
        outs = outs if isinstance(outs, tuple) else (outs,)
        if name == "paged_attention":
            refs = (_attention_reference(*args),)
        else:
            refs = getattr(torch.ops.spmd, name)(*_cpu64(args))
            refs = refs if isinstance(refs, tuple) else (refs,)
        err = max(_rel_err(o, r) for o, r in zip(outs, refs))
        ok, note = err <= TOLERANCE[dtype], ""
        if name == "paged_attention" and not ok:
            note = "NaN/unwritten" if err == float("inf") else "error"
    kernel_us = _bench_us(lambda: op(*args))
    eager_args = args
    if name == "paged_attention":  # the eager body needs finite stale slots (0 * NaN)
        eager_args = (args[0], torch.nan_to_num(args[1]), *args[2:])
    torch_us = _bench_us(lambda: eager(*eager_args))
    return Result(name, str(dtype).removeprefix("torch."), shape, err, kernel_us, torch_us, ok, note)


def _opchecks() -> list[str]:
    """opcheck on small CUDA inputs; returns the failures."""
    gen = torch.Generator(device="cuda").manual_seed(1)
    failures = []
    for dtype in (torch.float32, torch.bfloat16):
        def randn(*shape):
            return torch.randn(*shape, generator=gen, device="cuda").to(dtype)

        x, w = randn(5, 256), randn(256)
        q, k, v = randn(5, 4 * 64 + 2 * 2 * 64).split([256, 128, 128], -1)
        cache = ops.build_cos_sin_cache(64, 64, 10000.0, None, dtype).cuda()
        positions = torch.randint(0, 64, (5,), device="cuda")
        kv_cache = torch.zeros(2, 8, BLOCK_SIZE, 2, 64, dtype=dtype, device="cuda")
        slots = torch.tensor([3, -1, 40, 41, 100], device="cuda")
        batch = _paged_batch([(20, 5), (33, 1)], 2, dtype, gen, 64, poison=False)
        q_attn = batch[0][:, :4].contiguous()
        decode = _paged_batch([(20, 1), (0, 1), (70, 1)], 2, dtype, gen, 128, poison=False)
        cases = [
            ("rms_norm", (x, w, 1e-6)),
            ("fused_add_rms_norm", (x, randn(5, 256), w, 1e-6)),
            ("silu_and_mul", (x,)),
            ("rotary_embedding", (positions, q, k, cache, 64)),
            ("write_kv_cache", (k.reshape(5, 2, 64), v.reshape(5, 2, 64), kv_cache, slots)),
            ("paged_attention", (q_attn, *batch[1:], 5, 64, 0.125)),
            ("paged_attention", (decode[0][:, :4].contiguous(), *decode[1:], 1, 128, 0.125)),
        ]
        for name, args in cases:
            try:
                torch.library.opcheck(getattr(torch.ops.spmd, name), args, test_utils=OPCHECK_UTILS)
            except Exception as exc:  # noqa: BLE001 (report every op, then fail)
                failures.append(f"opcheck {name} {dtype}: {exc}")
    return failures


def _decode_bandwidth(num_kv_heads: int, batch: int, context: int, max_model_len: int) -> dict:
    dtype = torch.bfloat16
    gen = torch.Generator(device="cuda").manual_seed(2)
    args = _paged_batch([(context, 1)] * batch, num_kv_heads, dtype, gen, max_model_len,
                        poison=False)
    us = _bench_us(lambda: torch.ops.spmd.paged_attention(*args, 1, max_model_len, HEAD_DIM**-0.5))
    kv_bytes = 2 * batch * context * num_kv_heads * HEAD_DIM * dtype.itemsize
    return {"batch": batch, "context": context, "max_seq_len": max_model_len,
            "heads": f"{NUM_HEADS}/{num_kv_heads}", "us": us, "kv_GB_per_s": kv_bytes / us / 1e3}


def _fp8_cache_from(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantizes a (finite) cache with the reference quantizer, on the GPU."""
    return ops.fp8_quantize_cache(kv_cache)


def _fp8_checks() -> tuple[list[dict], list[str]]:
    gen = torch.Generator(device="cuda").manual_seed(3)
    rows, failures = [], []
    # The write kernel against the reference (CPU) quantizer: same bytes, same scales.
    tokens, nkv = 777, 8
    key = torch.randn(tokens, nkv, HEAD_DIM, generator=gen, device="cuda").to(torch.bfloat16) * 3
    value = torch.randn(tokens, nkv, HEAD_DIM, generator=gen, device="cuda").to(torch.bfloat16) / 5
    slots = torch.randperm(64 * BLOCK_SIZE, generator=gen, device="cuda")[:tokens]
    slots[::37] = -1
    cache = torch.zeros(2, 64, BLOCK_SIZE, nkv, HEAD_DIM, dtype=torch.float8_e4m3fn, device="cuda")
    scales = torch.zeros(2, 64, nkv, BLOCK_SIZE, device="cuda")
    torch.ops.spmd.write_kv_cache_fp8(key, value, cache, scales, slots)
    ref_cache, ref_scales = torch.zeros_like(cache, device="cpu"), torch.zeros_like(scales, device="cpu")
    ops._write_kv_cache_fp8(key.cpu(), value.cpu(), ref_cache, ref_scales, slots.cpu())
    byte_mismatch = float((cache.cpu().view(torch.uint8) != ref_cache.view(torch.uint8))
                          .float().mean())
    scale_err = float((scales.cpu() - ref_scales).abs().max() / ref_scales.abs().max())
    ok = byte_mismatch < 1e-3 and scale_err < 1e-6
    rows.append(dict(check="write_kv_cache fp8", byte_mismatch_share=byte_mismatch,
                     scale_rel_err=scale_err, ok=ok))
    if not ok:
        failures.append(f"fp8 write: {byte_mismatch:.2e} of bytes differ, scales {scale_err:.2e}")
    # Attention over an FP8 cache against float64 over the dequantized cache.
    for label, seqs, max_query_len in (
            ("decode S64", [(int(n), 1) for n in torch.randint(1, 4096, (64,), generator=gen,
                                                               device="cuda")], 1),
            ("mixed", [(1000, 1000), (700, 300), (2000, 37), (50, 1), (3000, 1)], 1000)):
        q, kv, tables, lens, starts = _paged_batch(seqs, nkv, torch.bfloat16, gen, 4096,
                                                   poison=False)
        values, kv_scales = _fp8_cache_from(kv)
        out = torch.ops.spmd.paged_attention(q, values, tables, lens, starts, max_query_len,
                                             4096, HEAD_DIM**-0.5, kv_scales)
        dequantized = ops.fp8_dequantize_cache(values, kv_scales, torch.float64)
        ref = _attention_reference(q, dequantized, tables, lens, starts, max_query_len, 4096,
                                   HEAD_DIM**-0.5)
        err = _rel_err(out, ref)
        ok = err <= TOLERANCE[torch.bfloat16]
        rows.append(dict(check=f"paged_attention fp8 {label}", rel_err=err, ok=ok))
        if not ok:
            failures.append(f"fp8 attention {label}: rel err {err:.2e}")
    # Decode at batch 256: FP8 next to bf16 (half the bytes; the scales add 1/32).
    for context in (512, 2048):
        args = _paged_batch([(context, 1)] * 256, nkv, torch.bfloat16, gen, context, poison=False)
        values, kv_scales = _fp8_cache_from(args[1])
        us_bf16 = _bench_us(lambda: torch.ops.spmd.paged_attention(
            *args, 1, context, HEAD_DIM**-0.5))
        us_fp8 = _bench_us(lambda: torch.ops.spmd.paged_attention(
            args[0], values, *args[2:], 1, context, HEAD_DIM**-0.5, kv_scales))
        fp8_bytes = 256 * context * nkv * (2 * HEAD_DIM + 2 * 4)
        rows.append(dict(check=f"decode fp8 vs bf16 B256 L{context} {NUM_HEADS}/{nkv}",
                         us_bf16=us_bf16, us_fp8=us_fp8, speedup=us_bf16 / us_fp8,
                         fp8_GB_per_s=fp8_bytes / us_fp8 / 1e3, ok=True))
        torch.cuda.empty_cache()
    return rows, failures


def _moe_checks() -> tuple[list[dict], list[str]]:
    dtype = torch.bfloat16
    gen = torch.Generator(device="cuda").manual_seed(4)
    rows, failures = [], []

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, device="cuda") * scale).to(dtype)

    def routing(tokens, experts, top_k):
        logits = torch.randn(tokens, experts, generator=gen, device="cuda")
        return ops.moe_routing(logits, top_k, renormalize=True)

    small = (randn(5, 256), randn(8, 128, 256), randn(8, 256, 64), *routing(5, 8, 2))
    try:
        torch.library.opcheck(torch.ops.spmd.fused_moe, small, test_utils=OPCHECK_UTILS)
    except Exception as exc:  # noqa: BLE001 (report it with the rest)
        failures.append(f"opcheck fused_moe: {exc}")
    for model, hidden, inter, experts, top_k in MOE_SHAPES:
        w13 = randn(experts, 2 * inter, hidden, scale=hidden**-0.5)
        w2 = randn(experts, hidden, inter, scale=inter**-0.5)
        w13_64, w2_64 = w13.cpu().double(), w2.cpu().double()  # the reference's (GBs, once)
        for tokens in MOE_TOKENS:
            x, (weights, ids) = randn(tokens, hidden), routing(tokens, experts, top_k)
            args = (x, w13, w2, weights, ids)
            pairs = tokens * top_k
            err, ok, graph_ok = None, True, None
            if tokens <= MOE_MAX_CHECKED_TOKENS:
                _poison_next_alloc(((tokens, hidden), dtype), ((pairs, inter), dtype),
                                   ((pairs, hidden), torch.float32))
                ref = torch.ops.spmd.fused_moe(x.cpu().double(), w13_64, w2_64, weights.cpu(),
                                               ids.cpu())
                err = _rel_err(torch.ops.spmd.fused_moe(*args), ref)
                ok = err <= TOLERANCE[dtype]
            if tokens <= MOE_MAX_GRAPH_TOKENS:
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    torch.ops.spmd.fused_moe(*args)  # compiles outside the capture
                torch.cuda.current_stream().wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    graph_out = torch.ops.spmd.fused_moe(*args)
                # New inputs, in place: the replay reads them.
                for buffer, new in zip((x, weights, ids),
                                       (randn(tokens, hidden), *routing(tokens, experts, top_k))):
                    buffer.copy_(new)
                graph.replay()
                graph_ok = torch.equal(graph_out, torch.ops.spmd.fused_moe(*args))
                del graph
            kernel_us = _bench_us(lambda: torch.ops.spmd.fused_moe(*args))
            torch_us = _bench_us(lambda: ops._fused_moe_ref(*args))
            hit = int(torch.unique(ids).numel())
            moved = (hit * 3 * hidden * inter + 2 * tokens * hidden + 2 * pairs * inter) * 2
            moved += 2 * pairs * hidden * 4  # the float32 per-pair outputs, written and summed
            rows.append(dict(model=model, tokens=tokens, experts_hit=hit, rel_err=err,
                             kernel_us=kernel_us, torch_us=torch_us,
                             GB_per_s=moved / kernel_us / 1e3,
                             TFLOP_per_s=2 * pairs * 3 * hidden * inter / kernel_us / 1e6,
                             cuda_graph=graph_ok, ok=ok and graph_ok is not False))
            if not ok:
                failures.append(f"fused_moe {model} T{tokens}: rel err {err:.2e}")
            if graph_ok is False:
                failures.append(f"fused_moe {model} T{tokens}: CUDA graph replay differs")
        del w13, w2, w13_64, w2_64
        torch.cuda.empty_cache()
    return rows, failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--skip-bandwidth", action="store_true")
    parser.add_argument("--skip-fp8", action="store_true")
    parser.add_argument("--skip-moe", action="store_true")
    parser.add_argument("--only-moe", action="store_true", help="the fused_moe section alone")
    args = parser.parse_args(argv)
    if args.only_moe:
        args.dtypes, args.skip_bandwidth, args.skip_fp8, args.skip_moe = "", True, True, False
    if not torch.cuda.is_available():
        print("check_kernels needs a CUDA GPU", file=sys.stderr)
        return 2
    import workers.triton_moe  # noqa: F401  (registers the CUDA kernels)
    import workers.triton_ops  # noqa: F401

    results, failures = [], []
    for dtype_name in filter(None, args.dtypes.split(",")):
        dtype = getattr(torch, dtype_name)
        gen = torch.Generator(device="cuda").manual_seed(0)
        for name, shape, case_args, poison in _cases(dtype, gen):
            result = _check_case(name, shape, case_args, poison, dtype)
            print(f"{result.op:20s} {result.dtype:9s} {result.shape:36s} {result.rel_err:.2e} "
                  f"{'ok' if result.ok else 'FAIL ' + result.note}", flush=True)
            results.append(result)
            torch.cuda.empty_cache()
    failures += [f"{r.op} {r.dtype} {r.shape}: rel err {r.rel_err:.2e} {r.note}"
                 for r in results if not r.ok]
    failures += _opchecks() if not args.only_moe else []
    bandwidth = []
    if not args.skip_bandwidth:
        for num_kv_heads in (32, 8):
            for context, max_model_len in ((512, 512), (2048, 2048), (2048, 8192)):
                bandwidth.append(_decode_bandwidth(num_kv_heads, 256, context, max_model_len))
                torch.cuda.empty_cache()

    print(f"\n{torch.cuda.get_device_name()}")
    print(f"{'op':20s} {'dtype':9s} {'shape':36s} {'rel err':>9s} {'µs kernel':>10s} "
          f"{'µs torch':>10s}  ok")
    for r in results:
        print(f"{r.op:20s} {r.dtype:9s} {r.shape:36s} {r.rel_err:9.2e} {r.kernel_us:10.1f} "
              f"{r.torch_us:10.1f}  {'ok' if r.ok else 'FAIL'}")
    if bandwidth:
        print(f"\n{'decode bf16':12s} {'heads':>6s} {'batch':>6s} {'context':>8s} "
              f"{'max_seq_len':>12s} {'µs':>9s} {'KV GB/s':>9s}")
        for b in bandwidth:
            print(f"{'':12s} {b['heads']:>6s} {b['batch']:6d} {b['context']:8d} "
                  f"{b['max_seq_len']:12d} {b['us']:9.1f} {b['kv_GB_per_s']:9.0f}")
    fp8_rows = []
    if not args.skip_fp8:
        fp8_rows, fp8_failures = _fp8_checks()
        failures += fp8_failures
        print()
        for row in fp8_rows:
            print("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                            for k, v in row.items()))
    moe_rows = []
    if not args.skip_moe:
        moe_rows, moe_failures = _moe_checks()
        failures += moe_failures
        print(f"\n{'fused_moe bf16':16s} {'tokens':>6s} {'experts':>7s} {'rel err':>9s} "
              f"{'µs kernel':>10s} {'µs torch':>10s} {'GB/s':>7s} {'TFLOP/s':>8s} "
              f"{'graph':>6s}  ok")
        for r in moe_rows:
            err = "-" if r["rel_err"] is None else f"{r['rel_err']:.2e}"
            graph = {None: "-", True: "ok", False: "FAIL"}[r["cuda_graph"]]
            print(f"{r['model']:16s} {r['tokens']:6d} {r['experts_hit']:7d} {err:>9s} "
                  f"{r['kernel_us']:10.1f} {r['torch_us']:10.1f} {r['GB_per_s']:7.0f} "
                  f"{r['TFLOP_per_s']:8.1f} {graph:>6s}  {'ok' if r['ok'] else 'FAIL'}")
    for failure in failures:
        print("FAIL", failure)
    print(json.dumps({"device": torch.cuda.get_device_name(),
                      "results": [r.__dict__ for r in results], "decode_bandwidth": bandwidth,
                      "fp8": fp8_rows, "fused_moe": moe_rows, "failures": failures}))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
