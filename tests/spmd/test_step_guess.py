"""The engine's guess of a step's length (it sleeps through most of a step instead of
spinning on the graph channel beside the rank's threads), and the scratch prefill that
gives the first guess before any step has run."""

import numpy as np
import pytest
import torch

from conftest import mixed_prompts
from spmd import LLM
from spmd.engine_core import EngineCore


def _core_with(steps: list[tuple[float, int]]) -> EngineCore:
    core = EngineCore.__new__(EngineCore)  # only the guess's state
    core._rank_step_times, core._first_step_timed = {}, True
    for seconds, tokens in steps:
        core._record_rank_step(seconds, tokens)
    return core


def test_guess_is_the_longest_recent_step_that_bounds_it():
    # A 2,048-token prefill (1 s) then decode steps of 64 tokens (0.2 s).
    core = _core_with([(1.0, 2048), (0.2, 64)])
    # A step at least as long as a recent one with fewer tokens ...
    assert core._expected_step_s(2048) == pytest.approx(0.97 * 1.0)
    assert core._expected_step_s(64) == pytest.approx(0.97 * 0.2)
    # ... and a recent longer step scaled down by the token count, whichever is longer.
    assert core._expected_step_s(1024) == pytest.approx(0.97 * 0.5)
    assert core._expected_step_s(100) == pytest.approx(0.97 * 0.2)
    assert core._expected_step_s(1) == pytest.approx(0.97 * 0.2 / 64)  # never scaled up
    # The latest step of a power-of-two token-count class (64..127) replaces the earlier one.
    core._record_rank_step(0.1, 100)
    assert core._expected_step_s(100) == pytest.approx(0.97 * 0.1)


def test_the_first_step_is_no_guess():
    # It pays one-time costs (kernel loading, first allocations): 1.1 s against 0.2 s.
    core = _core_with([])
    core._first_step_timed = False
    core._record_rank_step(1.1, 8192)
    assert core._expected_step_s(8192) == 0.0
    core._record_rank_step(0.2, 8192)
    assert core._expected_step_s(8192) == pytest.approx(0.97 * 0.2)


def test_no_guess_for_short_or_unknown_steps():
    assert _core_with([])._expected_step_s(512) == 0.0
    # Under 2 ms the sleep's own wake-up costs more than the spin it saves.
    assert _core_with([(1e-3, 512)])._expected_step_s(512) == 0.0
    # Steps the rank did not time (0.0) or that ran no tokens are not recorded.
    assert _core_with([(0.0, 512), (0.5, 0)])._rank_step_times == {}


@pytest.mark.slow
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
        assert worker.prefill_seconds(300) > 0  # over max_model_len: several prompts
        # The engine started with a guess for its longest step (from that timed prefill).
        longest = llm.engine.core.config.max_num_batched_tokens
        assert llm.engine.core._rank_step_times[longest.bit_length()][1] == longest
    finally:
        llm.shutdown()
