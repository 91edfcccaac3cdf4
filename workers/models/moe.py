"""Mixtures of experts: Qwen3-MoE and Mixtral, Llama-family decoders whose MLPs are
``SparseMoeBlock`` layers (``workers.layers.moe``: tensor-parallel experts over
``spmd::fused_moe``)."""

from __future__ import annotations

import re

import torch
from torch import nn

from workers.layers.moe import DOWN, GATE, UP, SparseMoeBlock
from workers.models.llama import LlamaForCausalLM
from workers.models.qwen3 import Qwen3ForCausalLM

# Per-expert checkpoint tensors: Qwen3-MoE's gate/up/down_proj, Mixtral's w1/w3/w2.
_EXPERT = re.compile(r"^(?P<prefix>.*)\.(?:mlp|block_sparse_moe)\.experts\.(?P<expert>\d+)\."
                     r"(?P<part>gate_proj|up_proj|down_proj|w1|w3|w2)\.weight$")
_PART = {"gate_proj": GATE, "w1": GATE, "up_proj": UP, "w3": UP, "down_proj": DOWN, "w2": DOWN}


class _MoEMixin:
    """Loads the experts of ``SparseMoeBlock`` layers from either layout (per expert, or
    fused as transformers 5 holds them) and the router from ``gate`` (Mixtral's old
    ``block_sparse_moe.gate``)."""

    def map_weight_name(self, name: str) -> tuple[str, object]:
        match = _EXPERT.match(name)
        if match:
            part = _PART[match["part"]]
            fused = "down_proj" if part == DOWN else "gate_up_proj"
            return f"{match['prefix']}.mlp.experts.{fused}", (int(match["expert"]), part)
        if ".block_sparse_moe." in name:
            name = name.replace(".block_sparse_moe.", ".mlp.")
        if ".mlp.experts." in name or ".mlp.gate.weight" in name:
            return name, None
        return super().map_weight_name(name)

    def weight_pieces(self, param_name: str) -> list[dict]:
        for fused, parts in (("gate_up_proj", (GATE, UP)), ("down_proj", (DOWN,))):
            if param_name.endswith(f".experts.{fused}"):
                experts = self.get_parameter(param_name).shape[0]
                prefix = param_name[:-len(fused)]
                return [{None: param_name},
                        {(e, p): f"{prefix}{e}.{p}_proj.weight" for e in range(experts) for p in parts}]
        return super().weight_pieces(param_name)


class Qwen3MoeForCausalLM(_MoEMixin, Qwen3ForCausalLM):
    """Qwen3-MoE: every ``decoder_sparse_step``-th layer not in ``mlp_only_layers`` is a
    mixture of ``num_experts`` experts of width ``moe_intermediate_size``, top
    ``num_experts_per_tok``, renormalised when ``norm_topk_prob``; the others are dense."""

    @staticmethod
    def make_mlp(cfg, layer_index: int, tp_rank: int, tp_size: int, dtype: torch.dtype) -> nn.Module:
        sparse = (layer_index not in (getattr(cfg, "mlp_only_layers", None) or [])
                  and cfg.num_experts > 0
                  and (layer_index + 1) % getattr(cfg, "decoder_sparse_step", 1) == 0)
        if not sparse:
            return LlamaForCausalLM.make_mlp(cfg, layer_index, tp_rank, tp_size, dtype)
        return SparseMoeBlock(cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts,
                              cfg.num_experts_per_tok, bool(getattr(cfg, "norm_topk_prob", False)),
                              True, tp_rank, tp_size, dtype)


class MixtralForCausalLM(_MoEMixin, LlamaForCausalLM):
    """Mixtral: Mistral attention; every layer a mixture of ``num_local_experts`` experts of
    width ``intermediate_size``, top ``num_experts_per_tok``, always renormalised."""

    @staticmethod
    def make_mlp(cfg, layer_index: int, tp_rank: int, tp_size: int, dtype: torch.dtype) -> nn.Module:
        return SparseMoeBlock(cfg.hidden_size, cfg.intermediate_size, cfg.num_local_experts,
                              cfg.num_experts_per_tok, True, False, tp_rank, tp_size, dtype)
