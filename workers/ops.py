"""Custom ops (namespace ``spmd``): one call site for every device, traceable by torch.compile.

Each op is a ``torch.library.custom_op`` whose Python body is the reference
implementation, written in plain vectorised torch and used on every device that
has no kernel of its own (today: the CPU). A device kernel is added next to it
without touching call sites, e.g. in a CUDA module::

    @torch.library.register_kernel("spmd::paged_attention", "cuda")
    def _(q, kv_cache, block_tables, ...): ...

Each op also has a fake (meta) implementation, so shapes propagate under
``torch.compile`` and the profiler. Numerics follow Hugging Face transformers'
Llama (fp32 eager attention), because the project's bar is greedy-token equality.

The thin wrappers at the bottom (``rms_norm``, ``paged_attention``, ...) are the
public API; they call the ``spmd::*`` op so that the dispatcher picks the kernel, except
on the CPU outside torch.compile and the profiler, where they call the reference body
directly (``_impl``: the one the dispatcher would pick, without its 8–20 µs a call).
"""

import math
import threading

import torch
from torch import Tensor

# Upper bound on the temporaries (gathered K/V, attention scores) of one
# paged-attention chunk; larger batches and prompts are processed in chunks.
_ATTENTION_CHUNK_BYTES = 64 * 1024 * 1024


def _op(name: str, mutates_args=()):
    """``torch.library.custom_op("spmd::<name>")`` that keeps its undecorated body as
    ``.reference``, which the public API calls directly where the dispatcher would pick it
    anyway (``_impl``)."""
    def wrap(fn):
        op = torch.library.custom_op(f"spmd::{name}", mutates_args=mutates_args)(fn)
        op.reference = fn
        return op
    return wrap


def _impl(op, x: Tensor):
    """What to call for ``op`` on ``x``: the op itself (the dispatcher picks the device's
    kernel), or, on the CPU, which has no kernel of its own, its reference body directly,
    outside torch.compile's tracing (the static-shape devices) and the profiler (whose tables
    name the ops). The dispatcher's route (custom op, dynamo guard) costs 8–20 µs a call on a
    2-core VM, and a SmolLM2 step makes ~180 calls."""
    if (x.device.type == "cpu" and not torch.compiler.is_compiling()
            and not torch._C._autograd._profiler_enabled()):
        return op.reference
    return op


# --------------------------------------------------------------------------- norms


def _rms_norm_ref(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    # Same op sequence as LlamaRMSNorm, so fp32 results are bit-identical.
    x32 = x.to(torch.float32)
    variance = x32.pow(2).mean(-1, keepdim=True)
    return weight * (x32 * torch.rsqrt(variance + eps)).to(x.dtype)


@_op("rms_norm", mutates_args=())
def _rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return _rms_norm_ref(x, weight, eps)


@_rms_norm.register_fake
def _(x, weight, eps):
    return x.new_empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype))


@_op("fused_add_rms_norm", mutates_args=())
def _fused_add_rms_norm(
    x: Tensor, residual: Tensor, weight: Tensor, eps: float
) -> tuple[Tensor, Tensor]:
    new_residual = x + residual
    return _rms_norm_ref(new_residual, weight, eps), new_residual


@_fused_add_rms_norm.register_fake
def _(x, residual, weight, eps):
    residual_dtype = torch.promote_types(x.dtype, residual.dtype)
    normed = x.new_empty(x.shape, dtype=torch.promote_types(weight.dtype, residual_dtype))
    return normed, x.new_empty(x.shape, dtype=residual_dtype)


# --------------------------------------------------------------------------- MLP


@_op("silu_and_mul", mutates_args=())
def _silu_and_mul(x: Tensor) -> Tensor:
    gate, up = x.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


@_silu_and_mul.register_fake
def _(x):
    return x.new_empty((*x.shape[:-1], x.shape[-1] // 2))


# --------------------------------------------------------------------------- RoPE


def _rope_inv_freq(head_dim: int, base: float, rope_scaling: dict | None) -> tuple[Tensor, float]:
    """Inverse frequencies and attention scaling, with transformers' float32 arithmetic."""
    rope_type = "default"
    if rope_scaling is not None:
        rope_type = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
    # Keep these expressions as transformers writes them: a Python scalar divided
    # by a tensor is reciprocal-then-multiply, so reordering changes the bits.
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim
    inv_freq = 1.0 / (base**exponents)
    if rope_type == "default":
        return inv_freq, 1.0
    if rope_type == "linear":
        return inv_freq / rope_scaling["factor"], 1.0
    if rope_type == "llama3":
        factor = rope_scaling["factor"]
        low_freq_factor = rope_scaling["low_freq_factor"]
        high_freq_factor = rope_scaling["high_freq_factor"]
        old_context_len = rope_scaling["original_max_position_embeddings"]
        low_freq_wavelen = old_context_len / low_freq_factor
        high_freq_wavelen = old_context_len / high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        # Long wavelengths are scaled by 1/factor, short ones kept, the band between interpolated.
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_context_len / wavelen - low_freq_factor) / (
            high_freq_factor - low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
        return torch.where(is_medium, smoothed, scaled), 1.0
    raise ValueError(
        f"rope_scaling.rope_type={rope_type!r} is not supported "
        "(supported: default, linear, llama3)"
    )


def build_cos_sin_cache(
    head_dim: int,
    max_position: int,
    base: float,
    rope_scaling: dict | None,
    dtype: torch.dtype,
) -> Tensor:
    """RoPE table ``[max_position, head_dim]``: cos in the first half, sin in the second.

    Built in float32 exactly like transformers' LlamaRotaryEmbedding, then cast to ``dtype``.
    """
    inv_freq, attention_scaling = _rope_inv_freq(head_dim, base, rope_scaling)
    positions = torch.arange(max_position, dtype=torch.int64).to(torch.float32)
    freqs = positions[:, None] * inv_freq[None, :]
    cos = freqs.cos() * attention_scaling
    sin = freqs.sin() * attention_scaling
    return torch.cat((cos, sin), dim=-1).to(dtype)


def _rotate(x: Tensor, cos: Tensor, sin: Tensor, head_dim: int) -> Tensor:
    # x * cos + rotate_half(x) * sin, written per half; a + (-b) == a - b in IEEE,
    # so this is bit-identical to transformers' apply_rotary_pos_emb.
    heads = x.reshape(x.shape[0], -1, head_dim)
    x1, x2 = heads.chunk(2, dim=-1)
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.view(x.shape)


@_op("rotary_embedding", mutates_args=())
def _rotary_embedding(
    positions: Tensor, q: Tensor, k: Tensor, cos_sin_cache: Tensor, head_dim: int
) -> tuple[Tensor, Tensor]:
    assert cos_sin_cache.shape[-1] == head_dim, "cos_sin_cache must be [max_position, head_dim]"
    cos, sin = cos_sin_cache[positions].to(q.dtype).unsqueeze(-2).chunk(2, dim=-1)
    return _rotate(q, cos, sin, head_dim), _rotate(k, cos, sin, head_dim)


@_rotary_embedding.register_fake
def _(positions, q, k, cos_sin_cache, head_dim):
    return torch.empty_like(q, memory_format=torch.contiguous_format), torch.empty_like(
        k, memory_format=torch.contiguous_format
    )


# --------------------------------------------------------------------------- paged KV cache
#
# An FP8 cache (``kv_cache_dtype="fp8"``) holds float8 e4m3 values and, beside them,
# ``kv_scales [2, num_blocks, nkv, block_size]`` float32: one scale per token and kv head
# (a block's scales of one head side by side, so that a kernel reads them in one load),
# amax(|x|) / 448 over the head's dims (448: e4m3's largest finite value), so that every
# head vector uses the format's whole range and no calibration is needed. Stored value:
# x / scale, clamped to +-448; read back as value * scale, in registers (kernels) or in
# the attention dtype (here).

FP8_MAX = 448.0
FP8_MIN_SCALE = 1e-8  # an all-zero vector (padding) still divides by something


def fp8_quantize(x: Tensor) -> tuple[Tensor, Tensor]:
    """``x [..., hd]`` -> (float8_e4m3fn values, float32 scales ``[...]``)."""
    x = x.float()
    scale = x.abs().amax(dim=-1).clamp_min(FP8_MIN_SCALE * FP8_MAX) / FP8_MAX
    values = (x / scale[..., None]).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return values, scale


def fp8_dequantize(values: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    return (values.float() * scale[..., None]).to(dtype)


def fp8_quantize_cache(kv_cache: Tensor) -> tuple[Tensor, Tensor]:
    """A whole cache ``[2, blocks, block_size, nkv, hd]`` -> (e4m3 values, ``kv_scales``)."""
    values, scale = fp8_quantize(kv_cache)
    return values, scale.transpose(2, 3).contiguous()


def fp8_dequantize_cache(values: Tensor, kv_scales: Tensor, dtype: torch.dtype) -> Tensor:
    return fp8_dequantize(values, kv_scales.transpose(2, 3), dtype)


@_op("write_kv_cache", mutates_args=("kv_cache",))
def _write_kv_cache(key: Tensor, value: Tensor, kv_cache: Tensor, slot_mapping: Tensor) -> None:
    num_kv_heads, head_dim = kv_cache.shape[-2:]
    # view (not reshape): a copy would silently drop the write.
    slots = kv_cache.view(2, -1, num_kv_heads, head_dim)
    keep = slot_mapping >= 0  # -1 marks padding tokens
    if not bool(keep.all()):
        key, value, slot_mapping = key[keep], value[keep], slot_mapping[keep]
    slots[0].index_copy_(0, slot_mapping, key.to(kv_cache.dtype))
    slots[1].index_copy_(0, slot_mapping, value.to(kv_cache.dtype))


@_write_kv_cache.register_fake
def _(key, value, kv_cache, slot_mapping):
    return None


@_op("write_kv_cache_fp8", mutates_args=("kv_cache", "kv_scales"))
def _write_kv_cache_fp8(key: Tensor, value: Tensor, kv_cache: Tensor, kv_scales: Tensor,
                        slot_mapping: Tensor) -> None:
    num_kv_heads, head_dim = kv_cache.shape[-2:]
    block_size = kv_cache.shape[2]
    keep = slot_mapping >= 0  # -1 marks padding tokens
    if not bool(keep.all()):
        key, value, slot_mapping = key[keep], value[keep], slot_mapping[keep]
    # Bytes are copied (index_copy_ has no float8 kernel on every device).
    slots = kv_cache.view(torch.uint8).view(2, -1, num_kv_heads, head_dim)
    blocks, offsets = slot_mapping // block_size, slot_mapping % block_size
    for i, x in enumerate((key, value)):
        values, scale = fp8_quantize(x)
        slots[i].index_copy_(0, slot_mapping, values.view(torch.uint8))
        kv_scales[i, blocks, :, offsets] = scale


@_write_kv_cache_fp8.register_fake
def _(key, value, kv_cache, kv_scales, slot_mapping):
    return None


def _gather_blocks(kv_cache: Tensor, kv_scales: Tensor | None, block_ids: Tensor,
                   dtype: torch.dtype) -> Tensor:
    """``[2, len(block_ids), block_size, nkv, hd]`` of the given blocks, in ``dtype``
    (an FP8 cache dequantized)."""
    # K and V blocks in one index_select along dim 0 of a (kv, block) view: on the CPU each
    # block is one copy, 0.74 against 1.08 ms along dim 1 (64 SmolLM2 sequences of 12
    # blocks, done 30 times a decode step) and 1.3 ms by advanced indexing. A view, never
    # a copy of the whole cache (the cache is one contiguous allocation).
    num_blocks = kv_cache.shape[1]
    ids = torch.cat([block_ids, block_ids + num_blocks])
    shape = (2, len(block_ids), *kv_cache.shape[2:])
    if kv_scales is None:
        blocks = kv_cache.view(2 * num_blocks, *shape[2:])
        if kv_cache.device.type == "cpu" and kv_cache.dtype == dtype:
            out = _gather_buffer(math.prod(shape), dtype).view(len(ids), *shape[2:])
            return torch.index_select(blocks, 0, ids, out=out).view(shape)
        return blocks.index_select(0, ids).view(shape).to(dtype)
    values = kv_cache.view(torch.uint8).view(2 * num_blocks, *shape[2:]).index_select(0, ids)
    scales = kv_scales.view(2 * num_blocks, *kv_scales.shape[2:]).index_select(0, ids)
    return fp8_dequantize_cache(values.view(torch.float8_e4m3fn).view(shape),
                                scales.view(2, len(block_ids), *kv_scales.shape[2:]), dtype)


_scratch = threading.local()


def _gather_buffer(numel: int, dtype: torch.dtype) -> Tensor:
    """A CPU buffer for ``_gather_blocks``, reused by every layer and step of this thread
    (its result is consumed before the next gather). A fresh tensor each time costs its
    pages anew: 44 against 38 ms for the 30 layers of a 64-sequence SmolLM2 decode step."""
    buf = getattr(_scratch, "gather", None)
    if buf is None or buf.numel() < numel or buf.dtype != dtype:
        # A normal tensor, even if first needed under inference mode: an inference tensor
        # could not be written outside it (tests, scratch forwards).
        with torch.inference_mode(False):
            buf = _scratch.gather = torch.empty(numel, dtype=dtype)
    return buf[:numel]


def _decode_attention(
    q: Tensor, kv_cache: Tensor, block_tables: Tensor, seq_lens: Tensor, scale: float,
    kv_scales: Tensor | None = None,
) -> Tensor:
    """One query per sequence, q [S, nh, hd] -> [S, nh, hd]: one gather and one SDPA call per chunk.

    SDPA reads the gathered K/V through strides, so on the CPU it beats matmul + softmax
    (which copies K and V into matmul layout); both stay within ~2e-6 of transformers'
    eager attention.
    """
    block_size, num_kv_heads, head_dim = kv_cache.shape[2:]
    seq_lens = seq_lens.to(torch.int64)
    num_blocks = (seq_lens + block_size - 1) // block_size
    max_blocks = int(num_blocks.max())
    block_tables = block_tables[:, :max_blocks].to(torch.int64)
    # Table entries past a sequence's last block may be anything; point them at block 0.
    block_tables = block_tables.masked_fill(
        torch.arange(max_blocks, device=q.device) >= num_blocks[:, None], 0
    )
    context_len = max_blocks * block_size
    bytes_per_seq = 2 * context_len * num_kv_heads * head_dim * max(4, q.element_size())
    chunk = max(1, _ATTENTION_CHUNK_BYTES // bytes_per_seq)
    out = torch.empty_like(q)
    for start in range(0, q.shape[0], chunk):
        rows = slice(start, start + chunk)
        num_rows = q[rows].shape[0]
        kv = _gather_blocks(kv_cache, kv_scales, block_tables[rows].reshape(-1), q.dtype)
        masked = torch.arange(context_len, device=q.device) >= seq_lens[rows, None]
        # Slots past seq_len are masked out; they must hold finite values (the worker
        # zero-fills the cache and only ever writes finite K/V), since 0 * NaN survives a mask.
        k, v = kv.view(2, num_rows, context_len, num_kv_heads, head_dim).transpose(2, 3)
        attn = torch.nn.functional.scaled_dot_product_attention(
            q[rows, :, None], k, v, attn_mask=~masked[:, None, None], scale=scale, enable_gqa=True
        )
        out[rows] = attn[:, :, 0]
    return out


def _causal_attention(q: Tensor, k: Tensor, v: Tensor, masked: Tensor, scale: float) -> Tensor:
    """Eager attention of one sequence: q [n, nh, hd], k/v [L, nkv, hd], masked [n, L].

    The op sequence of transformers' eager attention ((q @ k^T) * scale, mask, float32
    softmax, cast, @ v): for fp32 the output is bit-identical to it. Grouped query heads
    are folded into the query rows instead of repeating K/V.
    """
    num_queries, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    group = num_heads // num_kv_heads
    q = q.view(num_queries, num_kv_heads, group, head_dim).permute(1, 2, 0, 3)
    q = q.reshape(num_kv_heads, group * num_queries, head_dim)
    scores = torch.matmul(q, k.permute(1, 2, 0)).mul_(scale)
    scores = scores.view(num_kv_heads, group, num_queries, -1).masked_fill_(masked, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    out = torch.matmul(probs.view(num_kv_heads, group * num_queries, -1), v.transpose(0, 1))
    out = out.view(num_kv_heads, group, num_queries, head_dim).permute(2, 0, 1, 3)
    return out.reshape(num_queries, num_heads, head_dim)


def _prefill_attention(
    q: Tensor, kv_cache: Tensor, block_table: Tensor, seq_len: int, scale: float,
    kv_scales: Tensor | None = None,
) -> Tensor:
    """The last n positions of one sequence's context: q [n, nh, hd] -> [n, nh, hd], causal."""
    block_size, num_kv_heads, head_dim = kv_cache.shape[2:]
    num_queries, num_heads = q.shape[:2]
    num_blocks = (seq_len + block_size - 1) // block_size
    kv = _gather_blocks(kv_cache, kv_scales, block_table[:num_blocks].to(torch.int64), q.dtype)
    k, v = kv.view(2, num_blocks * block_size, num_kv_heads, head_dim)[:, :seq_len]
    first_pos = seq_len - num_queries
    # Chunk queries to bound the scores tensor; a chunk only needs keys up to its last position.
    chunk = max(1, _ATTENTION_CHUNK_BYTES // (num_heads * seq_len * 4))
    out = torch.empty_like(q)
    for start in range(0, num_queries, chunk):
        end = min(start + chunk, num_queries)
        context_len = first_pos + end
        key_pos = torch.arange(context_len, device=q.device)
        masked = key_pos > key_pos[first_pos + start :, None]
        out[start:end] = _causal_attention(
            q[start:end], k[:context_len], v[:context_len], masked, scale
        )
    return out


@_op("paged_attention", mutates_args=())
def _paged_attention(
    q: Tensor,
    kv_cache: Tensor,
    block_tables: Tensor,
    seq_lens: Tensor,
    query_start_loc: Tensor,
    max_query_len: int,
    max_seq_len: int,
    scale: float,
    kv_scales: Tensor | None = None,
) -> Tensor:
    # Tokens past query_start_loc[-1] are batch padding: their output is zero.
    out = torch.zeros_like(q)
    num_seqs = seq_lens.shape[0]
    if num_seqs == 0:
        return out
    if max_query_len == 1 and int(query_start_loc[-1]) == num_seqs:
        # Pure decode batch: sequence i owns token i.
        out[:num_seqs] = _decode_attention(q[:num_seqs], kv_cache, block_tables, seq_lens, scale,
                                           kv_scales)
        return out
    starts = query_start_loc.to(torch.int64)
    query_lens = starts[1:] - starts[:-1]
    is_decode = query_lens == 1
    if bool(is_decode.any()):
        decode_tokens = starts[:-1][is_decode]
        out[decode_tokens] = _decode_attention(
            q[decode_tokens], kv_cache, block_tables[is_decode], seq_lens[is_decode], scale,
            kv_scales)
    lens = seq_lens.tolist()
    bounds = starts.tolist()
    for i in (~is_decode & (query_lens > 0)).nonzero().view(-1).tolist():
        tokens = slice(bounds[i], bounds[i + 1])
        out[tokens] = _prefill_attention(q[tokens], kv_cache, block_tables[i], lens[i], scale,
                                         kv_scales)
    return out


@_paged_attention.register_fake
def _(q, kv_cache, block_tables, seq_lens, query_start_loc, max_query_len, max_seq_len, scale,
      kv_scales=None):
    return torch.empty_like(q)


# --------------------------------------------------------------------------- prefill-only attention


@_op("varlen_attention", mutates_args=())
def _varlen_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens: Tensor,
    max_seqlen: int,
    scale: float,
    causal: bool,
) -> Tensor:
    # One SDPA call per sequence, on exactly its own tokens: no padding, no mask, so a
    # sequence's output never depends on what else is in the batch.
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    # SDPA's fused CPU kernel takes 4-D inputs and no enable_gqa (else: its slow math path).
    gqa = k.shape[1] != q.shape[1]
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:
            continue
        attn = torch.nn.functional.scaled_dot_product_attention(
            q[None, start:end].transpose(1, 2), k[None, start:end].transpose(1, 2),
            v[None, start:end].transpose(1, 2), is_causal=causal, scale=scale, enable_gqa=gqa)
        out[start:end] = attn[0].transpose(0, 1)
    if bounds[-1] < q.shape[0]:  # batch padding past the last sequence
        out[bounds[-1]:] = 0
    return out


@_varlen_attention.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, scale, causal):
    return torch.empty_like(q)


# --------------------------------------------------------------------------- mixture of experts


def moe_routing(router_logits: Tensor, top_k: int, renormalize: bool) -> tuple[Tensor, Tensor]:
    """``(topk_weights [T, K] float32, topk_ids [T, K] int64)``: softmax over the experts in
    float32, the ``top_k`` largest, renormalised to sum 1 when ``renormalize`` (Mixtral;
    Qwen3-MoE's ``norm_topk_prob``), as transformers routes."""
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def _fused_moe_ref(x: Tensor, w13: Tensor, w2: Tensor, topk_weights: Tensor,
                   topk_ids: Tensor) -> Tensor:
    # Tokens sorted by expert, one GEMM pair per expert that received any, and the
    # weighted outputs summed per token in float32.
    num_tokens, top_k = topk_ids.shape
    flat_ids = topk_ids.reshape(-1)
    order = torch.argsort(flat_ids, stable=True)
    counts = torch.bincount(flat_ids, minlength=w13.shape[0]).tolist()
    weights = topk_weights.reshape(-1).to(torch.float32)
    out = torch.zeros(num_tokens, x.shape[-1], dtype=torch.float32, device=x.device)
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        rows = order[start:start + count]
        start += count
        tokens = rows // top_k
        gate, up = torch.nn.functional.linear(x[tokens], w13[expert]).chunk(2, dim=-1)
        y = torch.nn.functional.linear(torch.nn.functional.silu(gate) * up, w2[expert])
        out.index_add_(0, tokens, y.to(torch.float32) * weights[rows, None])
    return out.to(x.dtype)


@_op("fused_moe", mutates_args=())
def _fused_moe(x: Tensor, w13: Tensor, w2: Tensor, topk_weights: Tensor,
               topk_ids: Tensor) -> Tensor:
    return _fused_moe_ref(x, w13, w2, topk_weights, topk_ids)


@_fused_moe.register_fake
def _(x, w13, w2, topk_weights, topk_ids):
    return x.new_empty(x.shape)


# --------------------------------------------------------------------------- public API


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """LlamaRMSNorm: ``weight * (x * rsqrt(mean(x^2) + eps))``, normalised in float32."""
    return _impl(_rms_norm, x)(x, weight, eps)


def fused_add_rms_norm(
    x: Tensor, residual: Tensor, weight: Tensor, eps: float
) -> tuple[Tensor, Tensor]:
    """``(rms_norm(x + residual), x + residual)``; returns new tensors."""
    return _impl(_fused_add_rms_norm, x)(x, residual, weight, eps)


def silu_and_mul(x: Tensor) -> Tensor:
    """``silu(x[..., :I]) * x[..., I:]`` for ``x`` of width ``2 * I``."""
    return _impl(_silu_and_mul, x)(x)


def rotary_embedding(
    positions: Tensor, q: Tensor, k: Tensor, cos_sin_cache: Tensor, head_dim: int
) -> tuple[Tensor, Tensor]:
    """NeoX-style (rotate-half) RoPE on ``q [T, nh*hd]`` and ``k [T, nkv*hd]`` at ``positions [T]``.

    ``cos_sin_cache`` comes from ``build_cos_sin_cache``. Returns new tensors shaped like q and k.
    """
    return _impl(_rotary_embedding, q)(positions, q, k, cos_sin_cache, head_dim)


def write_kv_cache(key: Tensor, value: Tensor, kv_cache: Tensor, slot_mapping: Tensor,
                   kv_scales: Tensor | None = None) -> None:
    """Store ``key``/``value [T, nkv, hd]`` into ``kv_cache [2, num_blocks, block_size, nkv, hd]``.

    Token t goes to flat slot ``slot_mapping[t] = block_id * block_size + offset``; -1 skips it.
    With ``kv_scales`` the cache is FP8 (e4m3) and each (token, kv head) gets its scale.
    """
    if kv_scales is None:
        _impl(_write_kv_cache, key)(key, value, kv_cache, slot_mapping)
    else:
        _impl(_write_kv_cache_fp8, key)(key, value, kv_cache, kv_scales, slot_mapping)


def paged_attention(
    q: Tensor,
    kv_cache: Tensor,
    block_tables: Tensor,
    seq_lens: Tensor,
    query_start_loc: Tensor,
    max_query_len: int,
    max_seq_len: int,
    scale: float,
    kv_scales: Tensor | None = None,
) -> Tensor:
    """Causal attention of a mixed prefill/decode batch over the paged KV cache.

    Sequence i owns queries ``q[query_start_loc[i]:query_start_loc[i+1]]`` (n_i of them), the
    last n_i positions of its context of ``seq_lens[i]`` tokens, whose K/V (already written)
    live at ``block_tables[i, p // block_size]``, offset ``p % block_size``. GQA: query head h
    reads kv head ``h // (nh // nkv)``. Returns ``[T, nh, hd]``. An FP8 cache comes with
    its ``kv_scales`` (see ``write_kv_cache``).
    """
    return _impl(_paged_attention, q)(q, kv_cache, block_tables, seq_lens, query_start_loc,
                                      max_query_len, max_seq_len, scale, kv_scales)


def varlen_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int,
                     scale: float, causal: bool) -> Tensor:
    """Attention within each of a packed batch of whole sequences, no KV cache (prefill-only
    models): sequence i owns tokens ``cu_seqlens[i]:cu_seqlens[i+1]`` of ``q [T, nh, hd]``
    and ``k, v [T, nkv, hd]`` and attends to all of them (``causal=False``, encoders) or to
    those at or before each query (``causal=True``). GQA as in ``paged_attention``; tokens
    past ``cu_seqlens[-1]`` (padding) come out zero. Returns ``[T, nh, hd]``."""
    return _impl(_varlen_attention, q)(q, k, v, cu_seqlens, max_seqlen, scale, causal)


def fused_moe(x: Tensor, w13: Tensor, w2: Tensor, topk_weights: Tensor,
              topk_ids: Tensor) -> Tensor:
    """A mixture-of-experts MLP: token t goes through experts ``topk_ids[t, k]``, each
    ``down(silu(gate(x)) * up(x))`` with ``w13 [E, 2I, H]`` (gate rows, then up rows) and
    ``w2 [E, H, I]``, and the outputs are summed with ``topk_weights [T, K]``. ``x [T, H]``
    → ``[T, H]`` in x's dtype (accumulated in float32). Under tensor parallelism ``I`` is
    this rank's slice and the result a partial sum."""
    return _impl(_fused_moe, x)(x, w13, w2, topk_weights, topk_ids)
