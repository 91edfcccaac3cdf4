"""Triton kernels (``workers.triton_ops``) against the reference ops, on the CPU.

The kernels run in Triton's interpreter (``TRITON_INTERPRET=1``), which executes
each program with numpy: it checks indexing, masking and numerics, not GPU
compilation. ``test_kernels_compile_for_sm90`` covers the latter by compiling every
kernel to a Hopper cubin in a subprocess (no GPU needed). The interpreter's bf16
``tl.dot`` is broken (it multiplies the raw uint16 bits), so attention is checked in
fp32 and fp16, which share the bf16 code path; elementwise kernels also run in bf16.
"""


import pytest
import torch

pytest.importorskip("triton")

from tests.triton_interpreter import interpreter_fixture  # noqa: E402
from tests.triton_sm90 import compile_for_sm90  # noqa: E402
from workers import ops  # noqa: E402

interpreter = interpreter_fixture(__file__)


def _triton_ops():
    from workers import triton_ops

    assert type(triton_ops._rms_norm_kernel).__name__ == "InterpretedFunction"
    return triton_ops


BLOCK_SIZE = 16
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape, dtype=torch.float32, gen=None) -> torch.Tensor:
    return torch.randn(*shape, generator=gen).to(dtype)


def _assert_close(actual, expected, dtype):
    # Low precision: a kernel may round an intermediate differently from eager by one ulp.
    rtol, atol = {torch.float32: (1e-5, 1e-6), torch.float16: (4e-3, 4e-3),
                  torch.bfloat16: (3e-2, 2e-2)}[dtype]
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


# --------------------------------------------------------------------------- elementwise


def _check_rms_norms(dtype_name):
    triton_ops, dtype, gen = _triton_ops(), DTYPES[dtype_name], _gen(0)
    for tokens, hidden in [(1, 16), (7, 96), (3, 4096)]:
        x = _randn(tokens, hidden, dtype=dtype, gen=gen)
        residual = _randn(tokens, hidden, dtype=dtype, gen=gen)
        weight = _randn(hidden, dtype=dtype, gen=gen)
        _assert_close(triton_ops.rms_norm(x, weight, 1e-6), ops._rms_norm(x, weight, 1e-6), dtype)
        actual = triton_ops.fused_add_rms_norm(x, residual, weight, 1e-6)
        expected = ops._fused_add_rms_norm(x, residual, weight, 1e-6)
        for a, e in zip(actual, expected):
            assert a.dtype == e.dtype
            _assert_close(a, e, dtype)
    # A float32 weight on a low-precision input promotes the output, as in eager.
    x = _randn(4, 64, dtype=dtype, gen=gen)
    weight = _randn(64, gen=gen)
    out = triton_ops.rms_norm(x, weight, 1e-5)
    assert out.dtype == torch.promote_types(dtype, torch.float32)
    _assert_close(out, ops._rms_norm(x, weight, 1e-5), dtype)


def _check_silu_and_mul(dtype_name):
    triton_ops, dtype, gen = _triton_ops(), DTYPES[dtype_name], _gen(1)
    for tokens, width in [(1, 8), (5, 48), (3, 1500)]:
        x = _randn(tokens, 2 * width + 4, dtype=dtype, gen=gen)[:, 4:]  # row-strided view
        _assert_close(triton_ops.silu_and_mul(x), ops._silu_and_mul(x), dtype)


def _check_rotary_embedding(dtype_name, num_heads, num_kv_heads, head_dim):
    triton_ops, dtype, gen = _triton_ops(), DTYPES[dtype_name], _gen(2)
    cache = ops.build_cos_sin_cache(head_dim, 256, 10000.0, None, dtype)
    qkv = _randn(9, (num_heads + 2 * num_kv_heads) * head_dim, dtype=dtype, gen=gen)
    q, k, _ = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], -1)
    positions = torch.randint(0, 256, (9,), generator=gen)
    actual = triton_ops.rotary_embedding(positions, q, k, cache, head_dim)
    expected = ops._rotary_embedding(positions, q, k, cache, head_dim)
    for a, e in zip(actual, expected):
        assert a.is_contiguous() and a.shape == e.shape
        _assert_close(a, e, dtype)


def _check_write_kv_cache():
    triton_ops, gen = _triton_ops(), _gen(3)
    num_blocks, num_kv_heads, head_dim, tokens = 6, 2, 32, 11
    kv_cache = _randn(2, num_blocks, BLOCK_SIZE, num_kv_heads, head_dim, gen=gen)
    kv = _randn(tokens, 3 * num_kv_heads * head_dim, gen=gen)
    _, key, value = kv.view(tokens, 3 * num_kv_heads, head_dim).split(num_kv_heads, dim=1)
    slots = torch.randperm(num_blocks * BLOCK_SIZE, generator=gen)[:tokens]
    slots[[2, 7]] = -1
    expected = kv_cache.clone()
    ops._write_kv_cache(key, value, expected, slots)
    triton_ops.write_kv_cache(key, value, kv_cache, slots)
    assert torch.equal(kv_cache, expected)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_rms_norms(interpreter, dtype):
    interpreter.run("_check_rms_norms", dtype)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_silu_and_mul(interpreter, dtype):
    interpreter.run("_check_silu_and_mul", dtype)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(4, 2, 16), (2, 2, 64), (4, 1, 128)])
def test_rotary_embedding_on_split_qkv(interpreter, dtype, num_heads, num_kv_heads, head_dim):
    interpreter.run("_check_rotary_embedding", dtype, num_heads, num_kv_heads, head_dim)


def test_write_kv_cache_skips_padding_slots(interpreter):
    interpreter.run("_check_write_kv_cache")


# --------------------------------------------------------------------------- attention


def _batch(seqs, num_heads, num_kv_heads, head_dim, dtype, gen, padding_tokens=3):
    """A random paged batch: ``seqs`` is a list of (seq_len, query_len); blocks are shuffled
    and table entries past a sequence's last block hold stale (valid) block ids."""
    max_blocks = max(1, max(-(-seq_len // BLOCK_SIZE) for seq_len, _ in seqs))
    num_blocks = sum(-(-seq_len // BLOCK_SIZE) for seq_len, _ in seqs) + 2
    kv_cache = _randn(2, num_blocks, BLOCK_SIZE, num_kv_heads, head_dim, dtype=dtype, gen=gen)
    perm = torch.randperm(num_blocks, generator=gen)
    block_tables = torch.randint(0, num_blocks, (len(seqs), max_blocks), generator=gen)
    used = 0
    for i, (seq_len, _) in enumerate(seqs):
        n = -(-seq_len // BLOCK_SIZE)
        block_tables[i, :n] = perm[used:used + n]
        used += n
    query_lens = torch.tensor([q for _, q in seqs])
    query_start_loc = torch.zeros(len(seqs) + 1, dtype=torch.int32)
    query_start_loc[1:] = query_lens.cumsum(0)
    num_tokens = int(query_start_loc[-1]) + padding_tokens
    q = _randn(num_tokens, num_heads, head_dim, dtype=dtype, gen=gen)
    seq_lens = torch.tensor([s for s, _ in seqs], dtype=torch.int32)
    return q, kv_cache, block_tables.to(torch.int32), seq_lens, query_start_loc


def _check_attention(seqs, num_heads, num_kv_heads, head_dim, dtype_name, seed, max_seq_len=None,
                     partition_size=None, decode_config=None):
    triton_ops, dtype, gen = _triton_ops(), DTYPES[dtype_name], _gen(seed)
    q, kv_cache, block_tables, seq_lens, query_start_loc = _batch(
        seqs, num_heads, num_kv_heads, head_dim, dtype, gen)
    max_query_len = max(n for _, n in seqs)
    max_seq_len = max_seq_len or max(s for s, _ in seqs)
    scale = head_dim**-0.5
    kwargs = {"partition_size": partition_size} if partition_size else {}
    if decode_config:
        kwargs["decode_config"] = tuple(decode_config)
    actual = triton_ops.paged_attention(q, kv_cache, block_tables, seq_lens, query_start_loc,
                                        max_query_len, max_seq_len, scale, **kwargs)
    assert actual.dtype == dtype and torch.isfinite(actual).all()
    # Reference in float64, over the sequences that have a context (seq_len > 0); the rest,
    # and the batch padding past query_start_loc[-1], must be zero.
    live = (seq_lens > 0).nonzero().view(-1).tolist()
    live_tokens = torch.cat([torch.arange(int(query_start_loc[i]), int(query_start_loc[i + 1]))
                             for i in live])
    live_starts = torch.zeros(len(live) + 1, dtype=torch.int32)
    live_starts[1:] = (query_start_loc[1:] - query_start_loc[:-1])[live].cumsum(0)
    ref = ops._paged_attention(q[live_tokens].double(), kv_cache.double(), block_tables[live],
                               seq_lens[live], live_starts, max_query_len, max_seq_len, scale)
    expected = torch.zeros(q.shape, dtype=torch.float64)
    expected[live_tokens] = ref
    rel = float((actual.double() - expected).norm() / expected.norm())
    assert rel < (1e-6 if dtype == torch.float32 else 1e-3), rel
    _assert_close(actual, expected.to(dtype), dtype)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_decode_gqa_with_padding_rows(interpreter, dtype):
    # seq_len 0 is a CUDA-graph padding row: zeros, not NaN. The grid covers max_model_len.
    seqs = [(17, 1), (0, 1), (1, 1), (100, 1), (64, 1)]
    interpreter.run("_check_attention", seqs, 4, 2, 16, dtype, 4, 256, 64)
    interpreter.run("_check_attention", seqs, 8, 2, 32, dtype, 5, 200)


def test_decode_long_context_spans_partitions(interpreter):
    interpreter.run("_check_attention", [(1100, 1), (530, 1), (3, 1)], 2, 2, 32, "float32", 6, 1200)


@pytest.mark.parametrize("block_n", [32, 128])
def test_decode_tile_override(interpreter, block_n):
    # bench.sweep_decode's override of DECODE_CONFIG: other tiles, same attention.
    interpreter.run("_check_attention", [(300, 1), (17, 1), (64, 1)], 4, 2, 32, "float32", 11,
                    300, 256, [block_n, 2, 2])


@pytest.mark.parametrize("head_dim", [64, 128])
def test_decode_mha_large_head_dim(interpreter, head_dim):
    interpreter.run("_check_attention", [(40, 1), (77, 1)], 2, 2, head_dim, "float32", 7, 128, 64)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_mixed_prefill_and_decode(interpreter, dtype):
    # Full prompts, a chunked prefill over cached context, decodes and an empty sequence.
    seqs = [(40, 40), (70, 5), (33, 1), (0, 0), (130, 45), (1, 1)]
    interpreter.run("_check_attention", seqs, 4, 2, 16, dtype, 8)
    interpreter.run("_check_attention", seqs[:3], 4, 4, 32, dtype, 9)
    # The decode rows of a mixed step go to the decode kernel: long ones across partitions.
    interpreter.run("_check_attention", [(300, 1), (130, 45), (70, 1), (0, 0), (1, 1)], 4, 2, 16,
                    dtype, 12, None, 64)


def test_prefill_large_head_dim(interpreter):
    interpreter.run("_check_attention", [(50, 50), (20, 3)], 2, 1, 128, "float32", 10)


# --------------------------------------------------------------------------- FP8 KV cache


def _fp8_cache(num_blocks, num_kv_heads, head_dim, gen):
    """An FP8 cache (and its scales) holding random K/V of varied magnitude per head."""
    kv = _randn(2, num_blocks * BLOCK_SIZE, num_kv_heads, head_dim, gen=gen)
    kv *= torch.rand(2, num_blocks * BLOCK_SIZE, num_kv_heads, 1, generator=gen) * 8
    cache = torch.zeros(2, num_blocks, BLOCK_SIZE, num_kv_heads, head_dim,
                        dtype=torch.float8_e4m3fn)
    scales = torch.zeros(2, num_blocks, num_kv_heads, BLOCK_SIZE)
    ops._write_kv_cache_fp8(kv[0], kv[1], cache, scales, torch.arange(num_blocks * BLOCK_SIZE))
    return kv, cache, scales


def _check_write_kv_cache_fp8():
    triton_ops, gen = _triton_ops(), _gen(13)
    num_blocks, num_kv_heads, head_dim, tokens = 5, 2, 32, 13
    key = _randn(tokens, num_kv_heads, head_dim, gen=gen) * 5
    value = _randn(tokens, num_kv_heads, head_dim, gen=gen) / 7
    key[3] = 0.0  # an all-zero head vector: finite scale, zeros stored
    slots = torch.randperm(num_blocks * BLOCK_SIZE, generator=gen)[:tokens]
    slots[[1, 8]] = -1
    shape = (2, num_blocks, BLOCK_SIZE, num_kv_heads, head_dim)
    expected = torch.zeros(shape, dtype=torch.float8_e4m3fn)
    scale_shape = (2, num_blocks, num_kv_heads, BLOCK_SIZE)
    expected_scales = torch.full(scale_shape, -1.0)
    ops._write_kv_cache_fp8(key, value, expected, expected_scales, slots)
    cache = torch.zeros(shape, dtype=torch.float8_e4m3fn)
    scales = torch.full(scale_shape, -1.0)
    triton_ops.write_kv_cache(key, value, cache, slots, scales)
    torch.testing.assert_close(scales, expected_scales, rtol=1e-6, atol=0)
    # The same e4m3 values, except where the interpreter's float8 conversion loses the
    # carry of a round-up to a power of two (126.3 -> 64 instead of 128; the GPU's cvt.rn
    # does not, see bench/check_kernels.py): there it stores exactly half.
    actual, want = cache.float(), expected.float()
    carry_bug = (actual * 2 == want) & (torch.frexp(want).mantissa.abs() == 0.5)
    assert torch.equal(torch.where(carry_bug, want, actual), want)
    assert carry_bug.float().mean() < 0.01
    # Dequantized, every stored vector is the input within e4m3's half-ulp (2^-4 relative).
    back = ops.fp8_dequantize_cache(expected, scales, torch.float32).view(
        2, -1, num_kv_heads, head_dim)
    for i, x in enumerate((key, value)):
        keep = slots >= 0
        err = (back[i][slots[keep]] - x[keep]).abs()
        assert (err <= x[keep].abs().amax(-1, keepdim=True) * 2**-4 + 1e-7).all()


def test_write_kv_cache_fp8_quantizes_per_token_and_head(interpreter):
    interpreter.run("_check_write_kv_cache_fp8")


def _check_attention_fp8(seqs, num_heads, num_kv_heads, head_dim, dtype_name, seed,
                         max_seq_len=None):
    """Kernel on an FP8 cache == the reference on the same cache == the reference on the
    cache dequantized (plain), all within the attention dtype's tolerance; and close to
    attention over the unquantized K/V."""
    triton_ops, dtype, gen = _triton_ops(), DTYPES[dtype_name], _gen(seed)
    q, _, block_tables, seq_lens, query_start_loc = _batch(
        seqs, num_heads, num_kv_heads, head_dim, dtype, gen)
    num_blocks = int(block_tables.max()) + 1
    kv, cache, scales = _fp8_cache(num_blocks, num_kv_heads, head_dim, gen)
    max_query_len = max(n for _, n in seqs)
    max_seq_len = max_seq_len or max(s for s, _ in seqs)
    scale = head_dim**-0.5
    args = (block_tables, seq_lens, query_start_loc, max_query_len, max_seq_len, scale)
    actual = triton_ops.paged_attention(q, cache, *args, scales)
    assert actual.dtype == dtype and torch.isfinite(actual).all()
    live = int(query_start_loc[-1])
    reference = ops._paged_attention(q.double(), cache, *args, scales)
    dequantized = ops.fp8_dequantize_cache(cache, scales, torch.float64)
    plain = ops._paged_attention(q.double(), dequantized, *args)
    torch.testing.assert_close(reference, plain, rtol=1e-12, atol=1e-12)
    rel = float((actual[:live].double() - reference[:live]).norm() / reference[:live].norm())
    assert rel < (1e-6 if dtype == torch.float32 else 1e-3), rel
    # Scaled-up K/V make larger outputs than _batch's: the absolute slack scales with them.
    tol = 1e-6 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(actual[:live].double(), reference[:live], rtol=10 * tol,
                               atol=tol * float(reference.abs().max()))
    assert (actual[live:] == 0).all()
    exact = ops._paged_attention(q.double(), kv.view(cache.shape).double(), *args)
    rel = float((reference[:live] - exact[:live]).norm() / exact[:live].norm())
    assert rel < 0.1, rel  # e4m3 keeps 3 mantissa bits: up to 6% per element


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_fp8_cache_decode_and_mixed_prefill(interpreter, dtype):
    interpreter.run("_check_attention_fp8", [(17, 1), (1, 1), (100, 1), (64, 1)], 4, 2, 16,
                    dtype, 21, 256)
    interpreter.run("_check_attention_fp8", [(40, 40), (70, 5), (33, 1), (130, 45)], 4, 2, 32,
                    dtype, 22)


# --------------------------------------------------------------------------- compilation

_COMPILE_SCRIPT = """
    from workers import triton_ops as T

    INDEX_PTRS = {"positions_ptr": "i64", "slot_mapping_ptr": "i64", "block_tables_ptr": "i32",
                  "seq_lens_ptr": "i32", "query_start_loc_ptr": "i32", "part_acc_ptr": "fp32",
                  "part_max_ptr": "fp32", "part_sum_ptr": "fp32", "scales_ptr": "fp32"}
    FLOATS = ("eps", "scale")
    build_any = build

    def build(kernel, dtype, constexprs, num_warps=4, ptrs=None):
        build_any(kernel, dtype, constexprs, num_warps, ptrs={**INDEX_PTRS, **(ptrs or {})},
                  floats=FLOATS)

    for dtype, fp8 in (("bf16", False), ("fp32", False), ("bf16", True)):
        precision = "ieee" if dtype == "fp32" else "tf32"
        # An FP8 cache: e4m3 values (and float32 scales) beside bf16 queries.
        cache = {"cache_ptr": "fp8e4nv"} if fp8 else {}
        build(T._rms_norm_kernel, dtype, {"HAS_RESIDUAL": True, "BLOCK": 4096}, 8)
        build(T._silu_and_mul_kernel, dtype, {"BLOCK": 1024})
        build(T._rotary_kernel, dtype, {"HEAD_DIM": 128, "HEADS_PAD": 32, "HALF_PAD": 64})
        build(T._write_kv_cache_kernel, dtype,
              {"BLOCK_SIZE": 16, "HEAD_DIM": 128, "HEADS_PAD": 8, "HD_PAD": 128, "FP8": fp8},
              ptrs=cache)
        # The decode tile and launch shape the kernel runs with (DECODE_CONFIG).
        block_n, warps, _ = T.DECODE_CONFIG["fp8" if fp8 else "bf16"]
        for head_dim in (16, 128):
            build(T._decode_kernel, dtype,
                  {"GROUP": 4, "GROUP_PAD": 16, "HEAD_DIM": head_dim, "HD_PAD": head_dim,
                   "BLOCK_SIZE": 16, "BLOCK_N": block_n, "PARTITION_SIZE": 512,
                   "SINGLE_PARTITION": False, "DOT_PRECISION": precision, "FP8": fp8,
                   "DOT16": fp8},
                  warps, ptrs=cache)
            block_m, block_n = (32, 32) if dtype == "fp32" else (128, 64)
            build(T._prefill_kernel, dtype,
                  {"GROUP": 4, "HEAD_DIM": head_dim, "HD_PAD": head_dim, "BLOCK_SIZE": 16,
                   "BLOCK_M": block_m, "BLOCK_N": block_n, "DOT_PRECISION": precision,
                   "FP8": fp8, "DOT16": fp8}, 8, ptrs=cache)
        build(T._decode_merge_kernel, dtype,
              {"HEAD_DIM": 128, "HD_PAD": 128, "PARTS_PAD": 8, "MERGE_BLOCK": 8,
               "PARTITION_SIZE": 512})
"""


def test_kernels_compile_for_sm90():
    """Every kernel lowers to a Hopper cubin within its shared memory (no GPU needed)."""
    compile_for_sm90(_COMPILE_SCRIPT)
