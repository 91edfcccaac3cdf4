"""LoRA ops (``workers.lora_ops``): per-token float64 references, opcheck, the dense (XLA)
variant and the metadata helpers on the CPU; the Triton kernels (``workers.triton_lora``) in
Triton's interpreter (``TRITON_INTERPRET=1``) or on a GPU, and a CUDA-graph replay on a GPU.
"""

import numpy as np
import pytest
import torch

from workers import lora_ops

HIDDEN, RANK, NUM_SLOTS = 48, 16, 4
SLICE_WIDTHS = {1: (40,), 2: (64, 32), 3: (64, 32, 32)}


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


def _reference(x, lora_a, lora_b, out, slots, offsets):
    """(y, out + delta) token by token, in float64."""
    rank = lora_b.shape[1]
    y = torch.zeros(x.shape[0], lora_a.shape[1], dtype=torch.float64)
    new_out = out.double().clone()
    for t, slot in enumerate(slots.tolist()):
        if slot < 0:
            continue
        y[t] = x[t].double() @ lora_a[slot].double().T
        for s in range(len(offsets) - 1):
            cols = slice(offsets[s], offsets[s + 1])
            new_out[t, cols] += y[t, s * rank:(s + 1) * rank] @ lora_b[slot, :, cols].double()
    return y, new_out


def _single_slot(slots: torch.Tensor) -> int:
    values = set(slots.tolist())
    return values.pop() if len(values) == 1 and min(values | {0}) >= 0 else -1


# --------------------------------------------------------------------------- metadata


@pytest.mark.parametrize("num_tokens,num_slots", [(0, 3), (1, 1), (9, 4), (257, 8)])
def test_metadata_numpy_matches_torch(num_tokens, num_slots):
    slots = torch.randint(-1, num_slots, (num_tokens,), generator=_gen(num_tokens))
    sorted_idx, seg_starts = lora_ops.lora_metadata(slots.numpy(), num_slots)
    sorted_t, seg_t = lora_ops.lora_metadata_torch(slots.to(torch.int32), num_slots)
    assert sorted_t.dtype == seg_t.dtype == torch.int32
    assert sorted_idx.dtype == seg_starts.dtype == np.int32
    np.testing.assert_array_equal(sorted_t.numpy(), sorted_idx)
    np.testing.assert_array_equal(seg_t.numpy(), seg_starts)
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
    rank = lora_b.shape[1]
    out_ref = out.double().clone()
    for t, slot in enumerate(slots.tolist()):
        for s in range(3 if slot >= 0 else 0):
            cols = slice(offsets[s], offsets[s + 1])
            out_ref[t, cols] += y[t, s * rank:(s + 1) * rank].double() @ lora_b[slot, :, cols].double()
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
def test_dense_matches_segmented(num_slices, num_tokens):
    (x, lora_a, lora_b, out, slots, sorted_idx, seg_starts), offsets = _problem(
        num_tokens, num_slices, seed=11 + num_tokens)
    y = lora_ops.lora_shrink(x, lora_a, slots, sorted_idx, seg_starts, -1)
    y_dense = lora_ops.lora_shrink_dense(x, lora_a, slots)
    torch.testing.assert_close(y_dense, y, rtol=1e-5, atol=1e-5)
    expected = out.clone()
    lora_ops.lora_expand(expected, y, lora_b, slots, sorted_idx, seg_starts, -1, offsets)
    before = out.clone()
    actual = lora_ops.lora_expand_dense(out, y, lora_b, slots, offsets)
    assert torch.equal(out, before)  # functional: out itself is not written
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-4)


def test_dense_traces_with_static_shapes():
    (x, lora_a, lora_b, out, slots, _, _), offsets = _problem(8, 3, seed=2)

    def layer(x, out, slots):
        y = lora_ops.lora_shrink_dense(x, lora_a, slots)
        return lora_ops.lora_expand_dense(out, y, lora_b, slots, offsets)

    # A full graph (no graph break) is what XLA needs.
    compiled = torch.compile(layer, dynamic=False, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, out, slots), layer(x, out, slots))
