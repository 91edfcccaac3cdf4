"""Triton kernels: the CUDA implementations of the ``spmd`` custom ops of ``workers.ops``.

Imported by the GPU worker only; importing registers each wrapper below with
``torch.library.register_kernel("spmd::<op>", "cuda")``, so call sites keep using
``workers.ops``. Numerics follow the reference bodies in ``workers.ops``: float32
math, intermediates rounded to the input dtype where eager torch rounds them, and
IEEE (not TF32) dots for float32 inputs. No wrapper reads a device tensor on the
host and every grid is sized from host ints, so all of them can be captured in
CUDA graphs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from workers import ops  # noqa: F401  (defines the spmd ops registered below)

# Decode attention splits each context into partitions of this many tokens (split-K);
# a second kernel merges them by log-sum-exp.
DECODE_PARTITION_SIZE = 512


# --------------------------------------------------------------------------- norms


@triton.jit
def _rms_norm_kernel(x_ptr, residual_ptr, weight_ptr, out_ptr, residual_out_ptr,
                     x_row_stride, residual_row_stride, hidden, eps,
                     HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        residual = tl.load(residual_ptr + row * residual_row_stride + cols, mask=mask, other=0.0)
        # The sum is rounded to the residual stream's dtype before it is normalised, as in eager.
        x = (x.to(tl.float32) + residual.to(tl.float32)).to(residual_out_ptr.dtype.element_ty)
        tl.store(residual_out_ptr + row * hidden + cols, x, mask=mask)
    x32 = x.to(tl.float32)
    variance = tl.sum(x32 * x32, axis=0) / hidden
    normed = (x32 * tl.rsqrt(variance + eps)).to(x.dtype).to(tl.float32)
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * hidden + cols, (weight * normed).to(out_ptr.dtype.element_ty), mask=mask)


def _rows(x: Tensor) -> Tensor:
    """``x`` as a 2-D ``[rows, last]`` view (a copy only if its last dim is strided)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _launch_rms_norm(x: Tensor, residual: Tensor | None, weight: Tensor, eps: float,
                     out_dtype: torch.dtype, residual_dtype: torch.dtype | None):
    hidden = x.shape[-1]
    x2 = _rows(x)
    res2 = _rows(residual) if residual is not None else x2
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    res_out = torch.empty(x.shape, dtype=residual_dtype, device=x.device) if residual is not None else out
    block = triton.next_power_of_2(hidden)
    if x2.shape[0] > 0:
        # No FMA contraction: eager rounds every product separately, and fp32 runs must match it.
        _rms_norm_kernel[(x2.shape[0],)](
            x2, res2, weight.contiguous(), out, res_out, x2.stride(0), res2.stride(0), hidden, eps,
            HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=min(max(block // 512, 1), 16),
            enable_fp_fusion=False)
    return out, res_out


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    out, _ = _launch_rms_norm(x, None, weight, eps, torch.promote_types(weight.dtype, x.dtype), None)
    return out


def fused_add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor,
                       eps: float) -> tuple[Tensor, Tensor]:
    residual_dtype = torch.promote_types(x.dtype, residual.dtype)
    return _launch_rms_norm(x, residual, weight, eps,
                            torch.promote_types(weight.dtype, residual_dtype), residual_dtype)


# --------------------------------------------------------------------------- MLP


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, x_row_stride, width, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < width
    gate = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * x_row_stride + width + cols, mask=mask, other=0.0)
    act = (gate / (1.0 + tl.exp(-gate))).to(up.dtype).to(tl.float32)
    tl.store(out_ptr + row * width + cols, (act * up.to(tl.float32)).to(out_ptr.dtype.element_ty),
             mask=mask)


def silu_and_mul(x: Tensor) -> Tensor:
    width = x.shape[-1] // 2
    x2 = _rows(x)
    out = torch.empty((*x.shape[:-1], width), dtype=x.dtype, device=x.device)
    block = min(triton.next_power_of_2(max(width, 1)), 1024)
    if x2.shape[0] > 0 and width > 0:
        _silu_and_mul_kernel[(x2.shape[0], triton.cdiv(width, block))](
            x2, out, x2.stride(0), width, BLOCK=block, num_warps=4, enable_fp_fusion=False)
    return out


# --------------------------------------------------------------------------- RoPE


@triton.jit
def _rotate_heads(x_ptr, out_ptr, num_heads, cos, sin,
                  HEAD_DIM: tl.constexpr, HEADS_PAD: tl.constexpr, HALF_PAD: tl.constexpr):
    heads = tl.arange(0, HEADS_PAD)
    dims = tl.arange(0, HALF_PAD)
    mask = (heads[:, None] < num_heads) & (dims[None, :] < HEAD_DIM // 2)
    offs = heads[:, None] * HEAD_DIM + dims[None, :]
    x1 = tl.load(x_ptr + offs, mask=mask, other=0.0)
    x2 = tl.load(x_ptr + offs + HEAD_DIM // 2, mask=mask, other=0.0)
    dtype = x1.dtype
    x1 = x1.to(tl.float32)
    x2 = x2.to(tl.float32)
    # Each product is rounded to the input dtype before the sum, as eager arithmetic does.
    out1 = (x1 * cos).to(dtype).to(tl.float32) - (x2 * sin).to(dtype).to(tl.float32)
    out2 = (x2 * cos).to(dtype).to(tl.float32) + (x1 * sin).to(dtype).to(tl.float32)
    tl.store(out_ptr + offs, out1.to(dtype), mask=mask)
    tl.store(out_ptr + offs + HEAD_DIM // 2, out2.to(dtype), mask=mask)


@triton.jit
def _rotary_kernel(positions_ptr, q_ptr, k_ptr, cache_ptr, q_out_ptr, k_out_ptr,
                   q_row_stride, k_row_stride, cache_row_stride, num_heads, num_kv_heads,
                   HEAD_DIM: tl.constexpr, HEADS_PAD: tl.constexpr, HALF_PAD: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    position = tl.load(positions_ptr + token).to(tl.int64)
    dims = tl.arange(0, HALF_PAD)
    dmask = dims < HEAD_DIM // 2
    row = cache_ptr + position * cache_row_stride
    cos = tl.load(row + dims, mask=dmask, other=0.0).to(q_ptr.dtype.element_ty).to(tl.float32)
    sin = tl.load(row + HEAD_DIM // 2 + dims, mask=dmask, other=0.0)
    sin = sin.to(q_ptr.dtype.element_ty).to(tl.float32)
    _rotate_heads(q_ptr + token * q_row_stride, q_out_ptr + token * num_heads * HEAD_DIM,
                  num_heads, cos[None, :], sin[None, :], HEAD_DIM, HEADS_PAD, HALF_PAD)
    _rotate_heads(k_ptr + token * k_row_stride, k_out_ptr + token * num_kv_heads * HEAD_DIM,
                  num_kv_heads, cos[None, :], sin[None, :], HEAD_DIM, HEADS_PAD, HALF_PAD)


def rotary_embedding(positions: Tensor, q: Tensor, k: Tensor, cos_sin_cache: Tensor,
                     head_dim: int) -> tuple[Tensor, Tensor]:
    assert cos_sin_cache.shape[-1] == head_dim, "cos_sin_cache must be [max_position, head_dim]"
    assert q.dtype == k.dtype, f"q is {q.dtype} but k is {k.dtype}"
    num_tokens = q.shape[0]
    # Row-strided views (the split of the fused qkv output) are read in place.
    q2, k2 = q.reshape(num_tokens, -1), k.reshape(num_tokens, -1)
    q2 = q2 if q2.stride(-1) == 1 else q2.contiguous()
    k2 = k2 if k2.stride(-1) == 1 else k2.contiguous()
    cache = cos_sin_cache if cos_sin_cache.stride(-1) == 1 else cos_sin_cache.contiguous()
    num_heads, num_kv_heads = q2.shape[1] // head_dim, k2.shape[1] // head_dim
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if num_tokens > 0:
        _rotary_kernel[(num_tokens,)](
            positions, q2, k2, cache, q_out, k_out, q2.stride(0), k2.stride(0), cache.stride(0),
            num_heads, num_kv_heads, HEAD_DIM=head_dim,
            HEADS_PAD=triton.next_power_of_2(max(num_heads, num_kv_heads)),
            HALF_PAD=triton.next_power_of_2(head_dim // 2), num_warps=4, enable_fp_fusion=False)
    return q_out, k_out


# --------------------------------------------------------------------------- paged KV cache


@triton.jit
def _fp8_store(ptr, scales_ptr, dst, scale_dst, x, mask, head_mask):
    """Quantizes ``x [HEADS_PAD, HD_PAD]`` per head (amax / 448) into e4m3 at ``ptr + dst``,
    its scales at ``scales_ptr + scale_dst`` (as ``workers.ops.fp8_quantize``)."""
    x = x.to(tl.float32)
    scale = tl.maximum(tl.max(tl.abs(x), axis=1), 1e-8 * 448.0) / 448.0
    values = tl.minimum(tl.maximum(x / scale[:, None], -448.0), 448.0)
    tl.store(ptr + dst, values.to(ptr.dtype.element_ty), mask=mask)
    tl.store(scales_ptr + scale_dst, scale, mask=head_mask)


@triton.jit
def _write_kv_cache_kernel(key_ptr, value_ptr, cache_ptr, slot_mapping_ptr, scales_ptr,
                           key_token_stride, key_head_stride, value_token_stride, value_head_stride,
                           cache_kv_stride, cache_block_stride, cache_slot_stride, cache_head_stride,
                           scale_kv_stride, scale_block_stride, scale_head_stride,
                           num_kv_heads, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
                           HEADS_PAD: tl.constexpr, HD_PAD: tl.constexpr, FP8: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    heads = tl.arange(0, HEADS_PAD)
    dims = tl.arange(0, HD_PAD)
    # slot == -1 marks a padding token: nothing is written.
    mask = (heads[:, None] < num_kv_heads) & (dims[None, :] < HEAD_DIM) & (slot >= 0)
    dst = ((slot // BLOCK_SIZE) * cache_block_stride + (slot % BLOCK_SIZE) * cache_slot_stride
           + heads[:, None] * cache_head_stride + dims[None, :])
    key = tl.load(key_ptr + token * key_token_stride + heads[:, None] * key_head_stride + dims[None, :],
                  mask=mask)
    value = tl.load(value_ptr + token * value_token_stride + heads[:, None] * value_head_stride
                    + dims[None, :], mask=mask)
    if FP8:
        head_mask = (heads < num_kv_heads) & (slot >= 0)
        scale_dst = ((slot // BLOCK_SIZE) * scale_block_stride + heads * scale_head_stride
                     + slot % BLOCK_SIZE)
        _fp8_store(cache_ptr, scales_ptr, dst, scale_dst, key, mask, head_mask)
        _fp8_store(cache_ptr + cache_kv_stride, scales_ptr + scale_kv_stride, dst, scale_dst,
                   value, mask, head_mask)
    else:
        tl.store(cache_ptr + dst, key.to(cache_ptr.dtype.element_ty), mask=mask)
        tl.store(cache_ptr + cache_kv_stride + dst, value.to(cache_ptr.dtype.element_ty),
                 mask=mask)


def _last_dim_contiguous(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _scale_args(kv_cache: Tensor, kv_scales: Tensor | None) -> tuple:
    """(scales pointer, kv / block / head strides); an unused pointer when not FP8."""
    if kv_scales is None:
        return (kv_cache, 0, 0, 0)
    two, blocks, block_size, heads = kv_cache.shape[:4]
    assert kv_scales.shape == (two, blocks, heads, block_size) and kv_scales.stride(-1) == 1
    assert kv_cache.dtype == torch.float8_e4m3fn and kv_scales.dtype == torch.float32
    return (kv_scales, *kv_scales.stride()[:3])


def write_kv_cache_fp8(key: Tensor, value: Tensor, kv_cache: Tensor, kv_scales: Tensor,
                       slot_mapping: Tensor) -> None:
    write_kv_cache(key, value, kv_cache, slot_mapping, kv_scales)


def write_kv_cache(key: Tensor, value: Tensor, kv_cache: Tensor, slot_mapping: Tensor,
                   kv_scales: Tensor | None = None) -> None:
    block_size, num_kv_heads, head_dim = kv_cache.shape[2:]
    assert kv_cache.stride(-1) == 1, "kv_cache's head_dim must be contiguous"
    key, value = _last_dim_contiguous(key), _last_dim_contiguous(value)
    if key.shape[0] == 0:
        return
    scales, *scale_strides = _scale_args(kv_cache, kv_scales)
    _write_kv_cache_kernel[(key.shape[0],)](
        key, value, kv_cache, slot_mapping, scales, key.stride(0), key.stride(1), value.stride(0),
        value.stride(1), *kv_cache.stride()[:4], *scale_strides, num_kv_heads,
        BLOCK_SIZE=block_size, HEAD_DIM=head_dim, HEADS_PAD=triton.next_power_of_2(num_kv_heads),
        HD_PAD=triton.next_power_of_2(head_dim), FP8=kv_scales is not None, num_warps=4)


# --------------------------------------------------------------------------- attention


@triton.jit
def _load_kv_tile(cache_ptr, block_table_row, positions, pos_mask, dims, dim_mask, kv_head,
                  cache_kv_stride, cache_block_stride, cache_slot_stride, cache_head_stride,
                  scales_ptr, scale_kv_stride, scale_block_stride, scale_head_stride,
                  BLOCK_SIZE: tl.constexpr, PAD_DIMS: tl.constexpr, FP8: tl.constexpr):
    """K and V ``[BLOCK_N, HD_PAD]`` of the given context positions, through the block table,
    as stored, and (FP8) their scales ``[BLOCK_N]`` (ones otherwise): the callers apply
    K's to the scores and V's to the probabilities, in registers."""
    block = tl.load(block_table_row + positions // BLOCK_SIZE, mask=pos_mask, other=0).to(tl.int64)
    offs = (block[:, None] * cache_block_stride + (positions % BLOCK_SIZE)[:, None] * cache_slot_stride
            + kv_head * cache_head_stride + dims[None, :])
    # Masked loads: slots past seq_len (stale or unwritten) never enter the sums.
    if PAD_DIMS:
        mask = pos_mask[:, None] & dim_mask[None, :]
    else:
        mask = pos_mask[:, None]
    k = tl.load(cache_ptr + offs, mask=mask, other=0.0)
    v = tl.load(cache_ptr + cache_kv_stride + offs, mask=mask, other=0.0)
    if FP8:
        scale_offs = block * scale_block_stride + kv_head * scale_head_stride + positions % BLOCK_SIZE
        k_scale = tl.load(scales_ptr + scale_offs, mask=pos_mask, other=0.0)
        v_scale = tl.load(scales_ptr + scale_kv_stride + scale_offs, mask=pos_mask, other=0.0)
    else:
        k_scale = tl.full(positions.shape, 1.0, tl.float32)
        v_scale = k_scale
    return k, v, k_scale, v_scale


@triton.jit
def _scaled_scores(q, k, k_scale, scale, DOT_PRECISION: tl.constexpr, FP8: tl.constexpr):
    """``q @ k^T * scale`` (an FP8 tile's per-position K scales folded in)."""
    scores = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=DOT_PRECISION)
    if FP8:
        return scores * (k_scale * scale)[None, :]
    return scores * scale


@triton.jit
def _decode_kernel(q_ptr, cache_ptr, block_tables_ptr, seq_lens_ptr, query_start_loc_ptr,
                   out_ptr, part_acc_ptr, part_max_ptr, part_sum_ptr, scale,
                   q_token_stride, q_head_stride, out_token_stride, out_head_stride,
                   cache_kv_stride, cache_block_stride, cache_slot_stride, cache_head_stride,
                   block_table_stride, scales_ptr, scale_kv_stride, scale_block_stride,
                   scale_head_stride, num_heads, num_partitions,
                   GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                   HD_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
                   PARTITION_SIZE: tl.constexpr, SINGLE_PARTITION: tl.constexpr,
                   DOT_PRECISION: tl.constexpr, FP8: tl.constexpr, DOT16: tl.constexpr):
    """One (sequence, kv head, partition): all GROUP query heads of the kv head at once."""
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    part = tl.program_id(2)
    q_start = tl.load(query_start_loc_ptr + seq).to(tl.int64)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    seq_len = tl.load(seq_lens_ptr + seq)
    part_start = part * PARTITION_SIZE
    # The grid covers max_seq_len; partitions past this sequence's context have no work.
    if (q_len != 1) | (part_start >= seq_len):
        return
    part_end = tl.minimum(part_start + PARTITION_SIZE, seq_len)
    groups = tl.arange(0, GROUP_PAD)
    dims = tl.arange(0, HD_PAD)
    heads = kv_head * GROUP + groups
    q_mask = (groups[:, None] < GROUP) & (dims[None, :] < HEAD_DIM)
    q = tl.load(q_ptr + q_start * q_token_stride + heads[:, None] * q_head_stride + dims[None, :],
                mask=q_mask, other=0.0)
    if DOT16:  # FP8 K/V with bf16 queries: e4m3 -> fp16 is one instruction per pair, exact
        q = q.to(tl.float16)
    block_table_row = block_tables_ptr + seq.to(tl.int64) * block_table_stride
    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HD_PAD], tl.float32)
    for start in range(part_start, part_end, BLOCK_N):
        positions = start + tl.arange(0, BLOCK_N)
        pos_mask = positions < part_end
        k, v, k_scale, v_scale = _load_kv_tile(
            cache_ptr, block_table_row, positions, pos_mask, dims, dims < HEAD_DIM, kv_head,
            cache_kv_stride, cache_block_stride, cache_slot_stride, cache_head_stride, scales_ptr,
            scale_kv_stride, scale_block_stride, scale_head_stride, BLOCK_SIZE,
            HD_PAD != HEAD_DIM, FP8)
        scores = _scaled_scores(q, k, k_scale, scale, DOT_PRECISION, FP8)
        scores = tl.where(pos_mask[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if FP8:
            p = p * v_scale[None, :]
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype),
                                            input_precision=DOT_PRECISION)
        m_i = m_new
    if SINGLE_PARTITION:
        out = acc / l_i[:, None]
        tl.store(out_ptr + q_start * out_token_stride + heads[:, None] * out_head_stride
                 + dims[None, :], out.to(out_ptr.dtype.element_ty), mask=q_mask)
    else:
        part_idx = (seq.to(tl.int64) * num_heads + heads) * num_partitions + part
        tl.store(part_max_ptr + part_idx, m_i, mask=groups < GROUP)
        tl.store(part_sum_ptr + part_idx, l_i, mask=groups < GROUP)
        tl.store(part_acc_ptr + part_idx[:, None] * HEAD_DIM + dims[None, :], acc, mask=q_mask)


@triton.jit
def _decode_merge_kernel(seq_lens_ptr, query_start_loc_ptr, out_ptr, part_acc_ptr, part_max_ptr,
                         part_sum_ptr, out_token_stride, out_head_stride, num_heads, num_partitions,
                         HEAD_DIM: tl.constexpr, HD_PAD: tl.constexpr, PARTS_PAD: tl.constexpr,
                         MERGE_BLOCK: tl.constexpr, PARTITION_SIZE: tl.constexpr):
    """Combines one (sequence, head)'s partitions: softmax weights exp(m_p - max) * l_p."""
    seq = tl.program_id(0)
    head = tl.program_id(1)
    q_start = tl.load(query_start_loc_ptr + seq).to(tl.int64)
    if tl.load(query_start_loc_ptr + seq + 1) - q_start != 1:
        return
    num_live = tl.cdiv(tl.load(seq_lens_ptr + seq), PARTITION_SIZE)
    base = (seq.to(tl.int64) * num_heads + head) * num_partitions
    parts = tl.arange(0, PARTS_PAD)
    part_max = tl.load(part_max_ptr + base + parts, mask=parts < num_live, other=float("-inf"))
    global_max = tl.max(part_max, axis=0)
    # seq_len == 0 (a padded row) has no partitions: its output is zero, not NaN.
    global_max = tl.where(global_max == float("-inf"), 0.0, global_max)
    dims = tl.arange(0, HD_PAD)
    total = tl.zeros([HD_PAD], tl.float32)
    denom = 0.0
    for first in range(0, num_live, MERGE_BLOCK):
        chunk = first + tl.arange(0, MERGE_BLOCK)
        live = chunk < num_live
        weight = tl.exp(tl.load(part_max_ptr + base + chunk, mask=live, other=float("-inf"))
                        - global_max)
        denom += tl.sum(weight * tl.load(part_sum_ptr + base + chunk, mask=live, other=0.0), axis=0)
        acc = tl.load(part_acc_ptr + (base + chunk)[:, None] * HEAD_DIM + dims[None, :],
                      mask=live[:, None] & (dims[None, :] < HEAD_DIM), other=0.0)
        total += tl.sum(acc * weight[:, None], axis=0)
    out = total / tl.where(denom > 0.0, denom, 1.0)
    tl.store(out_ptr + q_start * out_token_stride + head * out_head_stride + dims,
             out.to(out_ptr.dtype.element_ty), mask=dims < HEAD_DIM)


@triton.jit
def _prefill_kernel(q_ptr, cache_ptr, block_tables_ptr, seq_lens_ptr, query_start_loc_ptr, out_ptr,
                    scale, q_token_stride, q_head_stride, out_token_stride, out_head_stride,
                    cache_kv_stride, cache_block_stride, cache_slot_stride, cache_head_stride,
                    block_table_stride, scales_ptr, scale_kv_stride, scale_block_stride,
                    scale_head_stride, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
                    HD_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, FP8: tl.constexpr,
                    DOT16: tl.constexpr):
    """Causal flash attention of BLOCK_M queries of one (sequence, head) over its paged context;
    single-query sequences are left to the decode kernel."""
    m_block = tl.program_id(0)
    seq = tl.program_id(1)
    head = tl.program_id(2)
    q_start = tl.load(query_start_loc_ptr + seq).to(tl.int64)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    if (q_len == 1) | (m_block * BLOCK_M >= q_len):
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    kv_head = head // GROUP
    rows = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HD_PAD)
    dim_mask = dims < HEAD_DIM
    q_mask = (rows[:, None] < q_len) & dim_mask[None, :]
    q_rows = q_start + rows
    q = tl.load(q_ptr + q_rows[:, None] * q_token_stride + head * q_head_stride + dims[None, :],
                mask=q_mask, other=0.0)
    if DOT16:
        q = q.to(tl.float16)
    # The queries are the last q_len positions of the context.
    q_pos = seq_len - q_len + rows
    kv_end = tl.minimum(seq_len, seq_len - q_len + (m_block + 1) * BLOCK_M)
    block_table_row = block_tables_ptr + seq.to(tl.int64) * block_table_stride
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HD_PAD], tl.float32)
    for start in range(0, kv_end, BLOCK_N):
        positions = start + tl.arange(0, BLOCK_N)
        pos_mask = positions < kv_end
        k, v, k_scale, v_scale = _load_kv_tile(
            cache_ptr, block_table_row, positions, pos_mask, dims, dim_mask, kv_head,
            cache_kv_stride, cache_block_stride, cache_slot_stride, cache_head_stride, scales_ptr,
            scale_kv_stride, scale_block_stride, scale_head_stride, BLOCK_SIZE,
            HD_PAD != HEAD_DIM, FP8)
        scores = _scaled_scores(q, k, k_scale, scale, DOT_PRECISION, FP8)
        visible = pos_mask[None, :] & (positions[None, :] <= q_pos[:, None])
        scores = tl.where(visible, scores, float("-inf"))
        # Key 0 is visible to every row, so m_new is finite from the first tile on.
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if FP8:
            p = p * v_scale[None, :]
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype),
                                            input_precision=DOT_PRECISION)
        m_i = m_new
    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    tl.store(out_ptr + q_rows[:, None] * out_token_stride + head * out_head_stride + dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=q_mask)


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 runs must match transformers greedily: no TF32.
    return "ieee" if dtype == torch.float32 else "tf32"


# The decode kernel's tile (positions per iteration) and launch shape, per KV dtype:
# (BLOCK_N, num_warps, num_stages), from `python -m bench.sweep_decode` on an H200.
DECODE_CONFIG = {"bf16": (64, 4, 2), "fp8": (32, 1, 2)}


def _launch_decode(q, kv_cache, block_tables, seq_lens, query_start_loc, out, max_seq_len,
                   scale, common, group, hd_pad, precision, fp8, dot16, partition_size,
                   config: tuple[int, int, int] | None = None) -> None:
    block_n, num_warps, num_stages = config or DECODE_CONFIG["fp8" if fp8 else "bf16"]
    assert partition_size % block_n == 0
    num_heads, head_dim = q.shape[1:]
    num_kv_heads, block_size = kv_cache.shape[3], kv_cache.shape[2]
    num_seqs = seq_lens.shape[0]
    num_partitions = triton.cdiv(max_seq_len, partition_size)
    single = num_partitions == 1
    shape = (num_seqs, num_heads, 1 if single else num_partitions)
    part_max = torch.empty(shape, dtype=torch.float32, device=q.device)
    part_sum = torch.empty(shape, dtype=torch.float32, device=q.device)
    part_acc = torch.empty((*shape, head_dim), dtype=torch.float32, device=q.device)
    _decode_kernel[(num_seqs, num_kv_heads, num_partitions)](
        q, kv_cache, block_tables, seq_lens, query_start_loc, out, part_acc, part_max,
        part_sum, scale, *common, num_heads, num_partitions, GROUP=group,
        GROUP_PAD=max(triton.next_power_of_2(group), 16), HEAD_DIM=head_dim, HD_PAD=hd_pad,
        BLOCK_SIZE=block_size, BLOCK_N=block_n, PARTITION_SIZE=partition_size,
        SINGLE_PARTITION=single, DOT_PRECISION=precision, FP8=fp8, DOT16=dot16,
        num_warps=num_warps, num_stages=num_stages)
    if not single:
        parts_pad = triton.next_power_of_2(num_partitions)
        _decode_merge_kernel[(num_seqs, num_heads)](
            seq_lens, query_start_loc, out, part_acc, part_max, part_sum, out.stride(0),
            out.stride(1), num_heads, num_partitions, HEAD_DIM=head_dim, HD_PAD=hd_pad,
            PARTS_PAD=parts_pad, MERGE_BLOCK=min(parts_pad, 16),
            PARTITION_SIZE=partition_size, num_warps=4)


def paged_attention(q: Tensor, kv_cache: Tensor, block_tables: Tensor, seq_lens: Tensor,
                    query_start_loc: Tensor, max_query_len: int, max_seq_len: int, scale: float,
                    kv_scales: Tensor | None = None, *,
                    partition_size: int = DECODE_PARTITION_SIZE,
                    decode_config: tuple[int, int, int] | None = None) -> Tensor:
    """``decode_config`` (BLOCK_N, num_warps, num_stages) overrides ``DECODE_CONFIG``
    (for the sweep that picks it)."""
    num_heads, head_dim = q.shape[1:]
    block_size, num_kv_heads = kv_cache.shape[2:4]
    assert kv_cache.shape[-1] == head_dim and num_heads % num_kv_heads == 0
    assert kv_cache.stride(-1) == 1 and q.stride(-1) == 1
    # Tokens past query_start_loc[-1] are batch padding: their output is zero.
    out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    num_seqs = seq_lens.shape[0]
    if num_seqs == 0 or q.shape[0] == 0 or max_seq_len == 0:
        return out
    group = num_heads // num_kv_heads
    hd_pad = max(triton.next_power_of_2(head_dim), 16)
    common = (q.stride(0), q.stride(1), out.stride(0), out.stride(1), *kv_cache.stride()[:4],
              block_tables.stride(0), *_scale_args(kv_cache, kv_scales))
    fp8 = kv_scales is not None
    # e4m3 -> bf16 goes through float32 (several instructions per value); -> fp16 is native
    # (sm_89+) and exact, and bf16 queries (|q| far below 65504) fit fp16.
    dot16 = fp8 and q.dtype == torch.bfloat16
    precision = _dot_precision(q.dtype)
    # Single-query rows (decodes, also beside prefills in a mixed step) go to the decode
    # kernel, which splits long contexts and takes a kv head's query heads together; the
    # prefill kernel's 128-query tile would spend 127 of its rows on nothing for them.
    _launch_decode(q, kv_cache, block_tables, seq_lens, query_start_loc, out, max_seq_len,
                   scale, common, group, hd_pad, precision, fp8, dot16, partition_size,
                   decode_config)
    if max_query_len == 1:
        return out
    # Tiles that compile without register spills for head_dim 128 on sm_90.
    if q.dtype == torch.float32:
        block_m, block_n = 32, 32
    elif head_dim > 128:
        block_m, block_n = 64, 32
    else:
        block_m, block_n = 128, 64
    _prefill_kernel[(triton.cdiv(max_query_len, block_m), num_seqs, num_heads)](
        q, kv_cache, block_tables, seq_lens, query_start_loc, out, scale, *common,
        GROUP=group, HEAD_DIM=head_dim, HD_PAD=hd_pad, BLOCK_SIZE=block_size, BLOCK_M=block_m,
        BLOCK_N=block_n, DOT_PRECISION=precision, FP8=fp8, DOT16=dot16, num_warps=8,
        num_stages=2)
    return out


for _name, _fn in (("rms_norm", rms_norm), ("fused_add_rms_norm", fused_add_rms_norm),
                   ("silu_and_mul", silu_and_mul), ("rotary_embedding", rotary_embedding),
                   ("write_kv_cache", write_kv_cache), ("write_kv_cache_fp8", write_kv_cache_fp8),
                   ("paged_attention", paged_attention)):
    torch.library.register_kernel(f"spmd::{_name}", "cuda", _fn)
