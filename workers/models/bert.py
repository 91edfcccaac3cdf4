"""Encoder-only models (BERT, RoBERTa, XLM-RoBERTa) with tensor parallelism, for
embeddings: bidirectional attention over whole sequences, no KV cache.

The layers are the decoders' own: attention heads split by ``QKVParallelLinear``,
the attention output and the MLP's second projection are row-parallel (they
all-reduce), the word embedding is vocabulary-parallel. Blocks are post-norm
(``LayerNorm(x + sublayer(x))``), as BERT's are. Each sequence is one segment
(token type 0).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from workers.attention import Attention, VarlenMetadata
from workers.layers.activation import Activation
from workers.layers.embedding import VocabParallelEmbedding
from workers.layers.linear import (ColumnParallelLinear, QKVParallelLinear, RowParallelLinear,
                                   default_weight_loader)
from workers.layers.norm import LayerNorm

_PREFIXES = ("bert.", "roberta.", "model.")  # task-head checkpoints nest the encoder
_SKIPPED = ("pooler.", "cls.", "lm_head.", "classifier.", "position_ids")


class BertEmbeddings(nn.Module):
    def __init__(self, cfg, position_offset: int, tp_rank: int, tp_size: int, dtype: torch.dtype):
        super().__init__()
        self.word_embeddings = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, tp_rank,
                                                      tp_size, dtype)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size,
                                                dtype=dtype)
        self.token_type_embeddings = nn.Embedding(max(1, cfg.type_vocab_size), cfg.hidden_size,
                                                  dtype=dtype)
        self.LayerNorm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, dtype)
        self.position_offset = position_offset

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden = self.word_embeddings(input_ids) + self.token_type_embeddings.weight[0]
        hidden = hidden + self.position_embeddings(positions + self.position_offset)
        return self.LayerNorm(hidden)


class BertSelfAttention(nn.Module):
    def __init__(self, cfg, tp_rank: int, tp_size: int, dtype: torch.dtype):
        super().__init__()
        head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.qkv_proj = QKVParallelLinear(cfg.hidden_size, head_dim, cfg.num_attention_heads,
                                          cfg.num_attention_heads, True, tp_rank, tp_size, dtype)
        self.q_size = self.qkv_proj.q_size
        self.attn = Attention(self.qkv_proj.num_heads, head_dim, head_dim ** -0.5,
                              self.qkv_proj.num_kv_heads)

    def forward(self, hidden: torch.Tensor, meta: VarlenMetadata) -> torch.Tensor:
        q, k, v = self.qkv_proj(hidden).split([self.q_size] * 3, dim=-1)
        return self.attn(q, k, v, None, meta)


class BertOutput(nn.Module):
    """``LayerNorm(residual + dense(x))`` (``attention.output`` and ``output``)."""

    def __init__(self, input_size: int, cfg, tp_rank: int, tp_size: int, dtype: torch.dtype):
        super().__init__()
        self.dense = RowParallelLinear(input_size, cfg.hidden_size, True, tp_rank, tp_size, dtype)
        self.LayerNorm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, dtype)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x), residual)


class BertAttention(nn.Module):
    def __init__(self, cfg, tp_rank: int, tp_size: int, dtype: torch.dtype):
        super().__init__()
        # Named as in transformers (attention.self, attention.output), so checkpoints map 1:1.
        setattr(self, "self", BertSelfAttention(cfg, tp_rank, tp_size, dtype))
        self.output = BertOutput(cfg.hidden_size, cfg, tp_rank, tp_size, dtype)

    def forward(self, hidden: torch.Tensor, meta: VarlenMetadata) -> torch.Tensor:
        return self.output(getattr(self, "self")(hidden, meta), hidden)


class BertIntermediate(nn.Module):
    def __init__(self, cfg, tp_rank: int, tp_size: int, dtype: torch.dtype):
        super().__init__()
        self.dense = ColumnParallelLinear(cfg.hidden_size, cfg.intermediate_size, True, tp_rank,
                                          tp_size, dtype)
        self.act = Activation(cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class BertLayer(nn.Module):
    def __init__(self, cfg, tp_rank: int, tp_size: int, dtype: torch.dtype):
        super().__init__()
        self.attention = BertAttention(cfg, tp_rank, tp_size, dtype)
        self.intermediate = BertIntermediate(cfg, tp_rank, tp_size, dtype)
        self.output = BertOutput(cfg.intermediate_size, cfg, tp_rank, tp_size, dtype)

    def forward(self, hidden: torch.Tensor, meta: VarlenMetadata) -> torch.Tensor:
        hidden = self.attention(hidden, meta)
        return self.output(self.intermediate(hidden), hidden)


class BertEncoder(nn.Module):
    def __init__(self, cfg, tp_rank: int, tp_size: int, dtype: torch.dtype):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(cfg, tp_rank, tp_size, dtype)
                                   for _ in range(cfg.num_hidden_layers))


class BertModel(nn.Module):
    """This rank's shard of a BERT-style encoder over a packed batch of whole sequences:
    ``forward(input_ids, positions, meta)`` → final hidden states ``[T, hidden]``."""

    is_encoder = True
    hf_auto_class = "AutoModel"  # how transformers builds it (dummy weights take its names)
    position_offset = 0
    # (fused parameter, checkpoint name, shard id)
    stacked_params = (("qkv_proj", "query", "q"), ("qkv_proj", "key", "k"),
                      ("qkv_proj", "value", "v"))

    def __init__(self, hf_config, tp_rank: int = 0, tp_size: int = 1,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        if getattr(hf_config, "position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"position_embedding_type: {hf_config.position_embedding_type!r} "
                             "is not supported (absolute only)")
        self.config = hf_config
        self.tp_rank, self.tp_size, self.dtype = tp_rank, tp_size, dtype
        self.embeddings = BertEmbeddings(hf_config, self.position_offset_of(hf_config), tp_rank,
                                         tp_size, dtype)
        self.encoder = BertEncoder(hf_config, tp_rank, tp_size, dtype)
        self.num_layers = hf_config.num_hidden_layers
        self.hidden_size = hf_config.hidden_size

    @classmethod
    def position_offset_of(cls, cfg) -> int:
        return cls.position_offset

    @classmethod
    def max_positions(cls, cfg) -> int:
        """The longest sequence its position table holds."""
        return cfg.max_position_embeddings - cls.position_offset_of(cfg)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: VarlenMetadata,
                kv_caches=None, lora=None) -> torch.Tensor:
        hidden = self.embeddings(input_ids, positions)
        for layer in self.encoder.layer:
            hidden = layer(hidden, meta)
        return hidden

    def load_weights(self, weights: Iterable[tuple[str, object]]) -> None:
        """Loads HF-named tensors (with or without a ``bert.``/``roberta.`` prefix); task
        heads and the pooler are skipped; each parameter takes its shard."""
        params = dict(self.named_parameters())
        expected = {ckpt for name in params for ckpt in self._checkpoint_names(name)}
        loaded: set[str] = set()
        for name, weight in weights:
            name = _strip_prefix(name)
            if name.startswith(_SKIPPED) or name.endswith(_SKIPPED):
                continue
            name = name.replace("LayerNorm.gamma", "LayerNorm.weight").replace(
                "LayerNorm.beta", "LayerNorm.bias")
            param_name, shard_id = name, None
            for fused, part, shard in self.stacked_params:
                if f".{part}." in name:
                    param_name, shard_id = name.replace(f".{part}.", f".{fused}."), shard
                    break
            if param_name not in params:
                raise ValueError(f"unexpected weight {name!r} for {type(self).__name__}")
            param = params[param_name]
            getattr(param, "weight_loader", default_weight_loader)(param, weight, shard_id)
            loaded.add(name)
        missing = sorted(expected - loaded)
        if missing:
            raise ValueError(f"checkpoint lacks {len(missing)} weights, e.g. {missing[:3]}")

    def _checkpoint_names(self, param_name: str) -> list[str]:
        parts = [part for fused, part, _ in self.stacked_params if f".{fused}." in param_name]
        if not parts:
            return [param_name]
        return [param_name.replace(".qkv_proj.", f".{part}.") for part in parts]


def _strip_prefix(name: str) -> str:
    for prefix in _PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


class RobertaModel(BertModel):
    """RoBERTa / XLM-RoBERTa: BERT with positions counted from ``pad_token_id + 1``."""

    @classmethod
    def position_offset_of(cls, cfg) -> int:
        return cfg.pad_token_id + 1
