"""Tiny random HF checkpoints (fp32, safetensors) for the tests.

``build_tiny(tmp_path, "llama" | "mistral" | "qwen2", **config_overrides)`` saves
one with transformers and returns its directory. Head counts are divisible by 2
so every variant runs at tp=2.
"""

from __future__ import annotations

import tempfile

import torch

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256, max_position_embeddings=256, rms_norm_eps=1e-6)

# Named variants used across the test suite.
VARIANTS = {
    "llama": ("llama", {}),
    "mistral": ("mistral", {"sliding_window": 128}),
    "qwen2": ("qwen2", {}),
    "tied": ("llama", {"tie_word_embeddings": True}),
    "llama3_rope": ("llama", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0,
                                               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                               "original_max_position_embeddings": 32},
                              "rope_theta": 500000.0}),
    "llama_bias": ("llama", {"attention_bias": True, "mlp_bias": True}),
    "odd_vocab": ("llama", {"vocab_size": 251, "tie_word_embeddings": True}),
}


def _classes(arch: str):
    from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
                              Qwen2Config, Qwen2ForCausalLM)

    return {"llama": (LlamaConfig, LlamaForCausalLM),
            "mistral": (MistralConfig, MistralForCausalLM),
            "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[arch]


def tiny_config(arch: str, **overrides):
    config_cls, _ = _classes(arch)
    kwargs = {**TINY, "tie_word_embeddings": False, **overrides}
    return config_cls(**kwargs)


def build_tiny(tmp_path, arch: str = "llama", seed: int = 0, **overrides) -> str:
    """Saves a random ``arch`` checkpoint under ``tmp_path`` and returns its directory."""
    _, model_cls = _classes(arch)
    config = tiny_config(arch, **overrides)
    torch.manual_seed(seed)
    model = model_cls(config).float().eval()
    # HF inits norms to 1 and biases to 0; randomise them so that loading them is tested.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.add_(torch.randn_like(param) * 0.1)
            elif name.endswith(".bias"):
                param.normal_(0.0, 0.02)
    path = tempfile.mkdtemp(prefix=f"{arch}-", dir=str(tmp_path))
    model.save_pretrained(path, safe_serialization=True)
    return path


def build_variant(tmp_path, variant: str) -> str:
    arch, overrides = VARIANTS[variant]
    return build_tiny(tmp_path, arch, **overrides)
