"""Model shapes for ``--load-format dummy`` benchmarks: a Hugging Face config and
nothing else. ``materialize(name)`` writes it as ``config.json`` into a fresh
temporary directory, which the engine (and transformers) then load like a model
directory whose weights are drawn at random."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile

_LLAMA = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu",
              attention_bias=False, mlp_bias=False, bos_token_id=1, eos_token_id=2)

_QWEN3 = dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", hidden_act="silu",
              attention_bias=False, head_dim=128, vocab_size=151936,
              max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000.0,
              bos_token_id=151643, eos_token_id=151645)

PRESETS: dict[str, dict] = {
    # Fast enough for smoke tests at tp=1 or 2.
    "tiny": dict(_LLAMA, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=1024,
                 max_position_embeddings=2048, rms_norm_eps=1e-6, rope_theta=10000.0,
                 tie_word_embeddings=False),
    # SmolLM2-135M: 9 heads, so tp=1 (or 3) only.
    "smollm2-135m": dict(_LLAMA, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                         max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2),
    "llama2-7b": dict(_LLAMA, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                      max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0,
                      tie_word_embeddings=False),
    # Llama-2-70B: 80 layers, grouped-query attention 64 / 8 (tp up to 8 without replication).
    "llama2-70b": dict(_LLAMA, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                       num_attention_heads=64, num_key_value_heads=8, vocab_size=32000,
                       max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0,
                       tie_word_embeddings=False),
    "llama3-8b": dict(_LLAMA, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                      max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0,
                      tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001),
    "qwen2-0.5b": dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_act="silu",
                       hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                       num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                       max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1000000.0,
                       tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151643),
    # Qwen3 (per-head q/k norm, head_dim 128 > hidden / heads for the 0.6B) and its MoE.
    "qwen3-0.6b": dict(_QWEN3, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, tie_word_embeddings=True),
    "qwen3-8b": dict(_QWEN3, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False),
    "qwen3-30b-a3b": dict(_QWEN3, architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe",
                          hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                          num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4,
                          num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
                          decoder_sparse_step=1, mlp_only_layers=[], tie_word_embeddings=False),
    "mixtral-8x7b": dict(architectures=["MixtralForCausalLM"], model_type="mixtral",
                         hidden_act="silu", hidden_size=4096, intermediate_size=14336,
                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                         num_local_experts=8, num_experts_per_tok=2, vocab_size=32000,
                         max_position_embeddings=32768, rms_norm_eps=1e-5, rope_theta=1000000.0,
                         sliding_window=None, tie_word_embeddings=False, bos_token_id=1,
                         eos_token_id=2),
}


def is_preset(name: str) -> bool:
    return name in PRESETS


def materialize(name: str, **overrides) -> str:
    """A temporary model directory holding only the preset's ``config.json``, with
    ``overrides`` applied (removed when this process exits; ranks read it while
    the engine starts)."""
    if name not in PRESETS:
        raise ValueError(f"model: unknown preset {name!r}; presets: {sorted(PRESETS)}")
    folder = tempfile.mkdtemp(prefix=f"preset-{name}-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({**PRESETS[name], **overrides}, f, indent=1)
    return folder
