"""``spmd::fused_moe`` and ``moe_routing`` (``workers.ops``) against float64 computations, and
the Triton kernels (``workers.triton_moe``) against both.

The kernels run in Triton's interpreter (``TRITON_INTERPRET=1``) in a child process, as in
``test_triton_ops.py``. The interpreter keeps bfloat16 as raw uint16 bits, its ``tl.dot``
multiplies those and it truncates float32 -> bf16: the checks fix both
(``_interpreter_bf16``), so bf16 runs check the kernels' roundings too.
``test_kernels_compile_for_sm90`` lowers every kernel at every tile config to a Hopper cubin
(no GPU needed). The CUDA tests are skipped without a GPU.
"""

import contextlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from workers import ops

pytest.importorskip("triton")

from tests.triton_interpreter import interpreter_fixture  # noqa: E402
from tests.triton_sm90 import compile_for_sm90  # noqa: E402

interpreter = interpreter_fixture(__file__)

_CUDA = torch.cuda.is_available()
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# |out - ref| / |ref| against float64: bf16/fp16 round gate, up, silu, product and output.
REL_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
OPCHECK_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor")
FEW = settings(max_examples=20, deadline=None)


# --------------------------------------------------------------------------- problems


def _problem(num_tokens, hidden, inter, num_experts, top_k, dtype, seed, unused=(),
             device="cpu"):
    """x, w13, w2 of unit-scale activations, and a random routing (repeats allowed) that never
    picks the experts in ``unused``; weights are positive, float32."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, hidden, generator=gen)
    w13 = torch.randn(num_experts, 2 * inter, hidden, generator=gen) / hidden**0.5
    w2 = torch.randn(num_experts, hidden, inter, generator=gen) / inter**0.5
    allowed = torch.tensor([e for e in range(num_experts) if e not in unused])
    ids = allowed[torch.randint(len(allowed), (num_tokens, top_k), generator=gen)]
    weights = torch.rand(num_tokens, top_k, generator=gen) + 0.1
    weights = weights / weights.sum(-1, keepdim=True)
    return tuple(t.to(device) for t in (x.to(dtype), w13.to(dtype), w2.to(dtype), weights, ids))


def _reference(x, w13, w2, topk_weights, topk_ids) -> torch.Tensor:
    """float64, token by token and k by k: no sorting, no grouping."""
    inter = w2.shape[-1]
    x, w13, w2 = x.cpu().double(), w13.cpu().double(), w2.cpu().double()
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for k in range(topk_ids.shape[1]):
            expert = int(topk_ids[t, k])
            gate_up = w13[expert] @ x[t]
            act = torch.nn.functional.silu(gate_up[:inter]) * gate_up[inter:]
            out[t] += float(topk_weights[t, k]) * (w2[expert] @ act)
    return out


def _rel_err(actual, expected) -> float:
    actual, expected = actual.cpu().double(), expected.cpu().double()
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-30))


def _assert_close(actual, expected, dtype):
    # Low precision: a kernel may round an intermediate differently from eager by one ulp.
    rtol, atol = {torch.float32: (1e-5, 1e-5), torch.float16: (4e-3, 4e-3),
                  torch.bfloat16: (3e-2, 2e-2)}[dtype]
    torch.testing.assert_close(actual.cpu().float(), expected.cpu().float(), rtol=rtol, atol=atol)


# --------------------------------------------------------------------------- CPU op


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_moe_opcheck(dtype):
    for tokens, experts, top_k, unused in [(1, 4, 2, ()), (6, 5, 1, (0, 3)), (3, 8, 3, (2,))]:
        args = _problem(tokens, 16, 8, experts, top_k, dtype, tokens, unused)
        torch.library.opcheck(torch.ops.spmd.fused_moe, args, test_utils=OPCHECK_UTILS)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens,experts,top_k,unused", [
    (5, 1, 1, ()),  # one expert
    (2, 16, 4, (0, 5, 7)),  # more experts than tokens
    (9, 6, 2, (1, 4)),  # experts without a token
    (7, 4, 1, ()),
])
def test_fused_moe_cpu_matches_float64(dtype, tokens, experts, top_k, unused):
    args = _problem(tokens, 24, 20, experts, top_k, dtype, experts + top_k, unused)
    out = ops.fused_moe(*args)
    assert out.shape == args[0].shape and out.dtype == dtype
    assert _rel_err(out, _reference(*args)) < REL_TOL[dtype]


@FEW
@given(tokens=st.integers(1, 8), experts=st.integers(1, 10), top_k=st.integers(1, 8),
       hidden=st.sampled_from([8, 24, 33]), inter=st.sampled_from([4, 17]),
       seed=st.integers(0, 2**16))
def test_fused_moe_cpu_random_routings(tokens, experts, top_k, hidden, inter, seed):
    args = _problem(tokens, hidden, inter, experts, top_k, torch.float32, seed,
                    unused=range(0, experts, 3) if experts > 2 else ())
    torch.testing.assert_close(ops.fused_moe(*args).double(), _reference(*args),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_moe_routing_matches_float64(dtype, renormalize):
    gen = torch.Generator().manual_seed(3)
    for tokens, experts, top_k in [(1, 8, 2), (13, 16, 4), (5, 60, 8), (4, 3, 1)]:
        logits = torch.randn(tokens, experts, generator=gen).mul(2).to(dtype)
        weights, ids = ops.moe_routing(logits, top_k, renormalize)
        assert weights.dtype == torch.float32 and ids.dtype == torch.int64
        assert weights.shape == ids.shape == (tokens, top_k)
        probs = torch.softmax(logits.double(), dim=-1)
        expected_weights, expected_ids = torch.topk(probs, top_k, dim=-1)
        if renormalize:
            expected_weights = expected_weights / expected_weights.sum(-1, keepdim=True)
        assert torch.equal(ids, expected_ids)
        torch.testing.assert_close(weights.double(), expected_weights, rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------- interpreter checks


def _interpreter_bf16():
    """Fixes the interpreter's bfloat16 (kept as uint16 bits): ``tl.dot`` multiplied the bits
    (operands are widened to float32 here, exactly) and float32 -> bf16 truncated (here it
    rounds to nearest even, as the GPU does)."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter as interp

    builder = interp.InterpreterBuilder
    if getattr(builder.create_dot, "fixes_bf16", False):
        return
    real_dot, real_cast = builder.create_dot, builder.cast_impl

    def widen(h):
        if h.dtype != tl.bfloat16:
            return h
        return interp.TensorHandle((h.data.astype(np.uint32) << 16).view(np.float32), tl.float32)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return real_dot(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            bits = torch.from_numpy(np.ascontiguousarray(src.data)).to(torch.bfloat16)
            return interp.TensorHandle(bits.view(torch.int16).numpy().view(np.uint16),
                                       tl.bfloat16)
        return real_cast(self, src, dst_type)

    create_dot.fixes_bf16 = True
    builder.create_dot, builder.cast_impl = create_dot, cast_impl


@contextlib.contextmanager
def _nan_outputs():
    """``torch.empty`` hands out NaN-filled float tensors: unwritten elements show up."""
    real = torch.empty

    def poisoned(*args, **kwargs):
        out = real(*args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    torch.empty = poisoned
    try:
        yield
    finally:
        torch.empty = real


def _triton_moe():
    from workers import triton_moe

    _interpreter_bf16()
    return triton_moe


def _check_fused_moe(tokens, hidden, inter, experts, top_k, dtype_name, seed, unused=(),
                     tiles=None, strided_x=False, device="cpu"):
    triton_moe, dtype = _triton_moe(), DTYPES[dtype_name]
    if device == "cpu":
        assert type(triton_moe._moe_gate_up_kernel).__name__ == "InterpretedFunction"
    x, w13, w2, weights, ids = _problem(tokens, hidden, inter, experts, top_k, dtype, seed,
                                        unused, device)
    if strided_x:  # a row-strided view, as a slice of a wider activation
        x = torch.cat([x, torch.full_like(x[:, :5], float("nan"))], dim=1)[:, :hidden]
    config = triton_moe.MoEConfig(*tiles) if tiles else None
    with _nan_outputs():
        out = triton_moe.fused_moe(x, w13, w2, weights, ids, config=config)
    assert out.shape == (tokens, hidden) and out.dtype == dtype
    assert torch.isfinite(out).all(), "unwritten (NaN) outputs"
    if tokens == 0:
        return
    assert _rel_err(out, _reference(x, w13, w2, weights, ids)) < REL_TOL[dtype]
    _assert_close(out, ops._fused_moe_ref(x, w13, w2, weights, ids), dtype)


def _check_alignment(tokens, experts, top_k, block_m, seed, unused=()):
    """Every pair exactly once, expert groups in order, stable inside, blocks single-expert."""
    triton_moe = _triton_moe()
    *_, ids = _problem(tokens, 1, 1, experts, top_k, torch.float32, seed, unused)
    align = triton_moe.moe_align(ids, experts, block_m)
    num_pairs = tokens * top_k
    counts = torch.bincount(ids.view(-1), minlength=experts)
    padded = (counts + block_m - 1) // block_m * block_m
    num_padded = int(align.num_padded)
    assert num_padded == int(padded.sum())
    assert align.block_expert.shape[0] == triton_moe.max_blocks(num_pairs, experts, block_m)
    assert align.sorted_ids.shape[0] >= num_padded
    rows = align.sorted_ids[:num_padded].long()
    real = rows[rows != num_pairs]
    assert torch.equal(real, torch.argsort(ids.view(-1), stable=True))
    blocks = rows.view(-1, block_m)
    block_expert = align.block_expert.long()
    expected = torch.repeat_interleave(torch.arange(experts), padded // block_m)
    assert torch.equal(block_expert[:blocks.shape[0]], expected)
    assert (block_expert[blocks.shape[0]:] == -1).all()
    for block, expert in zip(blocks, expected):
        pairs = block[block != num_pairs]
        assert len(pairs) > 0 and (ids.view(-1)[pairs] == expert).all()
        assert (block[len(pairs):] == num_pairs).all()  # padding only at a group's end


def _check_registered():
    from workers import triton_moe  # noqa: F401

    assert torch._C._dispatch_has_kernel_for_dispatch_key("spmd::fused_moe", "CUDA")


# --------------------------------------------------------------------------- interpreter


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_kernel_small_tiles_masked_edges(interpreter, dtype):
    # 16-wide tiles over H=40 and I=24: masked column tiles and K tails in both GEMMs;
    # experts 1 and 4 get no token, the others padding rows.
    interpreter.run("_check_fused_moe", 7, 40, 24, 6, 2, dtype, 1, [1, 4], [16, 16, 16, 16])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_kernel_default_tiles(interpreter, dtype):
    # Decode (one token, more experts than pairs) and several blocks per expert (BLOCK_M 32).
    interpreter.run("_check_fused_moe", 1, 64, 48, 16, 4, dtype, 2)
    interpreter.run("_check_fused_moe", 40, 64, 32, 3, 2, dtype, 3)


def test_kernel_one_expert_top1_strided_x(interpreter):
    interpreter.run("_check_fused_moe", 5, 48, 16, 1, 1, "float32", 4, [], None, True)


def test_kernel_top8_many_experts(interpreter):
    interpreter.run("_check_fused_moe", 6, 32, 16, 20, 8, "bfloat16", 5, [0, 7, 19],
                    [32, 16, 32, 16])


def test_kernel_no_tokens(interpreter):
    interpreter.run("_check_fused_moe", 0, 32, 16, 4, 2, "bfloat16", 6)


@pytest.mark.parametrize("tokens,experts,top_k,block_m", [
    (1, 128, 8, 16),  # decode: one block per expert hit
    (5, 6, 2, 16),
    (300, 128, 8, 64),  # 38 chunks of one sub-block
    (2100, 4, 4, 64),  # 33 chunks of two sub-blocks
])
def test_alignment(interpreter, tokens, experts, top_k, block_m):
    unused = [0, experts - 1] if experts > 2 else []
    interpreter.run("_check_alignment", tokens, experts, top_k, block_m, tokens, unused)


def test_registered_for_cuda(interpreter):
    interpreter.run("_check_registered")


def test_configs_by_tokens_per_expert():
    from workers.triton_moe import moe_config

    assert moe_config(1, 8, 128, torch.bfloat16).block_m == 16
    assert moe_config(2048, 8, 128, torch.bfloat16).block_m == 64
    assert moe_config(2048, 2, 8, torch.bfloat16).block_m == 128


# --------------------------------------------------------------------------- compilation

_COMPILE_SCRIPT = """
    from workers import triton_moe as M

    torch_dtypes = {"bf16": M.torch.bfloat16, "fp32": M.torch.float32}
    PTRS = {"sorted_ids_ptr": "i32", "block_expert_ptr": "i32", "num_padded_ptr": "i32",
            "chunk_counts_ptr": "i32", "ids_ptr": "i64", "weights_ptr": "fp32",
            "partial_ptr": "fp32"}

    for e_pad in (16, 128):
        sub = max(16, min(128, 4096 // e_pad))
        build(M._moe_count_kernel, "bf16", {"E_PAD": e_pad, "SUB": sub}, ptrs=PTRS)
        build(M._moe_align_kernel, "bf16", {"E_PAD": e_pad, "SUB": sub, "BLOCK_M": 64,
                                           "BLOCKS_TILE": max(16, min(128, 8192 // e_pad))},
              ptrs=PTRS)
    for dtype, torch_dtype in torch_dtypes.items():
        precision = "ieee" if dtype == "fp32" else "tf32"
        # Qwen3-30B-A3B decode and prefills (16 to 128 pairs per expert), Mixtral prefill.
        for tokens, top_k, experts in ((1, 8, 128), (512, 8, 128), (2048, 8, 128), (2048, 2, 8)):
            c = M.moe_config(tokens, top_k, experts, torch_dtype)
            common = {"BLOCK_M": c.block_m, "BLOCK_K": c.block_k, "EVEN_K": True,
                      "DOT_PRECISION": precision}
            build(M._moe_gate_up_kernel, dtype, {**common, "BLOCK_N": c.gate_up_block_n},
                  c.num_warps, c.num_stages, ptrs=PTRS)
            build(M._moe_down_kernel, dtype, {**common, "BLOCK_N": c.down_block_n},
                  c.num_warps, c.num_stages, ptrs={**PTRS, "out_ptr": "fp32"})
        build(M._moe_sum_kernel, dtype, {"BLOCK": 1024}, ptrs=PTRS)
"""


def test_kernels_compile_for_sm90():
    """Every kernel, at every tile config, lowers to a Hopper cubin within its shared memory."""
    compile_for_sm90(_COMPILE_SCRIPT)


# --------------------------------------------------------------------------- CUDA

cuda_only = pytest.mark.skipif(not _CUDA, reason="needs a CUDA device")


@cuda_only
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("tokens", [1, 16, 200])
def test_cuda_matches_float64(dtype, tokens):
    _check_fused_moe(tokens, 256, 96, 16, 4, dtype, tokens, [3], device="cuda")


@cuda_only
def test_cuda_op_opcheck_and_graph_replay():
    import workers.triton_moe  # noqa: F401  (registers the CUDA kernel)

    args = _problem(4, 128, 64, 8, 2, torch.bfloat16, 0, device="cuda")
    torch.library.opcheck(torch.ops.spmd.fused_moe, args, test_utils=OPCHECK_UTILS)
    x, w13, w2, weights, ids = args
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        ops.fused_moe(*args)  # compiles outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.fused_moe(*args)
    for seed in (1, 2):  # a new routing, replayed without a new capture
        *_, new_weights, new_ids = _problem(4, 128, 64, 8, 2, torch.bfloat16, seed,
                                            unused=[seed], device="cuda")
        weights.copy_(new_weights)
        ids.copy_(new_ids)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, ops.fused_moe(*args))
