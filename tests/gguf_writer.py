"""Writes a tiny HF checkpoint (safetensors + config.json) as a float32 GGUF file, with the
tensor names and metadata llama.cpp's ``convert_hf_to_gguf.py`` gives that architecture.

``write_gguf(hf_dir, path)`` handles ``qwen2``, ``qwen3``, ``qwen3_moe`` (GGUF ``qwen3moe``) and
``llama`` / ``mixtral`` (both GGUF ``llama``: llama.cpp stores Mixtral as a Llama file
with expert tensors, and permutes q/k rows for that architecture only). Experts, saved
one tensor per expert, are stacked into ``ffn_{gate,up,down}_exps`` ``[E, out, in]``.
"""

from __future__ import annotations

import json
import os
import re

import numpy as np
import torch

GGUF_ARCH = {"llama": "llama", "mixtral": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
             "qwen3_moe": "qwen3moe"}

_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight",
           "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
_LAYER = {"input_layernorm.weight": "attn_norm.weight",
          "self_attn.q_proj.weight": "attn_q.weight",
          "self_attn.k_proj.weight": "attn_k.weight",
          "self_attn.v_proj.weight": "attn_v.weight",
          "self_attn.o_proj.weight": "attn_output.weight",
          "self_attn.q_proj.bias": "attn_q.bias",
          "self_attn.k_proj.bias": "attn_k.bias",
          "self_attn.v_proj.bias": "attn_v.bias",
          "self_attn.q_norm.weight": "attn_q_norm.weight",
          "self_attn.k_norm.weight": "attn_k_norm.weight",
          "post_attention_layernorm.weight": "ffn_norm.weight",
          "mlp.gate_proj.weight": "ffn_gate.weight",
          "mlp.up_proj.weight": "ffn_up.weight",
          "mlp.down_proj.weight": "ffn_down.weight",
          "mlp.gate.weight": "ffn_gate_inp.weight",
          "block_sparse_moe.gate.weight": "ffn_gate_inp.weight"}
_LAYER_NAME = re.compile(r"^model\.layers\.(?P<layer>\d+)\.(?P<rest>.+)$")
_EXPERT = re.compile(r"^(?:mlp|block_sparse_moe)\.experts\.(?P<expert>\d+)\."
                     r"(?P<part>gate_proj|up_proj|down_proj|w1|w3|w2)\.weight$")
_EXPERT_GGUF = {"gate_proj": "ffn_gate_exps", "w1": "ffn_gate_exps", "up_proj": "ffn_up_exps",
                "w3": "ffn_up_exps", "down_proj": "ffn_down_exps", "w2": "ffn_down_exps"}


def write_gguf(hf_dir: str, path: str, name: str | None = None) -> str:
    """Converts the checkpoint in ``hf_dir`` to an F32 GGUF file at ``path``; returns ``path``.
    ``name`` is ``general.name`` (default: the folder's name)."""
    import gguf
    from safetensors.torch import load_file

    with open(os.path.join(hf_dir, "config.json")) as f:
        cfg = json.load(f)
    arch = GGUF_ARCH[cfg["model_type"]]
    assert not cfg.get("mlp_only_layers"), "GGUF has no dense layers in a mixture of experts"
    tensors = load_file(os.path.join(hf_dir, "model.safetensors"))
    writer = gguf.GGUFWriter(path, arch)
    writer.add_name(name or os.path.basename(os.path.normpath(hf_dir)))
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    _add_hparams(writer, cfg)
    _add_vocab(writer, cfg["vocab_size"])
    for gguf_name, array in _gguf_tensors(tensors, cfg, arch):
        writer.add_tensor(gguf_name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _add_hparams(writer, cfg: dict) -> None:
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    rope = cfg.get("rope_parameters") or {}
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(cfg.get("num_key_value_heads") or heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    experts = cfg.get("num_experts") or cfg.get("num_local_experts")
    if experts:
        writer.add_expert_count(experts)
        writer.add_expert_used_count(cfg["num_experts_per_tok"])
        writer.add_expert_feed_forward_length(cfg.get("moe_intermediate_size")
                                              or cfg["intermediate_size"])


def _add_vocab(writer, vocab_size: int) -> None:
    # No {arch}.vocab_size: like most llama.cpp files, the vocabulary size is the token count.
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([f"<t{i}>" for i in range(vocab_size)])
    writer.add_token_types([1] * vocab_size)
    writer.add_token_scores([0.0] * vocab_size)
    writer.add_token_merges([])


def _gguf_tensors(tensors: dict[str, torch.Tensor], cfg: dict, arch: str):
    """``(gguf_name, float32 array)`` pairs, experts stacked per layer and part."""
    experts: dict[str, dict[int, np.ndarray]] = {}
    for hf_name, tensor in sorted(tensors.items()):
        array = tensor.float().numpy()
        if hf_name in _GLOBAL:
            if hf_name == "lm_head.weight" and cfg.get("tie_word_embeddings"):
                continue
            yield _GLOBAL[hf_name], array
            continue
        match = _LAYER_NAME.match(hf_name)
        assert match, f"no GGUF name for {hf_name}"
        layer, rest = match["layer"], match["rest"]
        expert = _EXPERT.match(rest)
        if expert:
            experts.setdefault(f"blk.{layer}.{_EXPERT_GGUF[expert['part']]}.weight",
                               {})[int(expert["expert"])] = array
            continue
        assert rest in _LAYER, f"no GGUF name for {hf_name}"
        if arch == "llama" and rest in ("self_attn.q_proj.weight", "self_attn.k_proj.weight"):
            heads = cfg["num_attention_heads"] if "q_proj" in rest else cfg["num_key_value_heads"]
            array = _interleave_rotary_halves(array, heads)
        yield f"blk.{layer}.{_LAYER[rest]}", array
    for gguf_name, by_expert in experts.items():
        yield gguf_name, np.stack([by_expert[e] for e in sorted(by_expert)])


def _interleave_rotary_halves(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's rotary layout: within each head, rows (i, i + d/2) become neighbours."""
    half = weight.shape[0] // heads // 2
    return weight.reshape(heads, 2, half, -1).swapaxes(1, 2).reshape(weight.shape)
