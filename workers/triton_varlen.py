"""Triton kernel for ``spmd::varlen_attention`` (``workers.ops``): flash attention within each
of a packed batch of whole sequences, no KV cache (prefill-only models: encoders, embedders).

Imported by the GPU worker only; importing registers ``varlen_attention`` below with
``torch.library.register_kernel("spmd::varlen_attention", "cuda")``. The launch function also
runs on CPU tensors under ``TRITON_INTERPRET=1`` (that is how the tests check it without a GPU).

One program per (BLOCK_M-query block, head). The grid's first axis enumerates the query blocks
of every sequence one after another (at most ``T // BLOCK_M + S`` of them, a bound from host
ints); each program finds its sequence from ``cu_seqlens`` (a cumulative sum of block counts
in registers) and exits if it is past the last block, so short sequences launch no empty
tiles beyond that bound and nothing is read on the host. Key tiles that need no mask (inside
the sequence, and below the diagonal when causal) run in a loop of their own; the at most
``BLOCK_M / BLOCK_N + 1`` edge tiles after them are masked. Numerics: float32 softmax
statistics and accumulator, ``p`` rounded to the input dtype for the second dot (as flash
attention does), IEEE (not TF32) dots for float32 inputs. Batch-invariant like the CPU op: the
tiles depend on head_dim and dtype only, and a query row sees the same key tiles in the same
order whatever else is in the batch (fully masked tiles add exact zeros).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from workers import ops  # noqa: F401  (defines spmd::varlen_attention, registered below)

LOG2_E = 1.4426950408889634
MAX_HEAD_DIM = 256


@dataclass(frozen=True)
class VarlenConfig:
    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 2


def varlen_config(head_dim: int, dtype: torch.dtype) -> VarlenConfig:
    """Tiles for ``varlen_attention``, from the head size and dtype alone: a sequence's output
    then never depends on what else is in the batch (the tiles fix each row's summation order).
    Embedding batches are many short sequences, where 64-query blocks waste less of a tile than
    128-query ones. float32 (the parity runs) keeps small tiles. Every choice here compiles
    without register spills on sm_90 (ptxas -v)."""
    if dtype == torch.float32:
        if head_dim <= 64:
            return VarlenConfig(32, 32)
        return VarlenConfig(32 if head_dim <= 128 else 16, 16, num_warps=8)
    if head_dim <= 64:
        return VarlenConfig(64, 64)
    if head_dim <= 128:
        return VarlenConfig(128, 64, num_warps=8)
    return VarlenConfig(64, 32, num_warps=8)


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 runs must match the CPU reference: no TF32.
    return "ieee" if dtype == torch.float32 else "tf32"


# --------------------------------------------------------------------------- kernel


@triton.jit
def _sequence_block(cu_seqlens_ptr, num_seqs, pid, SEQS_PAD: tl.constexpr, BLOCK_M: tl.constexpr):
    """(first token (int64), length, first query row) of the pid-th query block of the batch;
    length 0 when pid is past the last block. Blocks are numbered sequence by sequence."""
    seqs = tl.arange(0, SEQS_PAD)
    live = seqs < num_seqs
    starts = tl.load(cu_seqlens_ptr + seqs, mask=live, other=0)
    ends = tl.load(cu_seqlens_ptr + seqs + 1, mask=live, other=0)
    blocks = tl.cdiv(ends - starts, BLOCK_M)
    last = tl.cumsum(blocks, axis=0)  # inclusive: sequence s owns block ids [last - blocks, last)
    seq = tl.sum((last <= pid).to(tl.int32), axis=0)
    pick = seqs == seq
    seq_start = tl.sum(tl.where(pick, starts, 0), axis=0)
    seq_len = tl.sum(tl.where(pick, ends - starts, 0), axis=0)
    first_row = tl.sum(tl.where(pick, pid - last + blocks, 0), axis=0) * BLOCK_M
    return seq_start.to(tl.int64), seq_len, first_row


@triton.jit
def _attend_tile(q, acc, m_i, l_i, k_ptrs, v_ptrs, rows, cols, seq_len, dim_mask, qk_scale,
                 MASKED: tl.constexpr, CAUSAL: tl.constexpr, PAD_DIMS: tl.constexpr,
                 DOT_PRECISION: tl.constexpr):
    """One online-softmax step over the key tile at ``cols`` (positions in the sequence), whose
    K and V rows ``k_ptrs`` / ``v_ptrs`` point at."""
    if MASKED:
        kv_mask = cols[:, None] < seq_len
        if PAD_DIMS:
            kv_mask = kv_mask & dim_mask[None, :]
        k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
        v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
    elif PAD_DIMS:
        k = tl.load(k_ptrs, mask=dim_mask[None, :], other=0.0)
        v = tl.load(v_ptrs, mask=dim_mask[None, :], other=0.0)
    else:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    # Scores in log2 units: exp2 is the cheap instruction; scale * log2(e) folds into one multiply.
    scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    if MASKED:
        visible = cols[None, :] < seq_len
        if CAUSAL:
            visible = visible & (cols[None, :] <= rows[:, None])
        scores = tl.where(visible, scores, float("-inf"))
    # Key 0 is visible to every row and is in the first tile, so m_new is finite from then on.
    m_new = tl.maximum(m_i, tl.max(scores, axis=1))
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(scores - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


# The batch's sizes are not specialized on (Triton would compile a variant per "divisible by
# 16" / "equal to 1" of each int): one compilation per SEQS_PAD bucket serves every batch.
@triton.jit(do_not_specialize=["num_seqs", "num_tokens"])
def _varlen_attention_kernel(q_ptr, k_ptr, v_ptr, cu_seqlens_ptr, out_ptr, qk_scale, num_seqs,
                             num_tokens, q_token_stride, q_head_stride, k_token_stride,
                             k_head_stride, v_token_stride, v_head_stride, out_token_stride,
                             out_head_stride, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
                             HD_PAD: tl.constexpr, SEQS_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
                             BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                             DOT_PRECISION: tl.constexpr):
    """Flash attention of one BLOCK_M-query block of one (sequence, head) over the sequence."""
    pid = tl.program_id(0)
    head = tl.program_id(1)
    dims = tl.arange(0, HD_PAD)
    dim_mask = dims < HEAD_DIM
    if pid == 0:
        # Batch padding past cu_seqlens[-1] comes out zero (one program per head writes it).
        padding_start = tl.load(cu_seqlens_ptr + num_seqs)
        for start in range(padding_start, num_tokens, BLOCK_M):
            pad_rows = (start + tl.arange(0, BLOCK_M)).to(tl.int64)
            tl.store(out_ptr + pad_rows[:, None] * out_token_stride + head * out_head_stride
                     + dims[None, :], tl.zeros([BLOCK_M, HD_PAD], out_ptr.dtype.element_ty),
                     mask=(pad_rows[:, None] < num_tokens) & dim_mask[None, :])
    seq_start, seq_len, first_row = _sequence_block(cu_seqlens_ptr, num_seqs, pid, SEQS_PAD,
                                                    BLOCK_M)
    if seq_len == 0:
        return
    kv_head = head // GROUP
    rows = first_row + tl.arange(0, BLOCK_M)
    q_mask = (rows[:, None] < seq_len) & dim_mask[None, :]
    q = tl.load(q_ptr + (seq_start + rows)[:, None] * q_token_stride + head * q_head_stride
                + dims[None, :], mask=q_mask, other=0.0)
    cols = tl.arange(0, BLOCK_N)
    kv_rows = (seq_start + cols)[:, None]
    k_ptrs = k_ptr + kv_rows * k_token_stride + kv_head * k_head_stride + dims[None, :]
    v_ptrs = v_ptr + kv_rows * v_token_stride + kv_head * v_head_stride + dims[None, :]
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HD_PAD], tl.float32)
    # Full tiles: inside the sequence and, when causal, wholly at or below every row's diagonal
    # (BLOCK_M is a multiple of BLOCK_N, so first_row is a tile boundary).
    full_end = seq_len - seq_len % BLOCK_N
    kv_end = seq_len
    if CAUSAL:
        full_end = tl.minimum(full_end, first_row)
        kv_end = tl.minimum(seq_len, first_row + BLOCK_M)
    for start in range(0, full_end, BLOCK_N):
        acc, m_i, l_i = _attend_tile(q, acc, m_i, l_i, k_ptrs + start * k_token_stride,
                                     v_ptrs + start * v_token_stride, rows, start + cols, seq_len,
                                     dim_mask, qk_scale, False, CAUSAL, HD_PAD != HEAD_DIM,
                                     DOT_PRECISION)
    for start in range(full_end, kv_end, BLOCK_N):
        acc, m_i, l_i = _attend_tile(q, acc, m_i, l_i, k_ptrs + start * k_token_stride,
                                     v_ptrs + start * v_token_stride, rows, start + cols, seq_len,
                                     dim_mask, qk_scale, True, CAUSAL, HD_PAD != HEAD_DIM,
                                     DOT_PRECISION)
    out = acc / l_i[:, None]
    tl.store(out_ptr + (seq_start + rows)[:, None] * out_token_stride + head * out_head_stride
             + dims[None, :], out.to(out_ptr.dtype.element_ty), mask=q_mask)


# --------------------------------------------------------------------------- launch


def _last_dim_contiguous(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def seqs_bucket(num_seqs: int) -> int:
    """The kernel's SEQS_PAD (one compiled variant each) for a batch of ``num_seqs``."""
    return max(triton.next_power_of_2(num_seqs), 16)


def seqs_buckets(max_num_seqs: int) -> list[int]:
    """Every SEQS_PAD a batch of 1..``max_num_seqs`` sequences uses."""
    return [16 << i for i in range((seqs_bucket(max_num_seqs) // 16).bit_length())]


def num_query_blocks(num_tokens: int, num_seqs: int, block_m: int) -> int:
    """An upper bound on the BLOCK_M-query blocks of all sequences (one partial each)."""
    return num_tokens // block_m + num_seqs


def varlen_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int,
                     scale: float, causal: bool, *, config: VarlenConfig | None = None) -> Tensor:
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    assert k.shape == v.shape == (num_tokens, num_kv_heads, head_dim), (q.shape, k.shape, v.shape)
    assert num_heads % num_kv_heads == 0 and head_dim <= MAX_HEAD_DIM
    assert q.dtype == k.dtype == v.dtype, (q.dtype, k.dtype, v.dtype)
    # Row-strided views (the split of a fused qkv output) are read in place.
    q, k, v = _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v)
    out = torch.empty_like(q)
    num_seqs = cu_seqlens.shape[0] - 1
    if num_tokens == 0 or num_heads == 0:
        return out
    if num_seqs <= 0:
        return out.zero_()
    # max_seqlen is not needed: the grid is bounded by host ints, and tiles do not depend on it.
    config = config or varlen_config(head_dim, q.dtype)
    assert config.block_m % config.block_n == 0, config
    cu_seqlens = cu_seqlens if cu_seqlens.dtype == torch.int32 else cu_seqlens.to(torch.int32)
    grid = (num_query_blocks(num_tokens, num_seqs, config.block_m), num_heads)
    _varlen_attention_kernel[grid](
        q, k, v, cu_seqlens, out, scale * LOG2_E, num_seqs, num_tokens, q.stride(0), q.stride(1),
        k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        GROUP=num_heads // num_kv_heads, HEAD_DIM=head_dim,
        HD_PAD=max(triton.next_power_of_2(head_dim), 16),
        SEQS_PAD=seqs_bucket(num_seqs), BLOCK_M=config.block_m,
        BLOCK_N=config.block_n, CAUSAL=causal, DOT_PRECISION=_dot_precision(q.dtype),
        num_warps=config.num_warps, num_stages=config.num_stages)
    return out


torch.library.register_kernel("spmd::varlen_attention", "cuda", varlen_attention)
