"""GGUF Qwen3 and Qwen3-MoE checkpoints (written from the tiny safetensors ones by
``tests/gguf_writer.py``) against transformers on the safetensors originals.

transformers 5.25 reads GGUF ``qwen3`` and ``qwen3moe`` files but leaves Qwen3's
``head_dim`` and Qwen3-MoE's ``moe_intermediate_size`` at class defaults (128, 768);
``load_hf_config`` fills them from the file. It reads llama.cpp's Mixtral (a ``llama`` file
with expert tensors) as a dense Llama without its MLPs, so that file is refused.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig

from gguf_writer import write_gguf
from test_model import hf_last_logits, prefill_then_decode, prompts_and_decodes, run_schedule
from workers.model_loader import gguf_metadata, load_hf_config, load_model
from workers.models import (MixtralForCausalLM, Qwen3ForCausalLM, Qwen3MoeForCausalLM,
                            get_model_class)

# The qwen3_moe variant minus its dense layer: GGUF (llama.cpp) has no mlp_only_layers.
VARIANTS = {"qwen3": ({}, Qwen3ForCausalLM),
            "qwen3_moe": ({"mlp_only_layers": None}, Qwen3MoeForCausalLM)}
CONFIG_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings",
                 "tie_word_embeddings", "num_experts", "num_experts_per_tok",
                 "moe_intermediate_size", "norm_topk_prob", "mlp_only_layers")


@pytest.fixture(scope="module")
def checkpoints(tiny_dir, tmp_path_factory):
    """``{variant: (safetensors folder, gguf file)}``."""
    root = tmp_path_factory.mktemp("gguf")
    out = {}
    for variant, (overrides, _) in VARIANTS.items():
        folder = tiny_dir(variant, **overrides)
        out[variant] = folder, write_gguf(folder, str(root / f"{variant}.gguf"))
    return out


@pytest.mark.parametrize("variant", VARIANTS)
def test_gguf_config_matches_the_checkpoint(checkpoints, variant):
    folder, gguf_path = checkpoints[variant]
    want, got = load_hf_config(folder), load_hf_config(gguf_path)
    assert get_model_class(got) is VARIANTS[variant][1]
    for field in CONFIG_FIELDS:
        assert getattr(got, field, None) == getattr(want, field, None), field
    assert got.rms_norm_eps == pytest.approx(want.rms_norm_eps)
    assert got.rope_parameters["rope_theta"] == want.rope_parameters["rope_theta"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_gguf_logits_match_transformers_on_safetensors(checkpoints, variant):
    from transformers import AutoModelForCausalLM

    folder, gguf_path = checkpoints[variant]
    model = load_model(gguf_path, "auto", torch.float32, 0, 1)
    hf_model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    prompts, decodes = prompts_and_decodes(hf_model.config.vocab_size)
    logits, contexts = run_schedule(model, prefill_then_decode(prompts, decodes), len(prompts))
    for step_logits, step_contexts in zip(logits, contexts, strict=True):
        torch.testing.assert_close(step_logits, hf_last_logits(hf_model, step_contexts),
                                   atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("tp_rank", [0, 1])
def test_gguf_tp2_shard_equals_safetensors_shard(checkpoints, variant, tp_rank):
    folder, gguf_path = checkpoints[variant]
    want = load_model(folder, "auto", torch.float32, tp_rank, 2).state_dict()
    got = load_model(gguf_path, "auto", torch.float32, tp_rank, 2).state_dict()
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name


def test_gguf_mixtral_is_refused_because_transformers_reads_it_dense(tiny_dir, tmp_path):
    gguf_path = write_gguf(tiny_dir("mixtral"), str(tmp_path / "mixtral.gguf"))
    dense = AutoConfig.from_pretrained(str(tmp_path), gguf_file="mixtral.gguf")
    assert dense.model_type == "llama" and getattr(dense, "num_local_experts", None) is None
    assert MixtralForCausalLM is not get_model_class(dense)
    with pytest.raises(ValueError, match=r"architecture 'llama'\) has 4 experts per layer"):
        load_hf_config(gguf_path)
    with pytest.raises(ValueError, match="safetensors checkpoint instead"):
        load_model(gguf_path, "auto", torch.float32, 0, 1)


@pytest.mark.parametrize("variant", VARIANTS)
def test_gguf_metadata_reads_what_gguf_reader_reads(checkpoints, variant):
    """Our header-only reader returns every scalar and string field as the gguf package's
    GGUFReader does (which maps the tensors too: seconds for a real file)."""
    from gguf import GGUFReader
    from gguf.constants import GGUFValueType

    _, path = checkpoints[variant]
    fields = GGUFReader(path).fields
    want = {k: f.contents() for k, f in fields.items()
            if f.types and f.types[0] != GGUFValueType.ARRAY and not k.startswith("GGUF.")}
    got = gguf_metadata(path)
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert got[key] == pytest.approx(value) if isinstance(value, float) else got[key] == value


@pytest.mark.parametrize("variant", ["llama", "tied", "qwen2", "qwen3"])
def test_native_gguf_reader_gives_transformers_tensors(tiny_dir, tmp_path, variant):
    """Dense Llama/Qwen2/Qwen3 files are read without transformers' GGUF loader (seconds
    faster on a real file): the same names and bit-identical tensors, Llama's q/k rows
    put back in HF order, in float32 and bfloat16."""
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    from workers.model_loader import _iter_gguf_native, iter_gguf_weights

    folder = tiny_dir(variant)
    path = write_gguf(folder, str(tmp_path / f"{variant}.gguf"))
    config = load_hf_config(path)
    with torch.device("meta"):
        names_only = AutoModelForCausalLM.from_config(config)
    for dtype in (torch.float32, torch.bfloat16):
        want = load_gguf_checkpoint(path, return_tensors=True, model_to_load=names_only,
                                    torch_dtype=dtype)["tensors"]
        got = dict(_iter_gguf_native(path, config, dtype))
        assert got.keys() == want.keys()
        for name, tensor in got.items():
            assert tensor.dtype == dtype and torch.equal(tensor, torch.as_tensor(want[name])), name
    # and the loader takes this path for them
    assert dict(iter_gguf_weights(path, config, torch.float32)).keys() == want.keys()
    from safetensors.torch import load_file
    original = load_file(f"{folder}/model.safetensors")
    q = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(got[q].float(), original[q].bfloat16().float())


def test_gguf_config_and_tokenizer_are_converted_once(checkpoints, tmp_path, monkeypatch):
    """What transformers converts out of a GGUF (seconds per process for a real file) is
    kept under $SPMD_CACHE_DIR, keyed by the file: read back equal, converted again when
    the file changes or the entry is damaged, and not kept with SPMD_CACHE_DIR=off."""
    import os

    from workers import gguf_cache
    from workers.structured import load_tokenizer

    monkeypatch.setenv("SPMD_CACHE_DIR", str(tmp_path / "cache"))
    _, path = checkpoints["qwen3"]
    fresh_config, fresh_tok = load_hf_config(path), load_tokenizer(path)
    entry = gguf_cache.entry_dir(path, "config")
    assert os.path.isfile(os.path.join(entry, "config.json"))
    assert os.path.isdir(gguf_cache.entry_dir(path, "tokenizer"))
    cached_config, cached_tok = load_hf_config(path), load_tokenizer(path)
    assert cached_config.to_dict() == fresh_config.to_dict()
    text = "<t5><t17><t3>"
    assert cached_tok(text).input_ids == fresh_tok(text).input_ids
    assert cached_tok.get_vocab() == fresh_tok.get_vocab()

    with open(os.path.join(entry, "config.json"), "w") as f:
        f.write("{not json")
    assert load_hf_config(path).to_dict() == fresh_config.to_dict()  # converted again
    assert load_hf_config(path).to_dict() == fresh_config.to_dict()  # and stored again

    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert gguf_cache.entry_dir(path, "config") != entry

    monkeypatch.setenv("SPMD_CACHE_DIR", "off")
    assert gguf_cache.entry_dir(path, "config") is None
    assert load_hf_config(path).to_dict() == fresh_config.to_dict()
