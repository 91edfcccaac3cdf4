"""Llama-family decoder (Llama, Mistral, Qwen2, SmolLM2) with tensor parallelism; the
base of Qwen3 and the mixtures of experts (``workers.models.qwen3``, ``.mixtral``).

Attention heads, MLP columns and the vocabulary are sharded over the TP group;
``o_proj`` and ``down_proj`` all-reduce. Mistral's sliding window is not
implemented: attention is full, which is exact while the context fits in the
window, and ``forward`` refuses longer contexts.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from workers.attention import Attention, AttentionMetadata
from workers.layers.activation import SiluAndMul
from workers.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from workers.layers.linear import (MergedColumnParallelLinear, QKVParallelLinear,
                                   RowParallelLinear, default_weight_loader, kv_heads_per_rank)
from workers.layers.norm import RMSNorm
from workers.layers.rotary import RotaryEmbedding

_SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def rope_config(hf_config) -> tuple[float, dict | None]:
    """``(base, rope_scaling)`` from a transformers 5 (``rope_parameters``) or 4
    (``rope_theta`` + ``rope_scaling``) config; ``rope_scaling`` is None for plain RoPE."""
    params = getattr(hf_config, "rope_parameters", None)
    if params is None:
        params = dict(getattr(hf_config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    params = dict(params)
    base = float(params.pop("rope_theta", 10000.0))
    rope_type = params.pop("rope_type", params.pop("type", "default"))
    if rope_type not in _SUPPORTED_ROPE_TYPES:
        raise ValueError(f"rope_type: {rope_type!r} is not supported; supported: {_SUPPORTED_ROPE_TYPES}")
    return base, (None if rope_type == "default" else {"rope_type": rope_type, **params})


class LlamaMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool, tp_rank: int,
                 tp_size: int, dtype: torch.dtype):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(
            hidden_size, [intermediate_size] * 2, bias, tp_rank, tp_size, dtype)
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, bias, tp_rank, tp_size, dtype)
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor, lora=None) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x, lora)), lora)


class LlamaAttention(nn.Module):
    """``qk_norm``: per-head RMSNorm of queries and keys before RoPE (Qwen3)."""

    def __init__(self, cfg, head_dim: int, rotary_emb: RotaryEmbedding, qkv_bias: bool,
                 o_bias: bool, tp_rank: int, tp_size: int, dtype: torch.dtype,
                 qk_norm: bool = False):
        super().__init__()
        self.qkv_proj = QKVParallelLinear(cfg.hidden_size, head_dim, cfg.num_attention_heads,
                                          cfg.num_key_value_heads, qkv_bias, tp_rank, tp_size, dtype)
        self.o_proj = RowParallelLinear(cfg.num_attention_heads * head_dim, cfg.hidden_size, o_bias,
                                        tp_rank, tp_size, dtype)
        self.rotary_emb = rotary_emb
        self.q_size, self.kv_size = self.qkv_proj.q_size, self.qkv_proj.kv_size
        self.attn = Attention(self.qkv_proj.num_heads, head_dim, head_dim ** -0.5,
                              self.qkv_proj.num_kv_heads)
        self.head_dim = head_dim
        self.q_norm = RMSNorm(head_dim, cfg.rms_norm_eps, dtype) if qk_norm else None
        self.k_norm = RMSNorm(head_dim, cfg.rms_norm_eps, dtype) if qk_norm else None

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata, lora=None) -> torch.Tensor:
        q, k, v = self.qkv_proj(hidden, lora).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.q_norm is not None:
            tokens = q.shape[0]
            q = self.q_norm(q.reshape(tokens, -1, self.head_dim)).reshape(tokens, self.q_size)
            k = self.k_norm(k.reshape(tokens, -1, self.head_dim)).reshape(tokens, self.kv_size)
        q, k = self.rotary_emb(positions, q, k)
        return self.o_proj(self.attn(q, k, v, kv_cache, meta), lora)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg, head_dim: int, rotary_emb: RotaryEmbedding, qkv_bias: bool,
                 o_bias: bool, tp_rank: int, tp_size: int, dtype: torch.dtype,
                 mlp: nn.Module, qk_norm: bool = False):
        super().__init__()
        self.self_attn = LlamaAttention(cfg, head_dim, rotary_emb, qkv_bias, o_bias,
                                        tp_rank, tp_size, dtype, qk_norm)
        self.mlp = mlp
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)

    def forward(self, positions, hidden, residual, kv_cache, meta, lora=None):
        # The residual stream is carried unnormalised; the fused op adds and normalises.
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, kv_cache, meta, lora)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden, lora), residual


class LlamaModel(nn.Module):
    """``make_mlp(layer_index)`` builds each layer's MLP (dense or mixture of experts)."""

    def __init__(self, cfg, qkv_bias: bool, o_bias: bool, tp_rank: int, tp_size: int,
                 dtype: torch.dtype, make_mlp, qk_norm: bool = False):
        super().__init__()
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        base, rope_scaling = rope_config(cfg)
        rotary_emb = RotaryEmbedding(self.head_dim, cfg.max_position_embeddings, base, rope_scaling, dtype)
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, tp_rank, tp_size, dtype)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(cfg, self.head_dim, rotary_emb, qkv_bias, o_bias, tp_rank, tp_size,
                              dtype, make_mlp(i), qk_norm)
            for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)

    def forward(self, input_ids, positions, meta, kv_caches, lora=None):
        hidden = self.embed_tokens(input_ids)
        residual = None
        if kv_caches is None:  # prefill only (an embedder): attention needs no cache
            kv_caches = [None] * len(self.layers)
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            hidden, residual = layer(positions, hidden, residual, kv_cache, meta, lora)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class LlamaForCausalLM(nn.Module):
    """This rank's shard of a Llama-family causal LM over a flattened varlen batch."""

    # (fused parameter, checkpoint name, shard id)
    stacked_params = (("qkv_proj", "q_proj", "q"), ("qkv_proj", "k_proj", "k"),
                      ("qkv_proj", "v_proj", "v"),
                      ("gate_up_proj", "gate_proj", 0), ("gate_up_proj", "up_proj", 1))
    qk_norm = False  # per-head RMSNorm of q and k (Qwen3)

    def __init__(self, hf_config, tp_rank: int = 0, tp_size: int = 1,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        self.config = hf_config
        self.tp_rank, self.tp_size, self.dtype = tp_rank, tp_size, dtype
        qkv_bias, o_bias = self.attention_biases(hf_config)
        self.model = LlamaModel(hf_config, qkv_bias, o_bias, tp_rank, tp_size, dtype,
                                lambda i: self.make_mlp(hf_config, i, tp_rank, tp_size, dtype),
                                self.qk_norm)
        self.lm_head = ParallelLMHead(hf_config.vocab_size, hf_config.hidden_size, tp_rank, tp_size, dtype)
        self.tie_word_embeddings = bool(getattr(hf_config, "tie_word_embeddings", False))
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.num_layers = hf_config.num_hidden_layers
        self.num_kv_heads = kv_heads_per_rank(hf_config.num_key_value_heads, tp_size)
        self.head_dim = self.model.head_dim
        self.sliding_window = self.window(hf_config)

    @staticmethod
    def make_mlp(cfg, layer_index: int, tp_rank: int, tp_size: int, dtype: torch.dtype) -> nn.Module:
        """Layer ``layer_index``'s MLP: dense here; a mixture of experts in subclasses."""
        return LlamaMLP(cfg.hidden_size, cfg.intermediate_size, getattr(cfg, "mlp_bias", False),
                        tp_rank, tp_size, dtype)

    @staticmethod
    def attention_biases(cfg) -> tuple[bool, bool]:
        """(q/k/v bias, o_proj bias)."""
        bias = bool(getattr(cfg, "attention_bias", False))
        return bias, bias

    @staticmethod
    def window(cfg) -> int | None:
        return getattr(cfg, "sliding_window", None)

    def kv_cache_shape(self, num_blocks: int, block_size: int) -> tuple[int, ...]:
        """One layer's KV cache on this rank."""
        return (2, num_blocks, block_size, self.num_kv_heads, self.head_dim)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv_caches: list[torch.Tensor], lora=None) -> torch.Tensor:
        """``input_ids, positions [T]`` (int64) → final hidden states ``[T, hidden]``;
        ``lora`` (a ``LoRAMapping``) adds each token's adapter, if any."""
        if self.sliding_window is not None and meta.max_seq_len > self.sliding_window:
            raise ValueError(f"context of {meta.max_seq_len} tokens exceeds sliding_window="
                             f"{self.sliding_window}, which is not implemented; lower max_model_len")
        return self.model(input_ids, positions, meta, kv_caches, lora)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden [S, hidden]`` → float32 logits over the full vocabulary, on every rank."""
        return self.lm_head(hidden).float()

    def load_weights(self, weights: Iterable[tuple[str, object]]) -> None:
        """Loads HF-named tensors (or lazy safetensors slices); each parameter takes its shard."""
        params = dict(self.named_parameters())
        loaded: dict[str, set] = {}
        for name, weight in weights:
            if "rotary_emb.inv_freq" in name or (self.tie_word_embeddings and name == "lm_head.weight"):
                continue
            param_name, shard_id = self.map_weight_name(name)
            if param_name not in params:
                raise ValueError(f"unexpected weight {name!r} for {type(self).__name__}")
            param = params[param_name]
            getattr(param, "weight_loader", default_weight_loader)(param, weight, shard_id)
            loaded.setdefault(param_name, set()).add(shard_id)
        missing = []
        for name in params:
            have = loaded.get(name, set())
            ways = self.weight_pieces(name)
            if not any(set(pieces) <= have for pieces in ways):
                missing += [ckpt for shard, ckpt in ways[-1].items() if shard not in have]
        if missing:
            raise ValueError(f"checkpoint lacks {len(missing)} weights, e.g. {sorted(missing)[:3]}")

    def map_weight_name(self, name: str) -> tuple[str, object]:
        """``(parameter name, shard id)`` of a checkpoint tensor (shard id None: the whole
        parameter)."""
        for fused, part, shard in self.stacked_params:
            if f".{part}." in name:
                return name.replace(f".{part}.", f".{fused}."), shard
        return name, None

    def weight_pieces(self, param_name: str) -> list[dict]:
        """The ways to fill a parameter, each ``{shard id: checkpoint name}``: any one
        complete way loads it (the last is named when none is)."""
        pieces = {shard: param_name.replace(f".{fused}.", f".{part}.")
                  for fused, part, shard in self.stacked_params if f".{fused}." in param_name}
        return [pieces or {None: param_name}]


class MistralForCausalLM(LlamaForCausalLM):
    pass


class Qwen2ForCausalLM(LlamaForCausalLM):
    @staticmethod
    def attention_biases(cfg) -> tuple[bool, bool]:
        return True, False

    @staticmethod
    def window(cfg) -> int | None:
        return getattr(cfg, "sliding_window", None) if getattr(cfg, "use_sliding_window", False) else None
