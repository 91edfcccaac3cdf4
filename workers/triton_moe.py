"""Triton kernels for ``spmd::fused_moe`` (``workers.ops``): a mixture-of-experts MLP as two
grouped GEMMs over the (token, k) pairs sorted by expert.

Imported by the GPU worker only; importing registers ``fused_moe`` below with
``torch.library.register_kernel("spmd::fused_moe", "cuda")``. The launch functions also run
on CPU tensors under ``TRITON_INTERPRET=1`` (that is how the tests check them without a GPU).

Five launches, every grid sized from host ints and nothing read on the host, so a decode
step can be captured in a CUDA graph:

1. ``moe_align`` (two kernels): the T*K pairs, counted per expert chunk by chunk, then
   placed stably (pair order within an expert) into ``sorted_ids``, each expert's group
   padded to a multiple of BLOCK_M with the sentinel T*K; ``block_expert`` gives each
   M-block's expert and ``num_padded`` (a device scalar) the rows in use. The buffers are
   sized for the worst case, ``cdiv(T*K, BLOCK_M) + min(E, T*K)`` blocks; programs of the
   blocks past ``num_padded`` exit at once.
2. gate/up: per (M-block, column tile of I), the block's token rows of x gathered against
   ``w13[e]``'s gate and up rows together; the epilogue writes ``silu(gate) * up`` per pair.
3. down: per (M-block, column tile of H), that intermediate against ``w2[e]``, times the
   pair's routing weight, written in float32 per pair.
4. a sum over the K pairs of each token, cast to x's dtype.

Numerics follow the reference body: float32 accumulators, gate, up, silu(gate), their
product and the down projection rounded to the input dtype where eager torch rounds them,
routing weights applied in float32, IEEE (not TF32) dots for float32 inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from workers import ops  # noqa: F401  (defines spmd::fused_moe, registered below)

# The alignment's counting pass splits the pairs into at most this many chunks (programs).
MAX_ALIGN_CHUNKS = 64


@dataclass(frozen=True)
class MoEConfig:
    block_m: int  # sorted pairs per program: one expert's rows (with padding)
    gate_up_block_n: int  # columns of I per gate/up program (gate and up tiles each)
    down_block_n: int  # columns of H per down program
    block_k: int
    num_warps: int = 4
    num_stages: int = 3


def moe_config(num_tokens: int, top_k: int, num_experts: int, dtype: torch.dtype) -> MoEConfig:
    """Tiles by the mean number of pairs per expert: 16-row blocks for decode (an expert sees
    one or two tokens and the kernels stream weights), 128-row blocks for long prefills."""
    per_expert = num_tokens * top_k / num_experts
    wide = dtype != torch.float32  # float32 tiles take twice the shared memory
    if per_expert <= 16:
        return MoEConfig(16, 32, 64, 128 if wide else 64, num_warps=4, num_stages=4 if wide else 3)
    if per_expert <= 64:
        return MoEConfig(32, 64, 64, 64 if wide else 32, num_warps=4, num_stages=4 if wide else 3)
    if per_expert <= 256:
        return MoEConfig(64, 64, 128, 64 if wide else 32, num_warps=4, num_stages=4 if wide else 3)
    return MoEConfig(128, 64, 128, 64 if wide else 32, num_warps=8, num_stages=3)


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _experts_pad(num_experts: int) -> int:
    return max(16, triton.next_power_of_2(num_experts))


def max_blocks(num_pairs: int, num_experts: int, block_m: int) -> int:
    """An upper bound on the M-blocks of all expert groups together (one partial each)."""
    return triton.cdiv(num_pairs, block_m) + min(num_experts, num_pairs)


# --------------------------------------------------------------------------- alignment


@triton.jit
def _one_hot(ids_ptr, first, end, E_PAD: tl.constexpr, SUB: tl.constexpr):
    """(pair indices, live mask, ``[SUB, E_PAD]`` int32 one-hot of their experts)."""
    pairs = first + tl.arange(0, SUB)
    live = pairs < end
    ids = tl.load(ids_ptr + pairs, mask=live, other=-1)
    return pairs, live, (ids[:, None] == tl.arange(0, E_PAD)[None, :]).to(tl.int32)


@triton.jit
def _moe_count_kernel(ids_ptr, chunk_counts_ptr, num_pairs, chunk_size,
                      E_PAD: tl.constexpr, SUB: tl.constexpr):
    """``chunk_counts[c, e]``: the pairs of chunk c routed to expert e."""
    chunk = tl.program_id(0)
    start = chunk * chunk_size
    end = tl.minimum(start + chunk_size, num_pairs)
    counts = tl.zeros([E_PAD], tl.int32)
    for first in range(start, end, SUB):
        _, _, one_hot = _one_hot(ids_ptr, first, end, E_PAD, SUB)
        counts += tl.sum(one_hot, axis=0)
    tl.store(chunk_counts_ptr + chunk * E_PAD + tl.arange(0, E_PAD), counts)


@triton.jit
def _moe_align_kernel(ids_ptr, chunk_counts_ptr, sorted_ids_ptr, block_expert_ptr,
                      num_padded_ptr, num_pairs, chunk_size, num_chunks, num_blocks,
                      E_PAD: tl.constexpr, SUB: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCKS_TILE: tl.constexpr):
    """Places chunk c's pairs: expert e's group starts at the padded sizes of the experts
    before it, and this chunk's pairs of e follow the earlier chunks' (a stable sort)."""
    chunk = tl.program_id(0)
    experts = tl.arange(0, E_PAD)
    totals = tl.zeros([E_PAD], tl.int32)
    before = tl.zeros([E_PAD], tl.int32)
    for other in range(0, num_chunks):
        counts = tl.load(chunk_counts_ptr + other * E_PAD + experts)
        totals += counts
        before += tl.where(other < chunk, counts, 0)
    padded = tl.cdiv(totals, BLOCK_M) * BLOCK_M
    ends = tl.cumsum(padded, axis=0)
    starts = ends - padded
    next_slot = starts + before
    start = chunk * chunk_size
    end = tl.minimum(start + chunk_size, num_pairs)
    for first in range(start, end, SUB):
        pairs, live, one_hot = _one_hot(ids_ptr, first, end, E_PAD, SUB)
        rank = tl.cumsum(one_hot, axis=0) - one_hot  # earlier pairs of the same expert
        slot = tl.sum(one_hot * (next_slot[None, :] + rank), axis=1)
        tl.store(sorted_ids_ptr + slot, pairs, mask=live)
        next_slot += tl.sum(one_hot, axis=0)
    if chunk == 0:
        # The padding rows of each group get the sentinel T*K (masked by the GEMMs).
        pad = (starts + totals)[:, None] + tl.arange(0, BLOCK_M)[None, :]
        tl.store(sorted_ids_ptr + pad, tl.zeros(pad.shape, tl.int32) + num_pairs,
                 mask=pad < ends[:, None])
        num_padded = tl.sum(padded, axis=0)
        tl.store(num_padded_ptr, num_padded)
        for first_block in range(0, num_blocks, BLOCKS_TILE):
            blocks = first_block + tl.arange(0, BLOCKS_TILE)
            rows = blocks * BLOCK_M
            expert = tl.sum((ends[None, :] <= rows[:, None]).to(tl.int32), axis=1)
            tl.store(block_expert_ptr + blocks, tl.where(rows < num_padded, expert, -1),
                     mask=blocks < num_blocks)


@dataclass(frozen=True)
class MoEAlignment:
    """The pairs sorted by expert, for the grouped GEMMs (device tensors, worst-case sized)."""
    sorted_ids: Tensor  # [max_blocks * block_m] int32: pair t*K+k, or T*K for padding
    block_expert: Tensor  # [max_blocks] int32: the expert of each M-block, -1 past the end
    num_padded: Tensor  # [1] int32: rows of sorted_ids in use (a multiple of block_m)
    block_m: int


def moe_align(topk_ids: Tensor, num_experts: int, block_m: int) -> MoEAlignment:
    """Sorts the ``T*K`` (token, k) pairs of ``topk_ids [T, K]`` by expert, stably, each
    expert's group padded to a multiple of ``block_m``. Ids must lie in ``[0, num_experts)``."""
    ids = topk_ids.reshape(-1)
    ids = ids if ids.is_contiguous() else ids.contiguous()
    num_pairs, device = ids.numel(), ids.device
    blocks = max_blocks(num_pairs, num_experts, block_m)
    sorted_ids = torch.empty(blocks * block_m, dtype=torch.int32, device=device)
    block_expert = torch.empty(blocks, dtype=torch.int32, device=device)
    num_padded = torch.empty(1, dtype=torch.int32, device=device)
    if num_pairs == 0:
        return MoEAlignment(sorted_ids, block_expert, num_padded.zero_(), block_m)
    e_pad = _experts_pad(num_experts)
    sub = max(16, min(128, 4096 // e_pad))
    subs = triton.cdiv(num_pairs, sub)
    chunk_size = sub * triton.cdiv(subs, min(subs, MAX_ALIGN_CHUNKS))
    num_chunks = triton.cdiv(num_pairs, chunk_size)
    chunk_counts = torch.empty((num_chunks, e_pad), dtype=torch.int32, device=device)
    _moe_count_kernel[(num_chunks,)](ids, chunk_counts, num_pairs, chunk_size, E_PAD=e_pad,
                                     SUB=sub, num_warps=4)
    _moe_align_kernel[(num_chunks,)](
        ids, chunk_counts, sorted_ids, block_expert, num_padded, num_pairs, chunk_size,
        num_chunks, blocks, E_PAD=e_pad, SUB=sub, BLOCK_M=block_m,
        BLOCKS_TILE=max(16, min(128, 8192 // e_pad)), num_warps=4)
    return MoEAlignment(sorted_ids, block_expert, num_padded, block_m)


# --------------------------------------------------------------------------- grouped GEMMs


@triton.jit
def _block_tile(sorted_ids_ptr, block_expert_ptr, block, num_pairs, num_cols,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(expert (int64), pair indices (int64), row mask, columns, column mask) of the tile
    of M-block ``block`` and column block ``program_id(1)``."""
    expert = tl.load(block_expert_ptr + block).to(tl.int64)
    pairs = tl.load(sorted_ids_ptr + block * BLOCK_M + tl.arange(0, BLOCK_M))
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    return expert, pairs.to(tl.int64), pairs < num_pairs, cols, cols < num_cols


@triton.jit
def _moe_gate_up_kernel(x_ptr, w13_ptr, inter_ptr, sorted_ids_ptr, block_expert_ptr,
                        num_padded_ptr, x_row_stride, w_expert_stride, w_row_stride,
                        inter_row_stride, num_pairs, top_k, hidden, inter_size,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """``inter[pair, cols] = silu(x[token] @ w13[e, cols]^T) * (x[token] @ w13[e, I + cols]^T)``."""
    block = tl.program_id(0)
    if block * BLOCK_M >= tl.load(num_padded_ptr):
        return
    expert, pairs, row_mask, cols, col_mask = _block_tile(
        sorted_ids_ptr, block_expert_ptr, block, num_pairs, inter_size, BLOCK_M, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + (pairs // top_k)[:, None] * x_row_stride + ks[None, :]
    gate_ptrs = (w13_ptr + expert * w_expert_stride + cols[None, :].to(tl.int64) * w_row_stride
                 + ks[:, None])
    up_ptrs = gate_ptrs + inter_size * w_row_stride
    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, hidden, BLOCK_K):
        if EVEN_K:
            x = tl.load(x_ptrs, mask=row_mask[:, None], other=0.0)
            gate = tl.load(gate_ptrs, mask=col_mask[None, :], other=0.0)
            up = tl.load(up_ptrs, mask=col_mask[None, :], other=0.0)
        else:
            k_mask = ks < hidden - k
            x = tl.load(x_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            gate = tl.load(gate_ptrs, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
            up = tl.load(up_ptrs, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        acc_gate = tl.dot(x, gate, acc_gate, input_precision=DOT_PRECISION)
        acc_up = tl.dot(x, up, acc_up, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K
        gate_ptrs += BLOCK_K
        up_ptrs += BLOCK_K
    dtype = inter_ptr.dtype.element_ty
    # Rounded where eager rounds: the projections, silu's output and the product.
    gate = acc_gate.to(dtype).to(tl.float32)
    up = acc_up.to(dtype).to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
    tl.store(inter_ptr + pairs[:, None] * inter_row_stride + cols[None, :], (act * up).to(dtype),
             mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def _moe_down_kernel(inter_ptr, w2_ptr, weights_ptr, out_ptr, sorted_ids_ptr, block_expert_ptr,
                     num_padded_ptr, inter_row_stride, w_expert_stride, w_row_stride,
                     out_row_stride, num_pairs, hidden, inter_size,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """``out[pair, cols] = weight[pair] * (inter[pair] @ w2[e, cols]^T)`` in float32."""
    block = tl.program_id(0)
    if block * BLOCK_M >= tl.load(num_padded_ptr):
        return
    expert, pairs, row_mask, cols, col_mask = _block_tile(
        sorted_ids_ptr, block_expert_ptr, block, num_pairs, hidden, BLOCK_M, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = inter_ptr + pairs[:, None] * inter_row_stride + ks[None, :]
    w_ptrs = (w2_ptr + expert * w_expert_stride + cols[None, :].to(tl.int64) * w_row_stride
              + ks[:, None])
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, inter_size, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=row_mask[:, None], other=0.0)
            w = tl.load(w_ptrs, mask=col_mask[None, :], other=0.0)
        else:
            k_mask = ks < inter_size - k
            a = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    weight = tl.load(weights_ptr + pairs, mask=row_mask, other=0.0)
    # Eager rounds the expert's output to the input dtype before weighting it in float32.
    y = acc.to(inter_ptr.dtype.element_ty).to(tl.float32) * weight[:, None]
    tl.store(out_ptr + pairs[:, None] * out_row_stride + cols[None, :], y,
             mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def _moe_sum_kernel(partial_ptr, out_ptr, hidden, top_k, out_row_stride, BLOCK: tl.constexpr):
    """``out[t] = sum_k partial[t * K + k]``, cast to out's dtype."""
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < hidden
    acc = tl.zeros([BLOCK], tl.float32)
    for k in range(0, top_k):
        acc += tl.load(partial_ptr + (token * top_k + k) * hidden + cols, mask=mask, other=0.0)
    tl.store(out_ptr + token * out_row_stride + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------- launcher


def _last_dim_contiguous(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def fused_moe(x: Tensor, w13: Tensor, w2: Tensor, topk_weights: Tensor, topk_ids: Tensor, *,
              config: MoEConfig | None = None) -> Tensor:
    """``config`` overrides ``moe_config`` (for tests and tile sweeps)."""
    num_tokens, hidden = x.shape
    num_experts, inter_size = w2.shape[0], w2.shape[2]
    top_k = topk_ids.shape[1]
    assert w13.shape == (num_experts, 2 * inter_size, hidden) and w2.shape[1] == hidden
    assert x.dtype == w13.dtype == w2.dtype, f"x {x.dtype}, w13 {w13.dtype}, w2 {w2.dtype}"
    out = torch.empty((num_tokens, hidden), dtype=x.dtype, device=x.device)
    if num_tokens == 0 or hidden == 0:
        return out
    if inter_size == 0:
        return out.zero_()
    x, w13, w2 = _last_dim_contiguous(x), _last_dim_contiguous(w13), _last_dim_contiguous(w2)
    weights = topk_weights.reshape(-1).to(torch.float32).contiguous()
    num_pairs = num_tokens * top_k
    cfg = config or moe_config(num_tokens, top_k, num_experts, x.dtype)
    align = moe_align(topk_ids, num_experts, cfg.block_m)
    blocks = align.block_expert.shape[0]
    precision = _dot_precision(x.dtype)
    inter = torch.empty((num_pairs, inter_size), dtype=x.dtype, device=x.device)
    _moe_gate_up_kernel[(blocks, triton.cdiv(inter_size, cfg.gate_up_block_n))](
        x, w13, inter, align.sorted_ids, align.block_expert, align.num_padded, x.stride(0),
        w13.stride(0), w13.stride(1), inter.stride(0), num_pairs, top_k, hidden, inter_size,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.gate_up_block_n, BLOCK_K=cfg.block_k,
        EVEN_K=hidden % cfg.block_k == 0, DOT_PRECISION=precision, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages)
    partial = torch.empty((num_pairs, hidden), dtype=torch.float32, device=x.device)
    _moe_down_kernel[(blocks, triton.cdiv(hidden, cfg.down_block_n))](
        inter, w2, weights, partial, align.sorted_ids, align.block_expert, align.num_padded,
        inter.stride(0), w2.stride(0), w2.stride(1), partial.stride(0), num_pairs, hidden,
        inter_size, BLOCK_M=cfg.block_m, BLOCK_N=cfg.down_block_n, BLOCK_K=cfg.block_k,
        EVEN_K=inter_size % cfg.block_k == 0, DOT_PRECISION=precision, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages)
    block = min(triton.next_power_of_2(hidden), 1024)
    _moe_sum_kernel[(num_tokens, triton.cdiv(hidden, block))](
        partial, out, hidden, top_k, out.stride(0), BLOCK=block, num_warps=4)
    return out


torch.library.register_kernel("spmd::fused_moe", "cuda", fused_moe)
