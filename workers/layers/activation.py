"""Gated activations over the ``spmd`` custom ops."""

from __future__ import annotations

import torch
from torch import nn

from workers import ops


class SiluAndMul(nn.Module):
    """``silu(x[:, :I]) * x[:, I:]`` for ``x`` of shape ``[T, 2I]`` (gate first, then up)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.silu_and_mul(x)
