"""Attention over the KV cache: paged, over a flattened mixed prefill/decode batch
(continuous batching), or contiguous, over a padded static batch (warm-up shapes)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from workers import ops


@dataclass
class AttentionMetadata:
    """Per-step batch layout, on the model's device; built by the worker.

    Sequence ``i`` contributes the query tokens
    ``query_start_loc[i]:query_start_loc[i+1]``, which are the last positions of
    its context of ``seq_lens[i]`` tokens; its KV lives in the blocks
    ``block_tables[i]``. ``slot_mapping[t]`` is the cache slot of token ``t``
    (``block_id * block_size + offset``; -1 skips the write).
    """

    query_start_loc: torch.Tensor  # [S + 1] int32
    seq_lens: torch.Tensor  # [S] int32
    block_tables: torch.Tensor  # [S, max_blocks] int32
    slot_mapping: torch.Tensor  # [T] int64
    max_query_len: int
    max_seq_len: int


@dataclass
class StaticAttentionMetadata:
    """A padded ``[B, T]`` batch over a contiguous per-batch cache of ``L`` slots
    (static shapes only: nothing here varies between steps of one shape but values).

    Every row writes its ``T`` keys/values at cache slots ``slots``; query ``t`` of
    row ``b`` attends to slot ``s`` where ``mask[b, 0, t, s]``. Left padding and
    padded rows are masked out; each padding query still sees its own slot, so no
    softmax row is empty (its output is discarded).
    """

    slots: torch.Tensor  # [T] int64
    mask: torch.Tensor  # [B, 1, T, L] bool
    max_seq_len: int  # L


@dataclass
class VarlenMetadata:
    """A packed batch of whole sequences and no KV cache (prefill-only models): sequence
    ``i`` is tokens ``cu_seqlens[i]:cu_seqlens[i+1]``; ``causal`` False lets every token
    attend to its whole sequence (encoders, bidirectional decoders)."""

    cu_seqlens: torch.Tensor  # [S + 1] int32
    max_seqlen: int
    causal: bool

    @property
    def max_seq_len(self) -> int:
        return self.max_seqlen


class Attention(nn.Module):
    """Writes this step's keys/values into the paged cache, then attends over it."""

    def __init__(self, num_heads: int, head_dim: int, scale: float, num_kv_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.scale = scale
        self.num_kv_heads = num_kv_heads

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """``q [T, nh*hd]``, ``k, v [T, nkv*hd]``, ``kv_cache [2, blocks, block_size, nkv, hd]``
        (static batches: ``kv_cache [2, B, L, nkv, hd]`` and ``T = B * T_row``)."""
        if isinstance(meta, StaticAttentionMetadata):
            return self._static(q, k, v, kv_cache, meta)
        num_tokens = q.shape[0]
        if isinstance(meta, VarlenMetadata):
            out = ops.varlen_attention(
                q.reshape(num_tokens, self.num_heads, self.head_dim),
                k.reshape(num_tokens, self.num_kv_heads, self.head_dim),
                v.reshape(num_tokens, self.num_kv_heads, self.head_dim),
                meta.cu_seqlens, meta.max_seqlen, self.scale, meta.causal)
            return out.reshape(num_tokens, self.num_heads * self.head_dim)
        q = q.reshape(num_tokens, self.num_heads, self.head_dim)
        k = k.reshape(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.reshape(num_tokens, self.num_kv_heads, self.head_dim)
        kv_scales = None
        if isinstance(kv_cache, tuple):  # FP8: (e4m3 values, per-token-and-head scales)
            kv_cache, kv_scales = kv_cache
        ops.write_kv_cache(k, v, kv_cache, meta.slot_mapping, kv_scales)
        out = ops.paged_attention(q, kv_cache, meta.block_tables, meta.seq_lens,
                                  meta.query_start_loc, meta.max_query_len, meta.max_seq_len,
                                  self.scale, kv_scales)
        return out.reshape(num_tokens, self.num_heads * self.head_dim)

    def _static(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                meta: StaticAttentionMetadata) -> torch.Tensor:
        # Plain tensor ops with static shapes: what a compiling backend (Spyre, XLA) traces.
        batch, _, num_queries, _ = meta.mask.shape
        q = q.view(batch, num_queries, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(batch, num_queries, self.num_kv_heads, self.head_dim)
        v = v.view(batch, num_queries, self.num_kv_heads, self.head_dim)
        kv_cache[0].index_copy_(1, meta.slots, k.to(kv_cache.dtype))
        kv_cache[1].index_copy_(1, meta.slots, v.to(kv_cache.dtype))
        keys = kv_cache[0].transpose(1, 2).to(q.dtype)
        values = kv_cache[1].transpose(1, 2).to(q.dtype)
        out = torch.nn.functional.scaled_dot_product_attention(
            q, keys, values, attn_mask=meta.mask, scale=self.scale, enable_gqa=True)
        return out.transpose(1, 2).reshape(batch * num_queries, self.num_heads * self.head_dim)
