"""The Triton varlen attention kernel (``workers.triton_varlen``) against the CPU op
``spmd::varlen_attention`` (``workers.ops``), run in float64.

On the CPU the kernel runs in Triton's interpreter (``TRITON_INTERPRET=1``) in a child process,
as in ``test_triton_ops.py``; its bf16 ``tl.dot`` is broken (it multiplies raw bits), so it is
checked in fp32 and fp16, which share the bf16 code path. ``test_kernel_compiles_for_sm90``
lowers it to a Hopper cubin (no GPU needed). The CUDA tests (skipped without a GPU) add bf16,
outputs over NaN-poisoned memory, opcheck and a CUDA-graph replay with new sequence bounds.
"""

import contextlib

import pytest
import torch

pytest.importorskip("triton")

from tests.triton_interpreter import interpreter_fixture  # noqa: E402
from tests.triton_sm90 import compile_for_sm90  # noqa: E402
from workers import ops  # noqa: E402

_CUDA = torch.cuda.is_available()
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
REL_TOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1e-2}

interpreter = interpreter_fixture(__file__)


# --------------------------------------------------------------------------- shared checks


@contextlib.contextmanager
def _nan_outputs():
    """``torch.empty_like`` hands out NaN-filled tensors: every output element the kernel
    leaves unwritten shows up (the CPU allocator would mostly hand out zeros)."""
    real = torch.empty_like

    def poisoned(x, *args, **kwargs):
        out = real(x, *args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    torch.empty_like = poisoned
    try:
        yield
    finally:
        torch.empty_like = real


def _problem(lens, num_heads, num_kv_heads, head_dim, dtype, seed, padding_tokens, fused_qkv,
             device):
    """Random q, k, v (views of one fused qkv output when ``fused_qkv``) and cu_seqlens."""
    gen = torch.Generator().manual_seed(seed)
    cu_seqlens = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu_seqlens[1:] = torch.tensor(lens, dtype=torch.int32).cumsum(0)
    num_tokens = int(cu_seqlens[-1]) + padding_tokens
    widths = [num_heads, num_kv_heads, num_kv_heads]
    if fused_qkv:
        qkv = torch.randn(num_tokens, sum(widths), head_dim, generator=gen).to(dtype).to(device)
        q, k, v = qkv.split(widths, dim=1)
    else:
        q, k, v = (torch.randn(num_tokens, n, head_dim, generator=gen).to(dtype).to(device)
                   for n in widths)
    return q, k, v, cu_seqlens.to(device)


def _check_varlen(lens, num_heads, num_kv_heads, head_dim, dtype_name, causal, seed,
                  padding_tokens=3, tiles=None, fused_qkv=False, device="cpu"):
    from workers import triton_varlen

    if device == "cpu":
        assert type(triton_varlen._varlen_attention_kernel).__name__ == "InterpretedFunction"
    dtype = DTYPES[dtype_name]
    q, k, v, cu_seqlens = _problem(lens, num_heads, num_kv_heads, head_dim, dtype, seed,
                                   padding_tokens, fused_qkv, device)
    config = triton_varlen.VarlenConfig(*tiles) if tiles else None
    max_seqlen, scale = max(lens, default=0), head_dim**-0.5
    with _nan_outputs():
        actual = triton_varlen.varlen_attention(q, k, v, cu_seqlens, max_seqlen, scale, causal,
                                                config=config)
    assert actual.dtype == dtype and actual.shape == q.shape
    assert torch.isfinite(actual).all(), "unwritten (NaN) outputs"
    expected = ops._varlen_attention(q.cpu().double(), k.cpu().double(), v.cpu().double(),
                                     cu_seqlens.cpu(), max_seqlen, scale, causal)
    actual = actual.cpu().double()
    num_real = int(cu_seqlens[-1])
    assert torch.equal(actual[num_real:], expected[num_real:]), "batch padding is not zero"
    if num_real:
        rel = float((actual - expected).norm() / expected.norm())
        assert rel < REL_TOL[dtype], rel
        tol = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}[dtype]
        torch.testing.assert_close(actual, expected, rtol=tol, atol=tol)


def _check_batch_invariant(dtype_name, causal, device="cpu"):
    """A sequence's output is bitwise the same alone and packed with others, longer ones too."""
    from workers import triton_varlen

    dtype = DTYPES[dtype_name]
    q, k, v, cu_seqlens = _problem([300, 57, 1, 130], 4, 2, 64, dtype, 11, 2, False, device)
    out = triton_varlen.varlen_attention(q, k, v, cu_seqlens, 300, 0.125, causal)
    rows = slice(300, 357)
    alone = torch.tensor([0, 57], dtype=torch.int32, device=device)
    out_alone = triton_varlen.varlen_attention(q[rows], k[rows], v[rows], alone, 57, 0.125, causal)
    assert torch.equal(out[rows], out_alone)


def _check_registered():
    from workers import triton_varlen  # noqa: F401

    assert torch._C._dispatch_has_kernel_for_dispatch_key("spmd::varlen_attention", "CUDA")


# --------------------------------------------------------------------------- interpreter

# Sequences of 1 token, empty ones, and lengths around the 16/32-wide tiles below.
LENS = [5, 0, 70, 33, 1, 16]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_gqa_small_tiles(interpreter, dtype, causal):
    # 32x16 tiles: several full tiles, masked edges and (causal) diagonal tiles per sequence.
    interpreter.run("_check_varlen", LENS, 4, 2, 16, dtype, causal, 1, 3, [32, 16])


@pytest.mark.parametrize("causal", [False, True])
def test_default_tiles_padded_head_dim(interpreter, causal):
    # head_dim 24 pads to 32; the default float32 tiles.
    interpreter.run("_check_varlen", [40, 77, 2], 2, 2, 24, "float32", causal, 2)


def test_fused_qkv_views_no_padding(interpreter):
    # Row-strided q/k/v read in place; group of 3; T == cu_seqlens[-1].
    interpreter.run("_check_varlen", [9, 50, 31], 6, 2, 32, "float32", True, 3, 0, None, True)
    interpreter.run("_check_varlen", [9, 50, 31], 6, 2, 32, "float16", False, 4, 0, [64, 64], True)


def test_large_head_dim(interpreter):
    interpreter.run("_check_varlen", [20, 3], 1, 1, 256, "float32", True, 5, 2, [16, 16])


def test_empty_batches(interpreter):
    interpreter.run("_check_varlen", [], 2, 1, 16, "float32", False, 6, 5)  # padding only
    interpreter.run("_check_varlen", [0, 0], 2, 1, 16, "float32", True, 7, 4)
    interpreter.run("_check_varlen", [], 2, 1, 16, "float32", False, 8, 0)  # no tokens at all


def test_many_sequences_beyond_one_tile_of_lookup(interpreter):
    # 40 sequences: the block lookup spans more than 16 lanes; grid bound T // 32 + 40.
    lens = [(7 * i) % 23 for i in range(40)]
    interpreter.run("_check_varlen", lens, 2, 1, 16, "float16", True, 9, 1)


def test_batch_invariant(interpreter):
    interpreter.run("_check_batch_invariant", "float16", True)


def test_registered_for_cuda(interpreter):
    interpreter.run("_check_registered")


def test_warm_up_buckets_cover_every_batch_size():
    # The GPU rank's embed warm-up compiles seqs_buckets(max_num_seqs): every batch of 1..max
    # sequences must land in one of them, and nothing is compiled twice or past the largest.
    from workers import triton_varlen as T

    for max_num_seqs in (1, 15, 16, 17, 100, 256, 257):
        buckets = T.seqs_buckets(max_num_seqs)
        assert buckets == sorted(set(buckets)) and buckets[0] == 16
        assert {T.seqs_bucket(n) for n in range(1, max_num_seqs + 1)} == set(buckets)


# --------------------------------------------------------------------------- compilation

_COMPILE_SCRIPT = """
    from workers import triton_varlen as T

    torch_dtypes = {"bf16": T.torch.bfloat16, "fp16": T.torch.float16, "fp32": T.torch.float32}
    for dtype, head_dim, causal in [("bf16", 32, False), ("bf16", 64, True), ("bf16", 128, False),
                                    ("fp16", 256, True), ("fp32", 64, False), ("fp32", 128, True)]:
        config = T.varlen_config(head_dim, torch_dtypes[dtype])
        constexprs = {"GROUP": 2, "HEAD_DIM": head_dim, "HD_PAD": head_dim, "SEQS_PAD": 64,
                      "BLOCK_M": config.block_m, "BLOCK_N": config.block_n, "CAUSAL": causal,
                      "DOT_PRECISION": "ieee" if dtype == "fp32" else "tf32"}
        build(T._varlen_attention_kernel, dtype, constexprs, config.num_warps, config.num_stages,
              ptrs={"cu_seqlens_ptr": "i32"}, floats=("qk_scale",))
"""


def test_kernel_compiles_for_sm90():
    """The default tiles lower to a Hopper cubin within its shared memory (no GPU needed)."""
    compile_for_sm90(_COMPILE_SCRIPT)


# --------------------------------------------------------------------------- CUDA

cuda_only = pytest.mark.skipif(not _CUDA, reason="needs a CUDA device")


@cuda_only
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(12, 12, 32), (16, 16, 64),
                                                             (8, 2, 128), (4, 4, 80), (2, 1, 256)])
def test_cuda_matches_cpu_op(dtype, causal, num_heads, num_kv_heads, head_dim):
    lens = [1, 8, 0, 255, 256, 64, 129, 1000, 37]
    _check_varlen(lens, num_heads, num_kv_heads, head_dim, dtype, causal, seed=head_dim,
                  padding_tokens=5, device="cuda")
    _check_varlen(lens, num_heads, num_kv_heads, head_dim, dtype, causal, seed=head_dim + 1,
                  padding_tokens=0, fused_qkv=True, device="cuda")


@cuda_only
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_cuda_batch_invariant(dtype, causal):
    _check_batch_invariant(dtype, causal, device="cuda")


@cuda_only
def test_cuda_through_the_op_and_opcheck():
    import workers.triton_varlen  # noqa: F401  (registers the CUDA kernel)

    for dtype in (torch.float32, torch.bfloat16):
        q, k, v, cu_seqlens = _problem([3, 20, 0, 7], 4, 2, 64, dtype, 0, 2, False, "cuda")
        args = (q, k, v, cu_seqlens, 20, 0.125, True)
        out = torch.ops.spmd.varlen_attention(*args)
        ref = ops._varlen_attention(*(a.cpu().double() if isinstance(a, torch.Tensor)
                                      and a.is_floating_point() else
                                      a.cpu() if isinstance(a, torch.Tensor) else a for a in args))
        assert float((out.cpu().double() - ref).norm() / ref.norm()) < REL_TOL[dtype]
        torch.library.opcheck(torch.ops.spmd.varlen_attention, args,
                              test_utils=("test_schema", "test_autograd_registration",
                                          "test_faketensor"))


@cuda_only
def test_cuda_graph_replay_with_new_sequence_bounds():
    """The grid depends on host ints only: one capture serves any split of the same T tokens
    into the same number of sequences (cu_seqlens' shape is part of the capture)."""
    from workers import triton_varlen

    max_seqlen, scale = 256, 0.125
    q, k, v, cu_seqlens = _problem([100, 100, 100], 8, 8, 64, torch.bfloat16, 0, 0, False, "cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        triton_varlen.varlen_attention(q, k, v, cu_seqlens, max_seqlen, scale, False)  # warm-up
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = triton_varlen.varlen_attention(q, k, v, cu_seqlens, max_seqlen, scale, False)
    for lens in ([256, 44, 0], [1, 2, 3], [150, 0, 150], [0, 0, 0]):
        new = torch.zeros(4, dtype=torch.int32)
        new[1:] = torch.tensor(lens).cumsum(0)
        cu_seqlens.copy_(new)
        graph.replay()
        torch.cuda.synchronize()
        expected = ops._varlen_attention(q.cpu().double(), k.cpu().double(), v.cpu().double(),
                                         new, max_seqlen, scale, False)
        actual = out.cpu().double()
        num_real = int(new[-1])
        assert torch.equal(actual[num_real:], expected[num_real:]), lens
        if num_real:
            rel = float((actual - expected).norm() / expected.norm())
            assert rel < REL_TOL[torch.bfloat16], (lens, rel)


@cuda_only
def test_check_varlen_kernels_script():
    from bench import check_varlen_kernels

    assert check_varlen_kernels.main(["--num-seqs", "8", "--shapes", "minilm",
                                      "--dtypes", "bfloat16"]) == 0
