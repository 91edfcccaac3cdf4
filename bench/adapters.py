"""Random LoRA adapters in PEFT format for benchmarks: ``adapter_config.json`` and
``adapter_model.safetensors`` with A and B on every layer's seven projections, drawn
small enough that the model's logits stay finite. Only the shapes matter to speed."""

from __future__ import annotations

import json
import os

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def write_random_adapter(path: str, hf_config, rank: int, seed: int = 0,
                         dtype: str = "bfloat16", targets=ALL_TARGETS) -> str:
    import torch
    from safetensors.torch import save_file

    from workers.lora import module_shapes

    shapes = module_shapes(hf_config)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(hf_config.num_hidden_layers):
        for module in targets:
            in_f, out_f = shapes[module]
            group = "self_attn" if module in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            key = f"base_model.model.model.layers.{layer}.{group}.{module}"
            a = torch.randn(rank, in_f, generator=gen) / in_f ** 0.5
            b = torch.randn(out_f, rank, generator=gen) * 0.01
            tensors[f"{key}.lora_A.weight"] = a.to(getattr(torch, dtype))
            tensors[f"{key}.lora_B.weight"] = b.to(getattr(torch, dtype))
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"))
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump(dict(peft_type="LORA", r=rank, lora_alpha=2 * rank, target_modules=list(targets),
                       bias="none", lora_dropout=0.0), f)
    return path


def write_random_adapters(root: str, hf_config, rank: int, num: int, seed: int = 0,
                          dtype: str = "bfloat16") -> list[str]:
    return [write_random_adapter(os.path.join(root, f"adapter{i}"), hf_config, rank, seed + i, dtype)
            for i in range(num)]
