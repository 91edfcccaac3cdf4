"""The CUDA rank. The parts that need no GPU run everywhere; the rest skip without CUDA
(they ran on the lent H100/H200 machines through ``bench/gpu.sh``, see bench/RESULTS.md)."""

import pytest
import torch

from conftest import hf_greedy, mixed_prompts
from spmd import LLM, SamplingParams
from spmd.config import EngineConfig
from workers.gpu_worker import graph_batch_sizes

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_graph_ladder_covers_every_batch_up_to_the_limit():
    sizes = graph_batch_sizes(100)
    assert sizes[:5] == [1, 2, 4, 8, 16] and sizes[-1] == 100
    assert all(b - a <= 16 for a, b in zip(sizes, sizes[1:]))
    assert graph_batch_sizes(0) == [] and graph_batch_sizes(3) == [1, 2, 3]


def test_cuda_config_options_are_validated():
    assert EngineConfig.from_kwargs(device="cuda").dtype == "bfloat16"
    with pytest.raises(ValueError, match="device: must be one of auto, cpu, cuda"):
        EngineConfig.from_kwargs(device="gpu0")
    with pytest.raises(ValueError, match="cuda_graph_max_batch_size: must be >= 0"):
        EngineConfig.from_kwargs(cuda_graph_max_batch_size=-1)


@needs_cuda
@pytest.mark.parametrize("enforce_eager", [False, True])
def test_greedy_equals_transformers_on_cuda(tiny_dir, enforce_eager):
    path = tiny_dir("qwen2")
    prompts = mixed_prompts(16, 256, seed=4)
    llm = LLM(path, device="cuda", dtype="float32", backend="inproc", skip_tokenizer_init=True,
              max_model_len=256, gpu_memory_utilization=0.3, enforce_eager=enforce_eager)
    try:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                            SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
                            use_tqdm=False)
        assert llm.engine.call_all("nonfinite_steps") == [0]
    finally:
        llm.shutdown()
    assert [o.outputs[0].token_ids for o in outs] == hf_greedy(path, prompts, 24)
