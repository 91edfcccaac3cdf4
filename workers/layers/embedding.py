"""Vocab-parallel token embedding and LM head.

The vocabulary is padded to a multiple of tp and split into equal row ranges;
padding rows are zero and trimmed from the logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from workers import parallel_state
from workers.layers.linear import copy_weight, narrow_weight, weight_shape


class VocabParallelEmbedding(nn.Module):
    """Rows ``[vocab_start, vocab_start + shard_size)`` of the embedding on this rank."""

    def __init__(self, num_embeddings: int, embedding_dim: int, tp_rank: int | None = None,
                 tp_size: int | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        self.tp_rank = parallel_state.tp_rank() if tp_rank is None else tp_rank
        self.tp_size = parallel_state.tp_size() if tp_size is None else tp_size
        self.num_embeddings = num_embeddings
        self.shard_size = -(-num_embeddings // self.tp_size)
        self.vocab_start = self.tp_rank * self.shard_size
        self.vocab_end = min(self.vocab_start + self.shard_size, num_embeddings)
        # Padding rows must be zero: they produce the (trimmed) padded logits.
        self.weight = nn.Parameter(
            torch.zeros(self.shard_size, embedding_dim, dtype=dtype or torch.get_default_dtype()),
            requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded_weight, shard_id=None) -> None:
        assert shard_id is None
        rows, dim = weight_shape(loaded_weight)
        assert rows == self.num_embeddings and dim == param.shape[1], (
            f"embedding: checkpoint shape {(rows, dim)} != ({self.num_embeddings}, {param.shape[1]})")
        n = self.vocab_end - self.vocab_start
        copy_weight(param.data[:n], narrow_weight(loaded_weight, 0, self.vocab_start, n))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        in_shard = (input_ids >= self.vocab_start) & (input_ids < self.vocab_end)
        local_ids = torch.where(in_shard, input_ids - self.vocab_start, 0)
        out = F.embedding(local_ids, self.weight)
        out = out.masked_fill(~in_shard.unsqueeze(-1), 0)
        return parallel_state.all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """Vocab-sharded logits gathered to the full vocabulary on every rank."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = F.linear(hidden, self.weight)
        if self.tp_size > 1:
            logits = parallel_state.all_gather_last_dim(logits)
        return logits[..., : self.num_embeddings]
