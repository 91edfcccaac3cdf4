"""Rotary position embedding (HF rotate-half layout) over the ``spmd`` custom ops."""

from __future__ import annotations

import torch
from torch import nn

from workers import ops


class RotaryEmbedding(nn.Module):
    """Holds the ``[max_position, head_dim]`` cos/sin cache; one instance serves all layers."""

    def __init__(self, head_dim: int, max_position: int, base: float,
                 rope_scaling: dict | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        self.head_dim = head_dim
        cache = ops.build_cos_sin_cache(head_dim, max_position, base, rope_scaling,
                                        dtype or torch.get_default_dtype())
        self.register_buffer("cos_sin_cache", cache, persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        return ops.rotary_embedding(positions, q, k, self.cos_sin_cache, self.head_dim)
