"""LoRA adapters in PEFT format (``adapter_config.json`` + ``adapter_model.safetensors``):
checked against the base model, sharded like their base layers, held in a rank's CPU
cache and copied into its device slots when the engine says so.

``check_adapter`` runs in the engine process before any rank is told about an
adapter, so a bad one is a ``ValueError`` naming the module and the limit and no
rank changes state. ``RankLoRA`` is a rank's side: ``load`` / ``unload`` (broadcast
calls) and ``fill_slot`` (from a step message).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from workers.layers.linear import RowParallelLinear
from workers.layers.lora import LoRAMapping, LoRAStack

# PEFT target module -> (our fused layer under a decoder layer, slice index)
TARGETS = {"q_proj": ("self_attn.qkv_proj", 0), "k_proj": ("self_attn.qkv_proj", 1),
           "v_proj": ("self_attn.qkv_proj", 2), "o_proj": ("self_attn.o_proj", 0),
           "gate_proj": ("mlp.gate_up_proj", 0), "up_proj": ("mlp.gate_up_proj", 1),
           "down_proj": ("mlp.down_proj", 0)}
_KEY = re.compile(r"(?:.*\.)?layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


@dataclass(frozen=True)
class AdapterConfig:
    rank: int
    alpha: float
    use_rslora: bool

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


def module_shapes(hf_config) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each target module of the full (unsharded) model."""
    head_dim = getattr(hf_config, "head_dim", None) or \
        hf_config.hidden_size // hf_config.num_attention_heads
    hidden, inter = hf_config.hidden_size, hf_config.intermediate_size
    q = hf_config.num_attention_heads * head_dim
    kv = hf_config.num_key_value_heads * head_dim
    return {"q_proj": (hidden, q), "k_proj": (hidden, kv), "v_proj": (hidden, kv),
            "o_proj": (q, hidden), "gate_proj": (hidden, inter), "up_proj": (hidden, inter),
            "down_proj": (inter, hidden)}


_MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")


def mixture_of_experts_layers(hf_config) -> set[int]:
    """Indices of the layers whose MLP is a mixture of experts (Qwen3-MoE, Mixtral)."""
    layers = range(hf_config.num_hidden_layers)
    if getattr(hf_config, "num_local_experts", 0):  # Mixtral: every layer
        return set(layers)
    if getattr(hf_config, "num_experts", 0):  # Qwen3-MoE: every decoder_sparse_step-th
        dense = set(getattr(hf_config, "mlp_only_layers", None) or [])
        step = getattr(hf_config, "decoder_sparse_step", 1) or 1
        return {i for i in layers if i not in dense and (i + 1) % step == 0}
    return set()


def read_adapter_config(path: str, name: str = "") -> AdapterConfig:
    label = f"adapter {name!r}" if name else "adapter"
    config_path = os.path.join(path, CONFIG_FILE)
    if not os.path.isdir(path):
        raise ValueError(f"lora_path: {label}: {path!r} is not a directory")
    if not os.path.isfile(config_path):
        raise ValueError(f"lora_path: {label}: {CONFIG_FILE} is missing in {path!r}")
    try:
        with open(config_path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"lora_path: {label}: {CONFIG_FILE} is not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"lora_path: {label}: {CONFIG_FILE} must hold a JSON object")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{label}: peft_type {cfg.get('peft_type')!r} is not supported (LORA only)")
    for key, why in (("use_dora", "DoRA"), ("fan_in_fan_out", "fan_in_fan_out weights"),
                     ("modules_to_save", "modules_to_save (fully trained modules)"),
                     ("rank_pattern", "rank_pattern"), ("alpha_pattern", "alpha_pattern"),
                     ("lora_bias", "LoRA biases")):
        if cfg.get(key):
            raise ValueError(f"{label}: {key}: {why} is not supported")
    if cfg.get("bias", "none") != "none":
        raise ValueError(f"{label}: bias={cfg['bias']!r} is not supported (only 'none')")
    rank, alpha = cfg.get("r"), cfg.get("lora_alpha", cfg.get("r"))
    if type(rank) is not int or rank < 1:
        raise ValueError(f"{label}: r={rank!r} must be an int >= 1")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise ValueError(f"{label}: lora_alpha={alpha!r} must be a finite number")
    return AdapterConfig(rank, float(alpha), bool(cfg.get("use_rslora", False)))


def read_adapter_weights(path: str, hf_config, max_lora_rank: int, name: str = ""
                         ) -> tuple[AdapterConfig, dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]]:
    """The adapter's config and ``{(layer, module): (A [r, in], B [out, r])}``, full size,
    every tensor checked against the base model."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    label = f"adapter {name!r}" if name else "adapter"
    cfg = read_adapter_config(path, name)
    weights_path = os.path.join(path, WEIGHTS_FILE)
    if not os.path.isfile(weights_path):
        raise ValueError(f"lora_path: {label}: {WEIGHTS_FILE} is missing in {path!r}")
    try:
        tensors = load_file(weights_path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ValueError(f"lora_path: {label}: {WEIGHTS_FILE} cannot be read ({e})") from None
    shapes = module_shapes(hf_config)
    num_layers = hf_config.num_hidden_layers
    moe_layers = mixture_of_experts_layers(hf_config)
    parts: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.match(key)
        if match is None:
            raise ValueError(f"{label}: {key}: not a LoRA weight of a supported module "
                             f"(supported: {', '.join(TARGETS)})")
        layer, module, which = int(match[1]), match[2], match[3]
        if module not in TARGETS:
            raise ValueError(f"{label}: {key}: target module {module!r} is not supported "
                             f"(supported: {', '.join(TARGETS)})")
        if layer >= num_layers:
            raise ValueError(f"{label}: {key}: layer {layer}, but the model has {num_layers}")
        if module in _MLP_TARGETS and layer in moe_layers:
            raise ValueError(f"{label}: {key}: layer {layer}'s MLP is a mixture of experts; "
                             f"LoRA on experts is not supported (attention modules are)")
        parts.setdefault((layer, module), {})[which] = tensor
    if not parts:
        raise ValueError(f"{label}: {WEIGHTS_FILE} holds no LoRA weights")
    out = {}
    for (layer, module), ab in sorted(parts.items()):
        where = f"{label}: layers.{layer}.{module}"
        if set(ab) != {"A", "B"}:
            raise ValueError(f"{where}: lora_{'B' if 'A' in ab else 'A'} is missing")
        a, b = ab["A"], ab["B"]
        in_f, out_f = shapes[module]
        r = a.shape[0] if a.dim() == 2 else -1
        if a.dim() != 2 or a.shape[1] != in_f:
            raise ValueError(f"{where}: lora_A has shape {list(a.shape)}; the model needs "
                             f"[r, {in_f}]")
        if b.dim() != 2 or tuple(b.shape) != (out_f, r):
            raise ValueError(f"{where}: lora_B has shape {list(b.shape)}; the model needs "
                             f"[{out_f}, {r}]")
        if r > max_lora_rank:
            raise ValueError(f"{where}: rank {r} exceeds max_lora_rank={max_lora_rank}")
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise ValueError(f"{where}: weights hold NaN or Inf")
        out[(layer, module)] = (a, b)
    return cfg, out


def check_adapter(path: str, hf_config, max_lora_rank: int, name: str = "") -> None:
    """Validates an adapter against the base model (``ValueError`` otherwise)."""
    read_adapter_weights(path, hf_config, max_lora_rank, name)


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The parallel linear layers that LoRA targets, by their name in the model."""
    fused = {t for t, _ in TARGETS.values()}
    return {name: mod for name, mod in model.named_modules()
            if any(name.endswith("." + f) for f in fused) and ".layers." in f".{name}"}


class RankLoRA:
    """A rank's adapters: those loaded into CPU memory (this rank's shards, padded to
    ``max_rank`` and scaled) and which one each device slot holds."""

    def __init__(self, model: nn.Module, hf_config, *, max_loras: int, max_rank: int,
                 dtype: torch.dtype, device: torch.device, lanes: bool = False):
        self.hf_config = hf_config
        self.max_loras = max_loras
        self.max_rank = max_rank
        self.dtype = dtype
        self.device = device
        self.layers = lora_layers(model)
        for layer in self.layers.values():
            layer.lora = LoRAStack(max_loras=max_loras, max_rank=max_rank,
                                   input_size=layer.weight.shape[1],
                                   slice_sizes=layer.lora_slices(), dtype=dtype, device=device,
                                   lanes=lanes)
        self.cpu: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
        self.slot_of: dict[int, int] = {}  # adapter id -> device slot

    def load(self, lora_id: int, path: str) -> None:
        """Reads this rank's shards of an adapter into CPU memory."""
        cfg, weights = read_adapter_weights(path, self.hf_config, self.max_rank)
        shards: dict[str, list] = {}
        for (layer_idx, module), (a, b) in weights.items():
            fused, index = TARGETS[module]
            name = f"model.layers.{layer_idx}.{fused}"
            layer = self.layers[name]
            if name not in shards:
                stack = layer.lora
                shards[name] = [torch.zeros(stack.lora_a.shape[1:], dtype=self.dtype),
                                torch.zeros(stack.lora_b.shape[1:], dtype=self.dtype)]
            self._place(layer, index, a.float(), b.float() * cfg.scaling, *shards[name])
        pinned = self.device.type == "cuda"
        self.cpu[lora_id] = {n: (a.pin_memory() if pinned else a, b.pin_memory() if pinned else b)
                             for n, (a, b) in shards.items()}

    def _place(self, layer, index: int, a: torch.Tensor, b: torch.Tensor,
               a_out: torch.Tensor, b_out: torch.Tensor) -> None:
        """Writes one projection's A [r, in] and scaled B [out, r] into the padded shards."""
        stack, r = layer.lora, a.shape[0]
        tp_rank = layer.tp_rank
        if isinstance(layer, RowParallelLinear):  # A split on the input, B whole
            width = a_out.shape[1]
            a_out[:r] = a[:, tp_rank * width:(tp_rank + 1) * width]
            b_out[:r] = b.t()
            return
        size = stack.slice_sizes[index]  # B split on the output, as the weight is
        lo, hi = stack.slice_offsets[index], stack.slice_offsets[index + 1]
        a_out[index * self.max_rank:index * self.max_rank + r] = a
        start = tp_rank * size
        if index > 0 and hasattr(layer, "kv_head_start"):  # k/v: possibly replicated heads
            start = layer.kv_head_start * layer.head_dim
        b_out[:r, lo:hi] = b[start:start + size].t()

    def unload(self, lora_id: int) -> bool:
        self.slot_of.pop(lora_id, None)
        return self.cpu.pop(lora_id, None) is not None

    def fill_slot(self, slot: int, lora_id: int) -> None:
        if not 0 <= slot < self.max_loras:
            raise ValueError(f"lora_slots: slot {slot} outside 0..{self.max_loras - 1}")
        shards = self.cpu.get(lora_id)
        if shards is None:
            raise ValueError(f"lora_slots: adapter {lora_id} is not loaded on this rank")
        for held, s in list(self.slot_of.items()):
            if s == slot:
                del self.slot_of[held]
        for name, layer in self.layers.items():
            a, b = shards.get(name, (None, None))
            layer.lora.fill(slot, a, b)
        self.slot_of[lora_id] = slot

    def slots(self, lora_ids: np.ndarray) -> np.ndarray:
        """Device slot of each request's adapter (-1: base); ``ValueError`` for an adapter
        in no slot."""
        out = np.full(len(lora_ids), -1, dtype=np.int32)
        for lora_id in np.unique(lora_ids).tolist():
            if lora_id == 0:
                continue
            slot = self.slot_of.get(lora_id)
            if slot is None:
                raise ValueError(f"new_requests: adapter {lora_id} is in no LoRA slot")
            out[lora_ids == lora_id] = slot
        return out

    def mapping(self, token_slots: np.ndarray) -> LoRAMapping | None:
        """The step's ``LoRAMapping``; None when no token uses an adapter."""
        from workers.lora_ops import lora_metadata

        if len(token_slots) == 0 or token_slots.max() < 0:
            return None
        dev = self.device
        first = int(token_slots[0])
        single = first if first >= 0 and (token_slots == first).all() else -1
        sorted_idx, seg_starts = lora_metadata(token_slots, self.max_loras)
        return LoRAMapping(*(torch.from_numpy(a).to(dev, non_blocking=True)
                             for a in (token_slots, sorted_idx, seg_starts)), single_slot=single)
