"""LoRA custom ops (namespace ``spmd``): the shrink (x @ A^T) and expand (out += y @ B) of a
multi-adapter batch, plus their metadata and a static-shape ("laning") variant for XLA.

Notation: T tokens, L device slots (``max_loras``), r = ``max_lora_rank``, S slices of one
fused layer (1 for o/down, 2 for gate_up, 3 for qkv), R = S * r, K the layer's input width,
N its output width on this rank. ``lora_a`` is ``[L, R, K]`` (slices stacked along R) and
``lora_b`` is pre-transposed, ``[L, r, N]`` (slices side by side along N).

Per step the host builds ``token_slots [T]`` (-1: base model, else a slot in 0..L-1) and, from
it, ``sorted_idx [T]`` (token indices ordered by slot, base tokens last) and
``seg_starts [L+1]`` (slot s owns sorted positions ``[seg_starts[s], seg_starts[s+1])``).
``single_slot >= 0`` (a host int) says every token uses that slot: a plain matmul.

The custom-op bodies below are the CPU implementation (one matmul per slot with tokens); the
CUDA kernels live in ``workers.triton_lora``, registered when it is imported.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

# --------------------------------------------------------------------------- metadata


def lora_metadata(token_slots: np.ndarray, num_slots: int) -> tuple[np.ndarray, np.ndarray]:
    """``(sorted_idx int32 [T], seg_starts int32 [num_slots + 1])`` of ``token_slots`` (host)."""
    slots = np.asarray(token_slots, dtype=np.int64)
    # Base tokens (-1) sort after every slot.
    key = np.where(slots < 0, num_slots, slots)
    sorted_idx = np.argsort(key, kind="stable").astype(np.int32)
    seg_starts = np.searchsorted(key[sorted_idx], np.arange(num_slots + 1), side="left")
    return sorted_idx, seg_starts.astype(np.int32)


def _slices(slice_offsets: list[int], rank: int) -> list[tuple[slice, slice]]:
    """(y columns, out columns) of each slice."""
    return [(slice(s * rank, (s + 1) * rank), slice(lo, hi))
            for s, (lo, hi) in enumerate(zip(slice_offsets[:-1], slice_offsets[1:]))]


# --------------------------------------------------------------------------- segmented ops (CPU)


@torch.library.custom_op("spmd::lora_shrink", mutates_args=())
def _lora_shrink(x: Tensor, lora_a: Tensor, token_slots: Tensor, sorted_idx: Tensor,
                 seg_starts: Tensor, single_slot: int) -> Tensor:
    lora_a = lora_a.to(x.dtype)
    if single_slot >= 0:
        return torch.nn.functional.linear(x, lora_a[single_slot])
    if _lanes_pay(x.shape[0], lora_a.shape[0]):
        return lora_shrink_dense(x, lora_a, token_slots)
    y = x.new_zeros((x.shape[0], lora_a.shape[1]))
    bounds = seg_starts.tolist()
    order = sorted_idx.to(torch.int64)
    for slot in range(lora_a.shape[0]):
        if bounds[slot + 1] > bounds[slot]:
            rows = order[bounds[slot]:bounds[slot + 1]]
            y.index_copy_(0, rows, torch.nn.functional.linear(x.index_select(0, rows), lora_a[slot]))
    return y


@_lora_shrink.register_fake
def _(x, lora_a, token_slots, sorted_idx, seg_starts, single_slot):
    return x.new_empty((x.shape[0], lora_a.shape[1]))


@torch.library.custom_op("spmd::lora_expand", mutates_args=("out",))
def _lora_expand(out: Tensor, y: Tensor, lora_b: Tensor, token_slots: Tensor, sorted_idx: Tensor,
                 seg_starts: Tensor, single_slot: int, slice_offsets: list[int]) -> None:
    slices = _slices(slice_offsets, lora_b.shape[1])
    if single_slot >= 0:
        y, lora_b = y.to(out.dtype), lora_b.to(out.dtype)
        for y_cols, out_cols in slices:
            out[:, out_cols].addmm_(y[:, y_cols], lora_b[single_slot, :, out_cols])
        return
    if out.dtype == torch.float32 and _lanes_pay(out.shape[0], lora_b.shape[0]):
        # Lanes: y spread over the slots (zero but the token's own), one addmm per slice.
        num_slots, rank = lora_b.shape[:2]
        lanes = y.to(out.dtype)[:, None, :] * _slot_mask(token_slots, num_slots, out.dtype)[:, :, None]
        lora_b = lora_b.to(out.dtype)
        for y_cols, out_cols in slices:
            out[:, out_cols].addmm_(lanes[:, :, y_cols].reshape(out.shape[0], num_slots * rank),
                                    lora_b[:, :, out_cols].reshape(num_slots * rank, -1))
        return
    # The delta is float32 so that out + delta is rounded once, as addmm would.
    acc_dtype = torch.promote_types(out.dtype, torch.float32)
    y, lora_b = y.to(acc_dtype), lora_b.to(acc_dtype)
    bounds = seg_starts.tolist()
    order = sorted_idx.to(torch.int64)
    for slot in range(lora_b.shape[0]):
        if bounds[slot + 1] > bounds[slot]:
            rows = order[bounds[slot]:bounds[slot + 1]]
            y_rows = y.index_select(0, rows)
            delta = torch.empty((rows.shape[0], out.shape[1]), dtype=acc_dtype, device=out.device)
            for y_cols, out_cols in slices:
                torch.mm(y_rows[:, y_cols], lora_b[slot, :, out_cols], out=delta[:, out_cols])
            if delta.dtype == out.dtype:
                out.index_add_(0, rows, delta)  # ~3x faster than gather, addmm, scatter
            else:
                out.index_copy_(0, rows, (out.index_select(0, rows) + delta).to(out.dtype))


@_lora_expand.register_fake
def _(out, y, lora_b, token_slots, sorted_idx, seg_starts, single_slot, slice_offsets):
    return None


# --------------------------------------------------------------------------- dense (XLA)


# CPU, mixed batch: below this many token-slot pairs, computing every slot for every token
# (a few large ops) beats gathering each slot's tokens (a few small ops per slot): decode.
_LANES_MAX_PAIRS = 2048


def _lanes_pay(num_tokens: int, num_slots: int) -> bool:
    return num_tokens * num_slots <= _LANES_MAX_PAIRS


def _slot_mask(token_slots: Tensor, num_slots: int, dtype: torch.dtype) -> Tensor:
    """One-hot ``[T, L]`` of each token's slot; a base token (-1) selects nothing."""
    slots = torch.arange(num_slots, device=token_slots.device)
    return (token_slots[:, None] == slots).to(dtype)


def lora_shrink_dense(x: Tensor, lora_a: Tensor, token_slots: Tensor) -> Tensor:
    """``lora_shrink`` with static shapes: every token against every slot, then a one-hot select.

    L times the FLOPs of the segmented op, but no data-dependent shape and no host read, so it
    traces under ``torch.compile(dynamic=False)`` (the TPU path).
    """
    num_slots, rank_width, hidden = lora_a.shape
    y_all = (x @ lora_a.to(x.dtype).reshape(num_slots * rank_width, hidden).T)
    y_all = y_all.view(x.shape[0], num_slots, rank_width)
    return (y_all * _slot_mask(token_slots, num_slots, x.dtype)[:, :, None]).sum(dim=1)


def lanes_b(lora_b: Tensor, slice_offsets: list[int]) -> Tensor:
    """One slot's B ``[r, N]`` as the block-diagonal ``[S*r, N]`` of ``lora_lanes``: rows
    ``s*r:(s+1)*r`` hold slice s's columns, zeros elsewhere."""
    rank, width = lora_b.shape
    out = lora_b.new_zeros((len(slice_offsets) - 1) * rank, width)
    for y_cols, out_cols in _slices(slice_offsets, rank):
        out[y_cols, out_cols] = lora_b[:, out_cols]
    return out


def lora_lanes(x: Tensor, out: Tensor, lora_a: Tensor, lora_b_lanes: Tensor,
               lane_mask: Tensor) -> Tensor:
    """``out`` plus every token's LoRA delta, in the fewest ops that trace to static shapes
    (the TPU path): every token through every slot's A (one matmul), the lanes of other
    slots zeroed by ``lane_mask [T, L]``, then one matmul with the slots' block-diagonal
    Bs stacked (``lora_b_lanes [L*S*r, N]``, from ``lanes_b``)."""
    num_slots, rank_width, hidden = lora_a.shape
    y = x @ lora_a.reshape(num_slots * rank_width, hidden).T
    y = y.view(-1, num_slots, rank_width) * lane_mask[:, :, None]
    return out + y.reshape(-1, num_slots * rank_width) @ lora_b_lanes


# --------------------------------------------------------------------------- public API


def lora_shrink(x: Tensor, lora_a: Tensor, token_slots: Tensor, sorted_idx: Tensor,
                seg_starts: Tensor, single_slot: int) -> Tensor:
    """``y[t] = x[t] @ lora_a[token_slots[t]].T``: ``x [T, K]``, ``lora_a [L, R, K]`` -> ``[T, R]``.

    Rows of base tokens (slot -1) are zero. ``sorted_idx``/``seg_starts`` come from
    ``lora_metadata``; ``single_slot >= 0`` (every token on that slot) skips them. Output in
    ``x.dtype``, accumulated in float32.
    """
    return torch.ops.spmd.lora_shrink(x, lora_a, token_slots, sorted_idx, seg_starts, single_slot)


def lora_expand(out: Tensor, y: Tensor, lora_b: Tensor, token_slots: Tensor, sorted_idx: Tensor,
                seg_starts: Tensor, single_slot: int, slice_offsets: list[int]) -> None:
    """In place, for each slice s: ``out[t, o_s:o_{s+1}] += y[t, s*r:(s+1)*r] @ lora_b[slot_t, :, o_s:o_{s+1}]``.

    ``out [T, N]``, ``y [T, S*r]`` (from ``lora_shrink``), ``lora_b [L, r, N]`` (pre-transposed);
    ``slice_offsets`` is ``[0, o_1, ..., N]`` (S + 1 entries). Base-token rows are unchanged.
    The product is accumulated in float32 and added to ``out`` before one rounding.
    """
    torch.ops.spmd.lora_expand(out, y, lora_b, token_slots, sorted_idx, seg_starts, single_slot,
                               slice_offsets)
