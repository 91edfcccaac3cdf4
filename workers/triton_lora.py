"""Triton kernels for the LoRA ops of ``workers.lora_ops`` (CUDA implementations).

Imported by the GPU worker only; importing registers ``lora_shrink`` and ``lora_expand`` below
with ``torch.library.register_kernel("spmd::<op>", "cuda")``. The launch functions also run on
CPU tensors under ``TRITON_INTERPRET=1`` (that is how the tests check them without a GPU).

A mixed batch is served by one launch per op: the grid's first axis enumerates BLOCK_M-token
blocks of every slot's segment of ``sorted_idx`` (at most ``cdiv(T, BLOCK_M) + L`` of them),
each program finds its slot from ``seg_starts`` and exits if it is past the last block. The
grid depends on host ints only (T, L, shapes), so a CUDA graph captured once stays valid when
``token_slots`` / ``sorted_idx`` / ``seg_starts`` are refilled for another mix of adapters.
``single_slot >= 0`` (every token on one adapter) goes to cuBLAS instead.

Shrink (``[T, K] @ [K, R]``, R tiny, K large) splits K over the grid's last axis into a float32
workspace, summed in a fixed order by a second kernel (deterministic, no atomics). Expand tiles
``out`` by (tokens, columns); a tile loops over the (at most four) slices it overlaps, reading
its y rows once per slice, and adds its float32 product to ``out`` before one rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from workers import lora_ops

# Enough programs to fill an H200's 132 SMs about twice: the split-K target of the shrink.
TARGET_PROGRAMS = 264
MIN_PROGRAMS = 132
MAX_SLICES = 4


@dataclass(frozen=True)
class ShrinkConfig:
    block_m: int
    block_r: int
    block_k: int
    split_k: int
    num_warps: int = 4
    num_stages: int = 2


@dataclass(frozen=True)
class ExpandConfig:
    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 2


def shrink_config(num_tokens: int, rank_width: int, hidden: int, dtype: torch.dtype) -> ShrinkConfig:
    """Tiles for ``lora_shrink``: split K until the grid has about TARGET_PROGRAMS programs."""
    block_m = 16 if num_tokens <= 1024 else 64
    block_r = max(16, min(64, triton.next_power_of_2(rank_width)))
    block_k = 64 if dtype == torch.float32 else 128
    programs = triton.cdiv(max(num_tokens, 1), block_m) * triton.cdiv(rank_width, block_r)
    split_k = max(1, min(TARGET_PROGRAMS // programs, triton.cdiv(hidden, 2 * block_k)))
    # A power of two: the split is a constexpr, and a few variants are all that ``warm_up``
    # compiles before serving (a new one mid-run costs a compilation inside a step).
    split_k = 1 << (split_k.bit_length() - 1)
    return ShrinkConfig(block_m, block_r, block_k, split_k)


def expand_config(num_tokens: int, width: int, rank: int, dtype: torch.dtype) -> ExpandConfig:
    """Tiles for ``lora_expand``: small token blocks for decode, wider ones for prefill; the
    widest column tile that still gives one program per SM (132 on an H200)."""
    block_m = 16 if num_tokens <= 256 else 32 if num_tokens <= 1024 else 64
    token_blocks = triton.cdiv(max(num_tokens, 1), block_m)
    widest = 64 if dtype == torch.float32 else 128
    block_n = next((n for n in (128, 64) if n <= widest
                    and token_blocks * triton.cdiv(width, n) >= MIN_PROGRAMS), 32)
    return ExpandConfig(block_m, block_n)


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _slots_pad(num_slots: int) -> int:
    return max(2, triton.next_power_of_2(num_slots))


def _num_blocks(num_tokens: int, num_slots: int, block_m: int) -> int:
    """An upper bound on the BLOCK_M-token blocks of all segments together (one partial each)."""
    return triton.cdiv(num_tokens, block_m) + min(num_slots, num_tokens)


# --------------------------------------------------------------------------- kernels


@triton.jit
def _segment_block(seg_starts_ptr, sorted_idx_ptr, pid, NUM_SLOTS: tl.constexpr,
                   SLOTS_PAD: tl.constexpr, BLOCK_M: tl.constexpr):
    """(slot, token indices (int64), row mask) of the pid-th token block of the step.

    Blocks are numbered slot by slot; slot >= NUM_SLOTS means pid is past the last block
    (then no row is in the mask).
    """
    slots = tl.arange(0, SLOTS_PAD)
    live = slots < NUM_SLOTS
    starts = tl.load(seg_starts_ptr + slots, mask=live, other=0)
    ends = tl.load(seg_starts_ptr + slots + 1, mask=live, other=0)
    blocks = tl.cdiv(ends - starts, BLOCK_M)
    last = tl.cumsum(blocks, axis=0)  # inclusive: slot s owns block ids [last - blocks, last)
    slot = tl.sum((last <= pid).to(tl.int32), axis=0)
    pick = slots == slot
    block_start = tl.sum(tl.where(pick, starts + (pid - last + blocks) * BLOCK_M, 0), axis=0)
    seg_end = tl.sum(tl.where(pick, ends, 0), axis=0)
    positions = block_start + tl.arange(0, BLOCK_M)
    m_mask = positions < seg_end
    tokens = tl.load(sorted_idx_ptr + positions, mask=m_mask, other=0).to(tl.int64)
    return slot, tokens, m_mask


@triton.jit
def _lora_shrink_kernel(x_ptr, a_ptr, out_ptr, sorted_idx_ptr, seg_starts_ptr,
                        x_row_stride, a_slot_stride, a_row_stride, out_split_stride,
                        out_row_stride, rank_width, hidden,
                        NUM_SLOTS: tl.constexpr, SLOTS_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, K_PER_SPLIT: tl.constexpr,
                        DOT_PRECISION: tl.constexpr):
    """One (token block, R block, K split): ``out[split, tokens, r] = x[tokens, ks] @ A[slot, r, ks]^T``."""
    slot, tokens, m_mask = _segment_block(seg_starts_ptr, sorted_idx_ptr, tl.program_id(0),
                                          NUM_SLOTS, SLOTS_PAD, BLOCK_M)
    if slot >= NUM_SLOTS:
        return
    cols = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = cols < rank_width
    x_rows = x_ptr + tokens[:, None] * x_row_stride
    a_rows = a_ptr + slot.to(tl.int64) * a_slot_stride + cols[:, None] * a_row_stride
    k_first = tl.program_id(2) * K_PER_SPLIT
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k in range(0, K_PER_SPLIT, BLOCK_K):
        ks = k_first + k + tl.arange(0, BLOCK_K)
        k_mask = ks < hidden
        x = tl.load(x_rows + ks[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        a = tl.load(a_rows + ks[None, :], mask=r_mask[:, None] & k_mask[None, :], other=0.0)
        acc += tl.dot(x, tl.trans(a), input_precision=DOT_PRECISION)
    out = (out_ptr + tl.program_id(2).to(tl.int64) * out_split_stride
           + tokens[:, None] * out_row_stride + cols[None, :])
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & r_mask[None, :])


@triton.jit(do_not_specialize=["num_tokens", "partial_split_stride"])  # vary with the step
def _lora_shrink_reduce_kernel(partial_ptr, token_slots_ptr, y_ptr, num_tokens, rank_width,
                               partial_split_stride, y_row_stride, NUM_SPLITS: tl.constexpr,
                               BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr):
    """``y = sum over splits of partial`` for BLOCK_T tokens; base tokens (never written) get 0."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_R)
    row_mask = rows < num_tokens
    mask = row_mask[:, None] & (cols < rank_width)[None, :]
    lora = tl.load(token_slots_ptr + rows, mask=row_mask, other=-1) >= 0
    offs = rows.to(tl.int64)[:, None] * rank_width + cols[None, :]
    acc = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
    for split in range(NUM_SPLITS):
        acc += tl.load(partial_ptr + split * partial_split_stride + offs,
                       mask=mask & lora[:, None], other=0.0)
    tl.store(y_ptr + rows.to(tl.int64)[:, None] * y_row_stride + cols[None, :],
             acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _expand_slice(acc, y_rows, b_slot, m_mask, cols, tile_start, index, start, end, rank,
                  b_row_stride, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                  DOT_PRECISION: tl.constexpr):
    """acc += y[tokens, index*r : (index+1)*r] @ B[slot, :, cols], columns outside [start, end) 0."""
    if (tile_start < end) & (tile_start + BLOCK_N > start):
        ks = tl.arange(0, BLOCK_R)
        k_mask = ks < rank
        y = tl.load(y_rows + (index * rank + ks)[None, :], mask=m_mask[:, None] & k_mask[None, :],
                    other=0.0)
        col_mask = (cols >= start) & (cols < end)
        b = tl.load(b_slot + ks[:, None] * b_row_stride + cols[None, :],
                    mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        acc += tl.dot(y, b, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _lora_expand_kernel(y_ptr, b_ptr, out_ptr, sorted_idx_ptr, seg_starts_ptr,
                        y_row_stride, b_slot_stride, b_row_stride, out_row_stride, rank, width,
                        end0, end1, end2, end3,
                        NUM_SLOTS: tl.constexpr, SLOTS_PAD: tl.constexpr, NUM_SLICES: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                        DOT_PRECISION: tl.constexpr):
    """One (token block, column block): ``out[tokens, cols] += y[tokens] @ B[slot][:, cols]``, per slice."""
    slot, tokens, m_mask = _segment_block(seg_starts_ptr, sorted_idx_ptr, tl.program_id(0),
                                          NUM_SLOTS, SLOTS_PAD, BLOCK_M)
    if slot >= NUM_SLOTS:
        return
    tile_start = tl.program_id(1) * BLOCK_N
    cols = tile_start + tl.arange(0, BLOCK_N)
    y_rows = y_ptr + tokens[:, None] * y_row_stride
    b_slot = b_ptr + slot.to(tl.int64) * b_slot_stride
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = _expand_slice(acc, y_rows, b_slot, m_mask, cols, tile_start, 0, 0, end0, rank,
                        b_row_stride, BLOCK_N, BLOCK_R, DOT_PRECISION)
    if NUM_SLICES > 1:
        acc = _expand_slice(acc, y_rows, b_slot, m_mask, cols, tile_start, 1, end0, end1, rank,
                            b_row_stride, BLOCK_N, BLOCK_R, DOT_PRECISION)
    if NUM_SLICES > 2:
        acc = _expand_slice(acc, y_rows, b_slot, m_mask, cols, tile_start, 2, end1, end2, rank,
                            b_row_stride, BLOCK_N, BLOCK_R, DOT_PRECISION)
    if NUM_SLICES > 3:
        acc = _expand_slice(acc, y_rows, b_slot, m_mask, cols, tile_start, 3, end2, end3, rank,
                            b_row_stride, BLOCK_N, BLOCK_R, DOT_PRECISION)
    out = out_ptr + tokens[:, None] * out_row_stride + cols[None, :]
    mask = m_mask[:, None] & (cols < width)[None, :]
    current = tl.load(out, mask=mask, other=0.0).to(tl.float32)
    tl.store(out, (current + acc).to(out_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------- launchers


def _last_dim_contiguous(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def lora_shrink(x: Tensor, lora_a: Tensor, token_slots: Tensor, sorted_idx: Tensor,
                seg_starts: Tensor, single_slot: int, *, config: ShrinkConfig | None = None) -> Tensor:
    assert x.dtype == lora_a.dtype, f"x is {x.dtype} but lora_a is {lora_a.dtype}"
    if single_slot >= 0:
        return torch.nn.functional.linear(x, lora_a[single_slot])
    num_tokens, hidden = x.shape
    num_slots, rank_width = lora_a.shape[:2]
    x, lora_a = _last_dim_contiguous(x), _last_dim_contiguous(lora_a)
    cfg = config or shrink_config(num_tokens, rank_width, hidden, x.dtype)
    k_per_split = triton.cdiv(triton.cdiv(hidden, cfg.split_k), cfg.block_k) * cfg.block_k
    split_k = triton.cdiv(hidden, k_per_split)
    if split_k == 1:
        # Base-token rows are never written by the kernel: start from zeros.
        y = torch.zeros((num_tokens, rank_width), dtype=x.dtype, device=x.device)
        out = y
    else:
        y = torch.empty((num_tokens, rank_width), dtype=x.dtype, device=x.device)
        out = torch.empty((split_k, num_tokens, rank_width), dtype=torch.float32, device=x.device)
    if num_tokens == 0 or rank_width == 0:
        return y.zero_()
    grid = (_num_blocks(num_tokens, num_slots, cfg.block_m), triton.cdiv(rank_width, cfg.block_r),
            split_k)
    _lora_shrink_kernel[grid](
        x, lora_a, out, sorted_idx, seg_starts, x.stride(0), lora_a.stride(0), lora_a.stride(1),
        out.stride(0) if split_k > 1 else 0, out.stride(-2), rank_width, hidden,
        NUM_SLOTS=num_slots, SLOTS_PAD=_slots_pad(num_slots), BLOCK_M=cfg.block_m,
        BLOCK_R=cfg.block_r, BLOCK_K=cfg.block_k, K_PER_SPLIT=k_per_split,
        DOT_PRECISION=_dot_precision(x.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if split_k > 1:
        block_r = triton.next_power_of_2(rank_width)
        block_t = max(1, min(64, 2048 // block_r))
        _lora_shrink_reduce_kernel[(triton.cdiv(num_tokens, block_t),)](
            out, token_slots, y, num_tokens, rank_width, out.stride(0), y.stride(0),
            NUM_SPLITS=split_k, BLOCK_T=block_t, BLOCK_R=block_r, num_warps=4)
    return y


def lora_expand(out: Tensor, y: Tensor, lora_b: Tensor, token_slots: Tensor, sorted_idx: Tensor,
                seg_starts: Tensor, single_slot: int, slice_offsets: list[int], *,
                config: ExpandConfig | None = None) -> None:
    num_slots, rank, width = lora_b.shape
    num_slices = len(slice_offsets) - 1
    assert 1 <= num_slices <= MAX_SLICES and slice_offsets[0] == 0 and slice_offsets[-1] == width
    assert out.shape[1] == width and y.shape[1] >= num_slices * rank
    assert y.dtype == lora_b.dtype, f"y is {y.dtype} but lora_b is {lora_b.dtype}"
    if single_slot >= 0:
        for s in range(num_slices):
            cols = slice(slice_offsets[s], slice_offsets[s + 1])
            out[:, cols].addmm_(y[:, s * rank:(s + 1) * rank], lora_b[single_slot, :, cols])
        return
    num_tokens = out.shape[0]
    if num_tokens == 0 or width == 0:
        return
    assert out.stride(-1) == 1, "out's columns must be contiguous (it is written in place)"
    y, lora_b = _last_dim_contiguous(y), _last_dim_contiguous(lora_b)
    cfg = config or expand_config(num_tokens, width, rank, out.dtype)
    ends = [*slice_offsets[1:], *[width] * (MAX_SLICES - num_slices)]
    grid = (_num_blocks(num_tokens, num_slots, cfg.block_m), triton.cdiv(width, cfg.block_n))
    _lora_expand_kernel[grid](
        y, lora_b, out, sorted_idx, seg_starts, y.stride(0), lora_b.stride(0), lora_b.stride(1),
        out.stride(0), rank, width, *ends, NUM_SLOTS=num_slots, SLOTS_PAD=_slots_pad(num_slots),
        NUM_SLICES=num_slices, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        BLOCK_R=max(16, triton.next_power_of_2(rank)), DOT_PRECISION=_dot_precision(y.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)


@torch.inference_mode()
def warm_up(stacks, max_tokens: int) -> int:
    """Compiles, before serving, every kernel variant that ``stacks`` (LoRAStack modules)
    can launch for a mixed batch of 1..``max_tokens`` tokens, so that no step compiles;
    returns how many variants were run."""
    geometries = {}
    for stack in stacks:  # every decoder layer has the same few
        a, b = stack.lora_a, stack.lora_b
        geometries.setdefault((*a.shape, *b.shape[1:], tuple(stack.slice_offsets), a.dtype), stack)
    seen = set()
    for geometry, stack in geometries.items():
        a, b = stack.lora_a, stack.lora_b
        num_slots, rank_width, hidden = a.shape
        rank, width = b.shape[1:]
        dev = a.device
        for num_tokens in range(1, max_tokens + 1):
            key = (geometry, shrink_config(num_tokens, rank_width, hidden, a.dtype),
                   expand_config(num_tokens, width, rank, a.dtype))
            if key in seen:
                continue
            seen.add(key)
            slots = (torch.arange(num_tokens, dtype=torch.int32) % min(2, num_slots)).numpy()
            sorted_idx, seg_starts = lora_ops.lora_metadata(slots, num_slots)
            slots, sorted_idx, seg_starts = (torch.from_numpy(v).to(dev)
                                             for v in (slots, sorted_idx, seg_starts))
            x = torch.zeros(num_tokens, hidden, dtype=a.dtype, device=dev)
            out = torch.zeros(num_tokens, width, dtype=a.dtype, device=dev)
            y = lora_shrink(x, a, slots, sorted_idx, seg_starts, -1)
            lora_expand(out, y, b, slots, sorted_idx, seg_starts, -1, stack.slice_offsets)
    torch.cuda.synchronize()
    return len(seen)


# The custom ops themselves (spmd::lora_shrink, spmd::lora_expand) are defined in lora_ops.
torch.library.register_kernel(lora_ops._lora_shrink, "cuda", lora_shrink)
torch.library.register_kernel(lora_ops._lora_expand, "cuda", lora_expand)
