"""LoRA on the CUDA rank (skipped without CUDA; run on the lent H200 by
``bench/lora_gpu.sh``): transformers + PEFT parity per adapter, fp32, with decode in
CUDA graphs and eagerly; a mixed batch equals each request alone; one captured graph
serves every mix of adapters (and base-only batches replay the graphs without LoRA)."""

import random

import pytest
import torch

from lora_adapters import build_adapter, peft_greedy
from spmd import LLM, LoRARequest, SamplingParams

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


@needs_cuda
@pytest.mark.parametrize("enforce_eager", [False, True])
def test_lora_on_cuda_equals_transformers_peft(tiny_dir, tmp_path, enforce_eager):
    base = tiny_dir("llama")
    paths = [build_adapter(tmp_path, base, seed=s) for s in (1, 2, 3)]
    paths.append(build_adapter(tmp_path, base, seed=4, r=4, target_modules=["q_proj", "o_proj",
                                                                             "down_proj"]))
    loras = [LoRARequest(f"a{i}", i + 1, p) for i, p in enumerate(paths)]
    rng = random.Random(0)
    prompts = [[rng.randrange(1, 250) for _ in range(rng.randrange(3, 40))] for _ in range(12)]
    want = [peft_greedy(base, p, prompts[0], 12) for p in [None, *paths]]
    with LLM(base, device="cuda", dtype="float32", backend="inproc", skip_tokenizer_init=True,
             max_model_len=256, gpu_memory_utilization=0.3, enforce_eager=enforce_eager,
             enable_lora=True, max_loras=4, max_lora_rank=8) as llm:
        outs = llm.generate([prompts[0]] * 5, GREEDY, lora_request=[None, *loras], use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outs] == want
        for _ in range(3):
            mix = [rng.choice([None, *loras]) for _ in prompts]
            together = llm.generate(prompts, GREEDY, lora_request=mix, use_tqdm=False)
            alone = [llm.generate([p], GREEDY, lora_request=m, use_tqdm=False)[0]
                     for p, m in zip(prompts, mix)]
            assert ([o.outputs[0].token_ids for o in together]
                    == [o.outputs[0].token_ids for o in alone])
        rank = llm.engine.transport.worker  # inproc: the rank is in this process
        if enforce_eager:
            assert not rank.graphs and not rank.lora_graphs
        else:
            assert rank.lora_graphs and set(rank.lora_graphs) == set(rank.graphs)
