"""A scratch prefill (``Worker._scratch_prefill``: ``score_prompt`` and the GPU warm-up's
kernel loading run it) of several prompts as one batch equals each prompt alone."""

import numpy as np
import pytest
import torch

from conftest import mixed_prompts
from spmd import LLM

pytestmark = pytest.mark.slow


def test_scratch_prefill_of_a_batch_equals_each_prompt_alone(ray_cluster, tiny_dir):
    llm = LLM(tiny_dir("llama"), backend="inproc", skip_tokenizer_init=True, max_model_len=128)
    try:
        worker = llm.engine.core.transport.worker
        prompts = [np.asarray(p) for p in mixed_prompts(4, 256, seed=3, lo=10, hi=90)]
        with torch.inference_mode():
            together = worker._scratch_prefill(prompts)
            alone = torch.cat([worker._scratch_prefill([p]) for p in prompts])
        assert together.shape == (sum(map(len, prompts)), alone.shape[1])
        torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)
    finally:
        llm.shutdown()
