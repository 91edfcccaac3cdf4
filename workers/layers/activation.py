"""Gated activations over the ``spmd`` custom ops."""

from __future__ import annotations

import torch
from torch import nn

from workers import ops


class SiluAndMul(nn.Module):
    """``silu(x[:, :I]) * x[:, I:]`` for ``x`` of shape ``[T, 2I]`` (gate first, then up)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.silu_and_mul(x)


_ACTIVATIONS = {
    "gelu": lambda x: torch.nn.functional.gelu(x),
    "gelu_new": lambda x: torch.nn.functional.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: torch.nn.functional.gelu(x, approximate="tanh"),
    "relu": torch.relu,
    "silu": torch.nn.functional.silu,
}


class Activation(nn.Module):
    """An ungated activation by its transformers name (``hidden_act``)."""

    def __init__(self, name: str):
        super().__init__()
        if name not in _ACTIVATIONS:
            raise ValueError(f"hidden_act: {name!r} is not supported; supported: {sorted(_ACTIVATIONS)}")
        self.name = name
        self.fn = _ACTIVATIONS[name]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)
