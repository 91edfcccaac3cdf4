"""Column-, row- and QKV-parallel linear layers with per-parameter weight loaders.

Every parameter carries ``weight_loader(param, loaded_weight, shard_id=None)``
that copies only this rank's slice. ``loaded_weight`` is a full tensor or a lazy
safetensors slice (``get_shape()`` / ``__getitem__``), so a rank reads only its
shard from disk.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from workers import parallel_state


def weight_shape(loaded) -> tuple[int, ...]:
    """Shape of a tensor or of a lazy safetensors slice."""
    if isinstance(loaded, torch.Tensor):
        return tuple(loaded.shape)
    return tuple(loaded.get_shape())


def narrow_weight(loaded, dim: int, start: int, length: int) -> torch.Tensor:
    """``loaded[..., start:start+length, ...]`` along ``dim``, reading only that part of a slice."""
    if isinstance(loaded, torch.Tensor):
        return loaded.narrow(dim, start, length)
    index = [slice(None)] * len(weight_shape(loaded))
    index[dim] = slice(start, start + length)
    return loaded[tuple(index)]


def full_weight(loaded) -> torch.Tensor:
    return loaded if isinstance(loaded, torch.Tensor) else loaded[:]


def copy_weight(dst: torch.Tensor, src: torch.Tensor, name: str = "weight") -> None:
    assert tuple(dst.shape) == tuple(src.shape), f"{name}: shape {tuple(src.shape)} != {tuple(dst.shape)}"
    dst.copy_(src)


def default_weight_loader(param: nn.Parameter, loaded_weight, shard_id=None) -> None:
    """Replicated parameter: every rank takes the whole tensor."""
    assert shard_id is None
    copy_weight(param.data, full_weight(loaded_weight))


def _new_param(*shape: int, dtype: torch.dtype, loader) -> nn.Parameter:
    param = nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)
    param.weight_loader = loader
    return param


class _ParallelLinear(nn.Module):
    """Holds ``weight [out, in]`` and optional ``bias [out]`` of this rank's shard."""

    def __init__(self, input_size: int, output_size: int, bias: bool, tp_rank: int | None,
                 tp_size: int | None, dtype: torch.dtype | None):
        super().__init__()
        self.tp_rank = parallel_state.tp_rank() if tp_rank is None else tp_rank
        self.tp_size = parallel_state.tp_size() if tp_size is None else tp_size
        dtype = dtype or torch.get_default_dtype()
        self.weight = _new_param(output_size, input_size, dtype=dtype, loader=self.weight_loader)
        self.bias = _new_param(output_size, dtype=dtype, loader=self.weight_loader) if bias else None
        self.lora = None  # a LoRAStack when the engine serves adapters (workers.lora)

    def weight_loader(self, param: nn.Parameter, loaded_weight, shard_id=None) -> None:
        raise NotImplementedError

    def lora_slices(self) -> list[int]:
        """Output widths, on this rank, of the projections fused in this layer."""
        return [self.weight.shape[0]]

    def forward(self, x: torch.Tensor, lora=None) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        if lora is not None and self.lora is not None:
            out = self.lora(x, out, lora)
        return out


def _divide(total: int, tp_size: int, what: str) -> int:
    assert total % tp_size == 0, f"{what}={total} is not divisible by tp_size={tp_size}"
    return total // tp_size


class ColumnParallelLinear(_ParallelLinear):
    """Output features sharded over ranks; no communication (the output stays sharded)."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False,
                 tp_rank: int | None = None, tp_size: int | None = None,
                 dtype: torch.dtype | None = None):
        tp = parallel_state.tp_size() if tp_size is None else tp_size
        super().__init__(input_size, _divide(output_size, tp, "output_size"), bias, tp_rank, tp, dtype)

    def weight_loader(self, param, loaded_weight, shard_id=None):
        assert shard_id is None
        size = param.shape[0]
        copy_weight(param.data, narrow_weight(loaded_weight, 0, self.tp_rank * size, size))


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of one input stacked along the output
    (``gate_up_proj``): this rank holds ``[shard of out_0; shard of out_1; ...]``."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False,
                 tp_rank: int | None = None, tp_size: int | None = None,
                 dtype: torch.dtype | None = None):
        tp = parallel_state.tp_size() if tp_size is None else tp_size
        self.shard_sizes = [_divide(n, tp, "output_size") for n in output_sizes]
        super().__init__(input_size, sum(output_sizes), bias, tp_rank, tp, dtype)

    def lora_slices(self) -> list[int]:
        return list(self.shard_sizes)

    def weight_loader(self, param, loaded_weight, shard_id=None):
        assert isinstance(shard_id, int), "merged linear needs an integer shard_id"
        size = self.shard_sizes[shard_id]
        offset = sum(self.shard_sizes[:shard_id])
        copy_weight(param.data.narrow(0, offset, size),
                    narrow_weight(loaded_weight, 0, self.tp_rank * size, size))


def kv_heads_per_rank(num_kv_heads: int, tp_size: int) -> int:
    """Key/value heads each rank holds: a 1/tp share, or one replicated head when tp exceeds
    the head count (tp must then be a multiple of it, as vLLM requires)."""
    if tp_size <= num_kv_heads:
        return _divide(num_kv_heads, tp_size, "num_key_value_heads")
    assert tp_size % num_kv_heads == 0, (
        f"tensor_parallel_size={tp_size} must be a multiple of num_key_value_heads={num_kv_heads}")
    return 1


class QKVParallelLinear(ColumnParallelLinear):
    """Fused q/k/v projection sharded by heads: this rank holds its query heads
    followed by its key heads and its value heads. tp must divide the query heads and
    divide, or be a multiple of, the key/value heads; in the latter case each key/value
    head is replicated on ``tp / num_kv_heads`` consecutive ranks."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int,
                 bias: bool = False, tp_rank: int | None = None, tp_size: int | None = None,
                 dtype: torch.dtype | None = None):
        tp = parallel_state.tp_size() if tp_size is None else tp_size
        rank = parallel_state.tp_rank() if tp_rank is None else tp_rank
        self.num_heads = _divide(num_heads, tp, "num_attention_heads")
        self.num_kv_heads = kv_heads_per_rank(num_kv_heads, tp)
        # Index, in the checkpoint, of this rank's first key/value head.
        self.kv_head_start = (rank * self.num_kv_heads if tp <= num_kv_heads
                              else rank // (tp // num_kv_heads))
        self.head_dim = head_dim
        self.q_size = self.num_heads * head_dim
        self.kv_size = self.num_kv_heads * head_dim
        super().__init__(hidden_size, (self.num_heads + 2 * self.num_kv_heads) * head_dim * tp,
                         bias, rank, tp, dtype)

    def lora_slices(self) -> list[int]:
        return [self.q_size, self.kv_size, self.kv_size]

    def weight_loader(self, param, loaded_weight, shard_id=None):
        offsets = {"q": (0, self.q_size), "k": (self.q_size, self.kv_size),
                   "v": (self.q_size + self.kv_size, self.kv_size)}
        assert shard_id in offsets, f"qkv shard_id must be 'q', 'k' or 'v', got {shard_id!r}"
        offset, size = offsets[shard_id]
        start = self.tp_rank * size if shard_id == "q" else self.kv_head_start * self.head_dim
        copy_weight(param.data.narrow(0, offset, size), narrow_weight(loaded_weight, 0, start, size))


class RowParallelLinear(_ParallelLinear):
    """Input features sharded over ranks; partial outputs are summed over the TP
    group, and the (replicated) bias is added once, after the reduction."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False,
                 tp_rank: int | None = None, tp_size: int | None = None,
                 dtype: torch.dtype | None = None):
        tp = parallel_state.tp_size() if tp_size is None else tp_size
        super().__init__(_divide(input_size, tp, "input_size"), output_size, bias, tp_rank, tp, dtype)

    def weight_loader(self, param, loaded_weight, shard_id=None):
        assert shard_id is None
        if param is self.bias:
            copy_weight(param.data, full_weight(loaded_weight), "bias")
            return
        size = param.shape[1]
        copy_weight(param.data, narrow_weight(loaded_weight, 1, self.tp_rank * size, size))

    def forward(self, x: torch.Tensor, lora=None) -> torch.Tensor:
        out = F.linear(x, self.weight)
        if lora is not None and self.lora is not None:
            out = self.lora(x, out, lora)  # a partial sum too: reduced with the base output
        if self.tp_size > 1:
            out = parallel_state.all_reduce(out)
        if self.bias is not None:
            out = out + self.bias
        return out
