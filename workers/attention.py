"""Paged attention over a flattened, mixed prefill/decode batch."""

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
        """``q [T, nh*hd]``, ``k, v [T, nkv*hd]``, ``kv_cache [2, blocks, block_size, nkv, hd]``."""
        num_tokens = q.shape[0]
        q = q.reshape(num_tokens, self.num_heads, self.head_dim)
        k = k.reshape(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.reshape(num_tokens, self.num_kv_heads, self.head_dim)
        ops.write_kv_cache(k, v, kv_cache, meta.slot_mapping)
        out = ops.paged_attention(q, kv_cache, meta.block_tables, meta.seq_lens,
                                  meta.query_start_loc, meta.max_query_len, meta.max_seq_len,
                                  self.scale)
        return out.reshape(num_tokens, self.num_heads * self.head_dim)
