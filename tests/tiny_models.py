"""Tiny random HF checkpoints (fp32, safetensors) for the tests.

``build_tiny(tmp_path, "llama" | "mistral" | "qwen2" | "qwen3" | "qwen3_moe" | "mixtral",
**config_overrides)`` saves one with transformers and returns its directory. Head counts
are divisible by 2 so every variant runs at tp=2.
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
    # Qwen3: head_dim 32 != hidden / heads (16), as in the real 0.6B (128 vs 64).
    "qwen3": ("qwen3", {"head_dim": 32}),
    "qwen3_tied": ("qwen3", {"head_dim": 32, "tie_word_embeddings": True,
                             "num_attention_heads": 8, "num_key_value_heads": 8}),
    # 8 experts, top 2 (renormalised); layer 1 dense, as mlp_only_layers allows.
    "qwen3_moe": ("qwen3_moe", {"head_dim": 32, "num_experts": 8, "num_experts_per_tok": 2,
                                "moe_intermediate_size": 32, "norm_topk_prob": True,
                                "mlp_only_layers": [1]}),
    # Qwen3-30B-A3B's routing: top 8 of many, not renormalised.
    "qwen3_moe_top8": ("qwen3_moe", {"head_dim": 16, "num_experts": 16,
                                     "num_experts_per_tok": 8, "moe_intermediate_size": 16,
                                     "norm_topk_prob": False}),
    "mixtral": ("mixtral", {"num_local_experts": 4, "num_experts_per_tok": 2,
                            "intermediate_size": 64}),
}


def _classes(arch: str):
    from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
                              MixtralConfig, MixtralForCausalLM, Qwen2Config, Qwen2ForCausalLM,
                              Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM)

    return {"llama": (LlamaConfig, LlamaForCausalLM),
            "mistral": (MistralConfig, MistralForCausalLM),
            "qwen2": (Qwen2Config, Qwen2ForCausalLM),
            "qwen3": (Qwen3Config, Qwen3ForCausalLM),
            "qwen3_moe": (Qwen3MoeConfig, Qwen3MoeForCausalLM),
            "mixtral": (MixtralConfig, MixtralForCausalLM)}[arch]


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


ENCODER_TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, vocab_size=256, max_position_embeddings=130,
                    hidden_act="gelu", layer_norm_eps=1e-12)


def write_word_vocab(path: str, vocab_size: int) -> list[str]:
    """A WordPiece vocabulary of ``vocab_size`` entries (BERT's special tokens first, then
    made-up words), saved as ``vocab.txt`` with a ``BertTokenizerFast``; returns the words."""
    from transformers import BertTokenizerFast

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words = [f"w{i}" for i in range(vocab_size - len(special))]
    vocab_file = f"{path}/vocab.txt"
    with open(vocab_file, "w") as f:
        f.write("\n".join(special + words) + "\n")
    BertTokenizerFast(vocab_file=vocab_file, do_lower_case=True).save_pretrained(path)
    return words


def write_sentence_transformers(path: str, hidden_size: int, pooling: str = "mean",
                                normalize: bool = True, max_seq_length: int | None = None) -> None:
    """The files that make ``path`` a sentence-transformers folder (Transformer, Pooling,
    optional Normalize)."""
    import json
    import os

    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize",
                        "type": "sentence_transformers.models.Normalize"})
    with open(os.path.join(path, "modules.json"), "w") as f:
        json.dump(modules, f)
    os.makedirs(os.path.join(path, "1_Pooling"), exist_ok=True)
    with open(os.path.join(path, "1_Pooling", "config.json"), "w") as f:
        json.dump({"word_embedding_dimension": hidden_size,
                   "pooling_mode_cls_token": pooling == "cls",
                   "pooling_mode_mean_tokens": pooling == "mean",
                   "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False,
                   "pooling_mode_lasttoken": pooling == "last"}, f)
    if max_seq_length is not None:
        with open(os.path.join(path, "sentence_bert_config.json"), "w") as f:
            json.dump({"max_seq_length": max_seq_length, "do_lower_case": False}, f)


def build_tiny_encoder(tmp_path, arch: str = "bert", seed: int = 0, *, st_pooling: str | None = "mean",
                       normalize: bool = True, **overrides) -> str:
    """A random ``bert`` or ``xlm-roberta`` encoder with a WordPiece tokenizer, saved as a
    sentence-transformers folder (unless ``st_pooling`` is None); returns its directory."""
    from transformers import BertConfig, BertModel, XLMRobertaConfig, XLMRobertaModel

    config_cls, model_cls = {"bert": (BertConfig, BertModel),
                             "xlm-roberta": (XLMRobertaConfig, XLMRobertaModel)}[arch]
    kwargs = dict(ENCODER_TINY)
    if arch == "xlm-roberta":  # positions count from pad_token_id + 1
        kwargs.update(pad_token_id=1, bos_token_id=0, eos_token_id=2, type_vocab_size=1,
                      max_position_embeddings=ENCODER_TINY["max_position_embeddings"] + 2)
    config = config_cls(**{**kwargs, **overrides})
    torch.manual_seed(seed)
    model = model_cls(config, add_pooling_layer=False).float().eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "LayerNorm" in name:
                param.add_(torch.randn_like(param) * 0.1)
            elif name.endswith(".bias"):
                param.normal_(0.0, 0.02)
    path = tempfile.mkdtemp(prefix=f"{arch}-", dir=str(tmp_path))
    model.save_pretrained(path, safe_serialization=True)
    write_word_vocab(path, config.vocab_size)
    if st_pooling is not None:
        write_sentence_transformers(path, config.hidden_size, st_pooling, normalize)
    return path
