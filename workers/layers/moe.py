"""Mixture-of-experts MLP with tensor-parallel experts, over ``spmd::fused_moe``.

Every rank holds every expert, each sliced along its intermediate dimension as a dense
MLP is (``gate_up_proj`` by rows, ``down_proj`` by columns), so a layer ends in one
all-reduce of partial sums, as the dense MLP does; the router is replicated.

Weights load from either checkpoint layout:

- per expert, as Hugging Face checkpoints store them: ``experts.{e}.gate_proj`` /
  ``up_proj`` / ``down_proj`` (Qwen3-MoE) or ``experts.{e}.w1`` / ``w3`` / ``w2``
  (Mixtral), each ``[I, H]`` or ``[H, I]``;
- fused, as transformers 5 holds them in memory: ``experts.gate_up_proj [E, 2I, H]``
  (gate rows, then up rows) and ``experts.down_proj [E, H, I]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from workers import ops, parallel_state
from workers.layers.linear import (_divide, copy_weight, default_weight_loader, narrow_weight,
                                   weight_shape)

# shard ids of per-expert tensors: (expert index, part)
GATE, UP, DOWN = "gate", "up", "down"


class FusedMoE(nn.Module):
    """This rank's slice of ``num_experts`` SiLU-gated experts: ``gate_up_proj
    [E, 2 I/tp, H]`` and ``down_proj [E, H, I/tp]``."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int,
                 tp_rank: int, tp_size: int, dtype: torch.dtype):
        super().__init__()
        self.num_experts = num_experts
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.intermediate_size = intermediate_size  # the full (unsharded) width
        self.shard = _divide(intermediate_size, tp_size, "moe intermediate_size")
        self.gate_up_proj = nn.Parameter(
            torch.empty(num_experts, 2 * self.shard, hidden_size, dtype=dtype), requires_grad=False)
        self.down_proj = nn.Parameter(
            torch.empty(num_experts, hidden_size, self.shard, dtype=dtype), requires_grad=False)
        self.gate_up_proj.weight_loader = self.weight_loader
        self.down_proj.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded, shard_id=None) -> None:
        """``shard_id`` None: the fused tensor of all experts; ``(expert, part)``: one
        expert's ``gate``/``up`` ``[I, H]`` or ``down`` ``[H, I]``."""
        size, start = self.shard, self.tp_rank * self.shard
        if shard_id is None:
            if param is self.down_proj:
                copy_weight(param.data, narrow_weight(loaded, 2, start, size), "down_proj")
                return
            full = self.intermediate_size
            shape = weight_shape(loaded)
            assert shape[1] == 2 * full, f"gate_up_proj: {shape[1]} rows, expected {2 * full}"
            copy_weight(param.data[:, :size], narrow_weight(loaded, 1, start, size), "gate_up_proj")
            copy_weight(param.data[:, size:], narrow_weight(loaded, 1, full + start, size),
                        "gate_up_proj")
            return
        expert, part = shard_id
        if part == DOWN:
            assert param is self.down_proj
            copy_weight(param.data[expert], narrow_weight(loaded, 1, start, size), "down_proj")
            return
        assert param is self.gate_up_proj and part in (GATE, UP), shard_id
        offset = 0 if part == GATE else size
        copy_weight(param.data[expert, offset:offset + size], narrow_weight(loaded, 0, start, size),
                    f"{part}_proj")

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor,
                topk_ids: torch.Tensor) -> torch.Tensor:
        out = ops.fused_moe(x, self.gate_up_proj, self.down_proj, topk_weights, topk_ids)
        if self.tp_size > 1:
            out = parallel_state.all_reduce(out)
        return out


class Router(nn.Module):
    """The replicated router projection ``weight [E, H]`` (no bias)."""

    def __init__(self, hidden_size: int, num_experts: int, dtype: torch.dtype):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size, dtype=dtype),
                                   requires_grad=False)
        self.weight.weight_loader = default_weight_loader

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class SparseMoeBlock(nn.Module):
    """Router (softmax top-k) and experts. ``renormalize``: the top-k weights are scaled
    to sum 1 (Mixtral; Qwen3-MoE's ``norm_topk_prob``). ``round_weights``: they are
    rounded to the activations' dtype before use, as Qwen3-MoE does (Mixtral keeps them
    in float32)."""

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int,
                 renormalize: bool, round_weights: bool, tp_rank: int, tp_size: int,
                 dtype: torch.dtype):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"num_experts_per_tok={top_k} must be in [1, {num_experts}]")
        self.top_k, self.renormalize, self.round_weights = top_k, renormalize, round_weights
        self.gate = Router(hidden_size, num_experts, dtype)
        self.experts = FusedMoE(num_experts, hidden_size, intermediate_size, tp_rank, tp_size,
                                dtype)

    def forward(self, x: torch.Tensor, lora=None) -> torch.Tensor:
        weights, ids = ops.moe_routing(self.gate(x), self.top_k, self.renormalize)
        if self.round_weights:
            weights = weights.to(x.dtype).to(torch.float32)
        return self.experts(x, weights, ids)

