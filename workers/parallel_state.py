"""Tensor-parallel helpers over torch.distributed's default process group.

The default group *is* the TP group: one replica owns one TP group, and the
process group is initialised by the worker's device mixin before the model is
built. Without an initialised group everything behaves as tp=1.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def tp_rank() -> int:
    return dist.get_rank() if _initialized() else 0


def tp_size() -> int:
    return dist.get_world_size() if _initialized() else 1


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sums ``x`` over the TP group in place and returns it."""
    if tp_size() == 1:
        return x
    dist.all_reduce(x)
    return x


def all_gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    """Concatenates every rank's ``x`` along the last dim, in rank order."""
    world = tp_size()
    if world == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x)
    return torch.cat(parts, dim=-1)
