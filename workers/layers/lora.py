"""LoRA on a parallel linear layer: this rank's shard of every device slot's A and B,
and the per-step map from tokens to slots that lets one launch serve a mixed batch.

A layer of S fused projections (qkv: 3, gate_up: 2, o / down: 1) holds
``lora_a [max_loras, S * max_rank, in]`` (slice s in rows ``s*r:(s+1)*r``) and the
pre-transposed ``lora_b [max_loras, max_rank, out]`` (slice s in its output columns),
with the adapter's scaling folded into B and unused ranks zero. Column-parallel
layers split B on the output like their weight; row-parallel ones split A on the
input and add their LoRA delta to the partial output before the all-reduce, so
tensor parallelism needs no collective of its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from workers import lora_ops


@dataclass
class LoRAMapping:
    """Which slot each token of a step uses (-1: the base model alone).

    ``single_slot`` >= 0 says every token uses that slot (one plain matmul per op).
    ``lane_mask`` (one-hot ``[T, max_loras]``) selects the static-shape formulation
    (every slot computed, the others masked: ``lora_ops.lora_lanes``) that compiles once
    for any mix of adapters."""

    token_slots: Tensor | None  # [T] int32
    sorted_idx: Tensor | None = None  # [T] int32, tokens ordered by slot (base last)
    seg_starts: Tensor | None = None  # [max_loras + 1] int32
    single_slot: int = -1
    lane_mask: Tensor | None = None  # [T, max_loras] in the model's dtype


class LoRAStack(nn.Module):
    """The LoRA weights of one parallel linear layer on this rank, for every slot."""

    def __init__(self, *, max_loras: int, max_rank: int, input_size: int,
                 slice_sizes: list[int], dtype: torch.dtype, device: torch.device,
                 lanes: bool = False):
        super().__init__()
        self.max_rank = max_rank
        self.slice_sizes = list(slice_sizes)
        self.slice_offsets = [0]
        for size in slice_sizes:
            self.slice_offsets.append(self.slice_offsets[-1] + size)
        num_slices = len(slice_sizes)
        self.register_buffer("lora_a", torch.zeros(max_loras, num_slices * max_rank, input_size,
                                                   dtype=dtype, device=device), persistent=False)
        self.register_buffer("lora_b", torch.zeros(max_loras, max_rank, self.slice_offsets[-1],
                                                   dtype=dtype, device=device), persistent=False)
        # Static-shape ranks: every slot's B, block-diagonal over the slices, stacked.
        self.register_buffer("lora_b_lanes", None if not lanes else torch.zeros(
                max_loras * num_slices * max_rank, self.slice_offsets[-1], dtype=dtype,
                device=device), persistent=False)

    def forward(self, x: Tensor, out: Tensor, m: LoRAMapping) -> Tensor:
        """``out`` (the base layer's output of ``x``) plus each token's LoRA delta."""
        if m.lane_mask is not None:
            return lora_ops.lora_lanes(x, out, self.lora_a, self.lora_b_lanes, m.lane_mask)
        y = lora_ops.lora_shrink(x, self.lora_a, m.token_slots, m.sorted_idx, m.seg_starts,
                                 m.single_slot)
        lora_ops.lora_expand(out, y, self.lora_b, m.token_slots, m.sorted_idx, m.seg_starts,
                             m.single_slot, self.slice_offsets)
        return out

    @torch.no_grad()
    def fill(self, slot: int, a: Tensor | None, b: Tensor | None) -> None:
        """Slot ``slot`` takes ``a [S*r, in]`` and ``b [r, out]`` (this rank's padded
        shards), or zeros where the adapter does not touch this layer."""
        if a is None:
            self.lora_a[slot].zero_()
            self.lora_b[slot].zero_()
        else:
            self.lora_a[slot].copy_(a, non_blocking=True)
            self.lora_b[slot].copy_(b, non_blocking=True)
        if self.lora_b_lanes is not None:
            rows = self.lora_a.shape[1]
            self.lora_b_lanes[slot * rows:(slot + 1) * rows].copy_(
                lora_ops.lanes_b(self.lora_b[slot], self.slice_offsets))
