"""LoRA ops (``workers.lora_ops``): per-token float64 references, opcheck, the dense (XLA)
variant and the metadata helpers on the CPU; the Triton kernels (``workers.triton_lora``) in
Triton's interpreter (``TRITON_INTERPRET=1``) or on a GPU, and a CUDA-graph replay on a GPU.
"""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from workers import lora_ops

HIDDEN, RANK, NUM_SLOTS = 48, 16, 4
SLICE_WIDTHS = {1: (40,), 2: (40, 56), 3: (64, 32, 32)}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _problem(num_tokens, num_slices, dtype=torch.float32, seed=0, slots=None, device="cpu",
             hidden=HIDDEN, rank=RANK, num_slots=NUM_SLOTS):
    """Random x, lora_a, lora_b, out and slots (-1 included) plus the step's metadata."""
    gen = _gen(seed)
    widths = SLICE_WIDTHS[num_slices]
    offsets = [0, *np.cumsum(widths).tolist()]
    x = torch.randn(num_tokens, hidden, generator=gen).to(dtype)
    lora_a = torch.randn(num_slots, num_slices * rank, hidden, generator=gen).to(dtype)
    lora_b = torch.randn(num_slots, rank, offsets[-1], generator=gen).to(dtype)
    out = torch.randn(num_tokens, offsets[-1], generator=gen).to(dtype)
    if slots is None:
        slots = torch.randint(-1, num_slots, (num_tokens,), generator=gen)
    slots = torch.as_tensor(slots, dtype=torch.int32).reshape(num_tokens)
    sorted_idx, seg_starts = lora_ops.lora_metadata(slots.numpy(), num_slots)
    tensors = [x, lora_a, lora_b, out, slots, torch.from_numpy(sorted_idx),
               torch.from_numpy(seg_starts)]
    return [t.to(device) for t in tensors], offsets


def _reference_expand(y, lora_b, out, slots, offsets):
    """out + y @ B[slot] per slice, token by token, in float64."""
    rank = lora_b.shape[1]
    new_out = out.double().clone()
    for t, slot in enumerate(slots.tolist()):
        for s in range(len(offsets) - 1 if slot >= 0 else 0):
            cols = slice(offsets[s], offsets[s + 1])
            new_out[t, cols] += (y[t, s * rank:(s + 1) * rank].double()
                                 @ lora_b[slot, :, cols].double())
    return new_out


def _reference(x, lora_a, lora_b, out, slots, offsets):
    """(y, out + delta) token by token, in float64."""
    y = torch.zeros(x.shape[0], lora_a.shape[1], dtype=torch.float64)
    for t, slot in enumerate(slots.tolist()):
        if slot >= 0:
            y[t] = x[t].double() @ lora_a[slot].double().T
    return y, _reference_expand(y, lora_b, out, slots, offsets)


def _single_slot(slots: torch.Tensor) -> int:
    values = set(slots.tolist())
    return values.pop() if len(values) == 1 and min(values | {0}) >= 0 else -1


# --------------------------------------------------------------------------- metadata


@pytest.mark.parametrize("num_tokens,num_slots", [(0, 3), (1, 1), (9, 4), (257, 8)])
def test_metadata_orders_tokens_by_slot(num_tokens, num_slots):
    slots = torch.randint(-1, num_slots, (num_tokens,), generator=_gen(num_tokens))
    sorted_idx, seg_starts = lora_ops.lora_metadata(slots.numpy(), num_slots)
    assert sorted_idx.dtype == seg_starts.dtype == np.int32
    # Stable order by slot, base tokens last.
    keyed = np.where(slots.numpy() < 0, num_slots, slots.numpy())
    np.testing.assert_array_equal(sorted_idx, np.argsort(keyed, kind="stable"))
    for slot in range(num_slots):
        segment = slots.numpy()[sorted_idx[seg_starts[slot]:seg_starts[slot + 1]]]
        assert (segment == slot).all() and len(segment) == (slots == slot).sum()
    assert (slots.numpy()[sorted_idx[seg_starts[-1]:]] == -1).all()


# --------------------------------------------------------------------------- segmented ops


@pytest.mark.parametrize("num_slices", [1, 2, 3])
@pytest.mark.parametrize("num_tokens", [0, 1, 37])
def test_mixed_batch_matches_per_token_reference(num_slices, num_tokens):
    (x, lora_a, lora_b, out, slots, sorted_idx, seg_starts), offsets = _problem(
        num_tokens, num_slices, seed=num_tokens + num_slices)
    y_ref, out_ref = _reference(x, lora_a, lora_b, out, slots, offsets)
    y = lora_ops.lora_shrink(x, lora_a, slots, sorted_idx, seg_starts, -1)
    assert y.shape == (num_tokens, num_slices * RANK) and y.dtype == x.dtype
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-5)
    lora_ops.lora_expand(out, y, lora_b, slots, sorted_idx, seg_starts, -1, offsets)
    torch.testing.assert_close(out.double(), out_ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("num_slices", [1, 3])
@pytest.mark.parametrize("num_tokens", [1, 23])
def test_single_slot_fast_path(num_slices, num_tokens):
    (x, lora_a, lora_b, out, slots, sorted_idx, seg_starts), offsets = _problem(
        num_tokens, num_slices, seed=5, slots=[2] * num_tokens)
    y_ref, out_ref = _reference(x, lora_a, lora_b, out, slots, offsets)
    y = lora_ops.lora_shrink(x, lora_a, slots, sorted_idx, seg_starts, 2)
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-5)
    # The fast path must agree with the segmented one on the same batch.
    torch.testing.assert_close(y, lora_ops.lora_shrink(x, lora_a, slots, sorted_idx, seg_starts, -1))
    lora_ops.lora_expand(out, y, lora_b, slots, sorted_idx, seg_starts, 2, offsets)
    torch.testing.assert_close(out.double(), out_ref, rtol=1e-5, atol=1e-4)


def test_all_base_batch_is_untouched():
    (x, lora_a, lora_b, out, slots, sorted_idx, seg_starts), offsets = _problem(
        11, 2, slots=[-1] * 11)
    y = lora_ops.lora_shrink(x, lora_a, slots, sorted_idx, seg_starts, -1)
    assert torch.equal(y, torch.zeros_like(y))
    before = out.clone()
    lora_ops.lora_expand(out, y, lora_b, slots, sorted_idx, seg_starts, -1, offsets)
    assert torch.equal(out, before)


def test_bfloat16_accumulates_in_float32():
    (x, lora_a, lora_b, out, slots, sorted_idx, seg_starts), offsets = _problem(
        29, 3, dtype=torch.bfloat16, seed=7)
    y_ref, _ = _reference(x, lora_a, lora_b, out, slots, offsets)
    y = lora_ops.lora_shrink(x, lora_a, slots, sorted_idx, seg_starts, -1)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-2, atol=5e-2)
    # The reference expands the same rounded y, so only the expand's own rounding is measured:
    # one rounding of out + delta to bfloat16.
    out_ref = _reference_expand(y, lora_b, out, slots, offsets)
    lora_ops.lora_expand(out, y, lora_b, slots, sorted_idx, seg_starts, -1, offsets)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), out_ref.to(torch.bfloat16).double(), rtol=8e-3, atol=1e-2)


@pytest.mark.parametrize("num_tokens,num_slices,single", [(0, 1, False), (1, 3, True),
                                                          (13, 2, False), (13, 3, True)])
def test_opcheck(num_tokens, num_slices, single):
    slots = [1] * num_tokens if single else None
    (x, lora_a, lora_b, out, slots, sorted_idx, seg_starts), offsets = _problem(
        num_tokens, num_slices, seed=3, slots=slots)
    single_slot = 1 if single else -1
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(torch.ops.spmd.lora_shrink.default,
                          (x, lora_a, slots, sorted_idx, seg_starts, single_slot), test_utils=utils)
    y = lora_ops.lora_shrink(x, lora_a, slots, sorted_idx, seg_starts, single_slot)
    torch.library.opcheck(torch.ops.spmd.lora_expand.default,
                          (out, y, lora_b, slots, sorted_idx, seg_starts, single_slot, offsets),
                          test_utils=utils)


# --------------------------------------------------------------------------- dense (XLA)


@pytest.mark.parametrize("num_slices", [1, 2, 3])
@pytest.mark.parametrize("num_tokens", [0, 1, 31])
def test_dense_shrink_matches_segmented(num_slices, num_tokens):
    (x, lora_a, _, _, slots, sorted_idx, seg_starts), _ = _problem(
        num_tokens, num_slices, seed=11 + num_tokens)
    y = lora_ops.lora_shrink(x, lora_a, slots, sorted_idx, seg_starts, -1)
    torch.testing.assert_close(lora_ops.lora_shrink_dense(x, lora_a, slots), y,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("num_slices", [1, 2, 3])
@pytest.mark.parametrize("num_tokens", [0, 1, 13])
def test_lanes_match_segmented_and_trace_with_static_shapes(num_slices, num_tokens):
    """The TPU path's formulation: block-diagonal B lanes, one-hot mask, two matmuls; a
    full graph (no graph break), as XLA needs."""
    (x, lora_a, lora_b, out, slots, sorted_idx, seg_starts), offsets = _problem(
        num_tokens, num_slices, seed=21 + num_slices)
    expected = out.clone()
    y = lora_ops.lora_shrink(x, lora_a, slots, sorted_idx, seg_starts, -1)
    lora_ops.lora_expand(expected, y, lora_b, slots, sorted_idx, seg_starts, -1, offsets)
    b_lanes = torch.cat([lora_ops.lanes_b(lora_b[s], offsets) for s in range(NUM_SLOTS)])
    mask = (slots[:, None] == torch.arange(NUM_SLOTS)).to(x.dtype)
    torch.testing.assert_close(lora_ops.lora_lanes(x, out, lora_a, b_lanes, mask), expected,
                               rtol=1e-5, atol=1e-4)
    torch._dynamo.reset()  # one graph per parametrisation, none left from the others
    compiled = torch.compile(lora_ops.lora_lanes, dynamic=False, fullgraph=True,
                             backend="aot_eager")
    torch.testing.assert_close(compiled(x, out, lora_a, b_lanes, mask), expected,
                               rtol=1e-5, atol=1e-4)


def test_kernel_bench_runs_on_cpu(capsys):
    from bench import check_lora_kernels

    assert check_lora_kernels.main(["--device", "cpu", "--small", "--tokens", "0,5",
                                    "--layers", "qkv,down", "--reps", "1"]) == 0
    assert '"results"' in capsys.readouterr().out


# --------------------------------------------------------------------------- Triton kernels

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_CUDA = torch.cuda.is_available()
# The interpreter is picked when @triton.jit runs, so TRITON_INTERPRET=1 must be set when the
# process starts: ``TRITON_INTERPRET=1 pytest tests/workers/test_lora_ops.py``.
triton_kernels = pytest.mark.skipif(
    not (_CUDA or os.environ.get("TRITON_INTERPRET") == "1"),
    reason="needs a CUDA device or TRITON_INTERPRET=1")
_DEVICE = "cuda" if _CUDA else "cpu"
# The interpreter's bf16 tl.dot is broken (it multiplies raw bits); fp16 shares bf16's path.
_KERNEL_DTYPES = ["float32", "float16"] + (["bfloat16"] if _CUDA else [])


def _triton_lora():
    pytest.importorskip("triton")
    from workers import triton_lora

    return triton_lora


def _check_kernels(num_tokens, num_slices, dtype, seed, slots=None, single_slot=-1,
                   shrink_config=None, expand_config=None):
    triton_lora = _triton_lora()
    (x, lora_a, lora_b, out, slots, sorted_idx, seg_starts), offsets = _problem(
        num_tokens, num_slices, dtype=dtype, seed=seed, slots=slots, device=_DEVICE)
    y_ref, _ = _reference(x.cpu(), lora_a.cpu(), lora_b.cpu(), out.cpu(), slots.cpu(), offsets)
    tol = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-2, 1e-2),
           torch.bfloat16: (2e-2, 5e-2)}[dtype]
    y = triton_lora.lora_shrink(x, lora_a, slots, sorted_idx, seg_starts, single_slot,
                                config=shrink_config)
    assert y.dtype == dtype and y.shape == y_ref.shape
    torch.testing.assert_close(y.cpu().double(), y_ref, rtol=tol[0], atol=tol[1])
    # Expand from the kernel's own (rounded) y, so the reference sees the same input.
    out_ref = _reference_expand(y.cpu(), lora_b.cpu(), out.cpu(), slots.cpu(), offsets)
    triton_lora.lora_expand(out, y, lora_b, slots, sorted_idx, seg_starts, single_slot, offsets,
                            config=expand_config)
    torch.testing.assert_close(out.cpu().double(), out_ref.to(dtype).double(),
                               rtol=tol[0], atol=10 * tol[1])


@triton_kernels
@pytest.mark.parametrize("dtype", _KERNEL_DTYPES)
@pytest.mark.parametrize("num_slices", [1, 2, 3])
@pytest.mark.parametrize("num_tokens", [1, 37])
def test_triton_mixed_batch(dtype, num_slices, num_tokens):
    _check_kernels(num_tokens, num_slices, getattr(torch, dtype), seed=num_tokens + num_slices)


@triton_kernels
@pytest.mark.parametrize("num_slices", [2, 3])
def test_triton_split_k_and_tiles_across_slices(num_slices):
    # K = 48 in three 16-wide splits (the reduce kernel); 64-column tiles straddle slice ends.
    triton_lora = _triton_lora()
    _check_kernels(45, num_slices, torch.float32, seed=21,
                   shrink_config=triton_lora.ShrinkConfig(16, 16, 16, split_k=3),
                   expand_config=triton_lora.ExpandConfig(16, 64))


@triton_kernels
@pytest.mark.parametrize("slots", [[], [-1] * 9, [3] * 20, [0, -1, 0, 0, -1]])
def test_triton_edge_batches(slots):
    _check_kernels(len(slots), 3, torch.float32, seed=4, slots=slots)


@triton_kernels
def test_triton_single_slot_uses_cublas_path():
    _check_kernels(17, 3, torch.float32, seed=8, slots=[1] * 17, single_slot=1)


_COMPILE_SCRIPT = textwrap.dedent("""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from workers import triton_lora as T

    INDEX_PTRS = {"sorted_idx_ptr": "i32", "seg_starts_ptr": "i32", "token_slots_ptr": "i32",
                  "partial_ptr": "fp32"}

    def build(kernel, dtype, constexprs, out_dtype=None):
        sig, attrs = {}, {}
        for i, name in enumerate(kernel.arg_names):
            if name in constexprs:
                sig[name] = "constexpr"
            elif name.endswith("_ptr"):
                sig[name] = "*" + (out_dtype if name == "out_ptr" and out_dtype else
                                   INDEX_PTRS.get(name, dtype))
            else:
                sig[name] = "i32"
            if name.endswith("_ptr") or "stride" in name:
                attrs[(i,)] = [["tt.divisibility", 16]]
        triton.compile(ASTSource(kernel, sig, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": 4})

    for dtype in ("bf16", "fp32"):
        precision = "ieee" if dtype == "fp32" else "tf32"
        for out_dtype in ("fp32", dtype):  # split-K workspace, or y itself
            build(T._lora_shrink_kernel, dtype,
                  {"NUM_SLOTS": 4, "SLOTS_PAD": 4, "BLOCK_M": 16, "BLOCK_R": 64,
                   "BLOCK_K": 128 if dtype == "bf16" else 64, "K_PER_SPLIT": 256,
                   "DOT_PRECISION": precision}, out_dtype)
        build(T._lora_shrink_reduce_kernel, dtype, {"NUM_SPLITS": 8, "BLOCK_T": 32, "BLOCK_R": 64})
        for block_m, block_n in ((16, 32), (16, 128), (64, 128)):
            build(T._lora_expand_kernel, dtype,
                  {"NUM_SLOTS": 4, "SLOTS_PAD": 4, "NUM_SLICES": 3, "BLOCK_M": block_m,
                   "BLOCK_N": block_n, "BLOCK_R": 16, "DOT_PRECISION": precision})
""")


def test_triton_kernels_compile_for_sm90():
    """The kernels lower to a Hopper cubin (Triton ships ptxas; no GPU needed)."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], cwd=_ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.mark.skipif(not _CUDA, reason="needs a CUDA device")
def test_cuda_graph_replay_with_refilled_metadata():
    """One mixed-batch capture of shrink + expand stays right when the slots change."""
    _triton_lora()  # registers the CUDA kernels

    num_tokens, num_slices = 64, 3
    (x, lora_a, lora_b, out, slots, sorted_idx, seg_starts), offsets = _problem(
        num_tokens, num_slices, dtype=torch.bfloat16, seed=1, device="cuda")
    out_before = out.clone()
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        lora_ops.lora_expand(out, lora_ops.lora_shrink(x, lora_a, slots, sorted_idx, seg_starts, -1),
                             lora_b, slots, sorted_idx, seg_starts, -1, offsets)  # warm-up
    torch.cuda.current_stream().wait_stream(stream)
    out.copy_(out_before)
    with torch.cuda.graph(graph):
        y = lora_ops.lora_shrink(x, lora_a, slots, sorted_idx, seg_starts, -1)
        lora_ops.lora_expand(out, y, lora_b, slots, sorted_idx, seg_starts, -1, offsets)
    for seed, new_slots in [(2, None), (3, [-1] * num_tokens), (4, [3] * num_tokens)]:
        gen = _gen(seed)
        fresh = (torch.randint(-1, NUM_SLOTS, (num_tokens,), generator=gen) if new_slots is None
                 else torch.tensor(new_slots))
        slots.copy_(fresh.to(torch.int32))
        new_sorted, new_starts = lora_ops.lora_metadata(slots.cpu().numpy(), NUM_SLOTS)
        sorted_idx.copy_(torch.from_numpy(new_sorted))
        seg_starts.copy_(torch.from_numpy(new_starts))
        out.copy_(out_before)
        graph.replay()
        torch.cuda.synchronize()
        y_ref, _ = _reference(x.cpu(), lora_a.cpu(), lora_b.cpu(), out_before.cpu(), slots.cpu(),
                              offsets)
        torch.testing.assert_close(y.cpu().double(), y_ref, rtol=2e-2, atol=5e-2)
        out_ref = _reference_expand(y.cpu(), lora_b.cpu(), out_before.cpu(), slots.cpu(), offsets)
        torch.testing.assert_close(out.cpu().double(), out_ref.to(torch.bfloat16).double(),
                                   rtol=2e-2, atol=0.5)
