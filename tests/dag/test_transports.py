"""Failures surface as errors naming the rank, within a bounded time; exits are clean."""

import os
import subprocess
import sys
import textwrap
import time

import pytest

from dag import RankFailure
from spmd import LLM, SamplingParams

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))


@pytest.mark.parametrize("backend", ["dag", "ray"])
def test_rank_exception_names_the_rank_and_engine_goes_on(ray_cluster, tiny_dir, backend):
    llm = LLM(tiny_dir("llama"), tensor_parallel_size=2, skip_tokenizer_init=True,
              max_model_len=256, backend=backend)
    try:
        with pytest.raises(RankFailure) as err:
            llm.engine.call_all("raise_error", "injected failure")
        assert "rank 0:" in str(err.value) and "injected failure" in str(err.value)
        assert not err.value.fatal
        # No collective was involved: the same graph keeps serving.
        out = llm.generate([{"prompt_token_ids": [1, 2, 3]}], SamplingParams(max_tokens=3),
                           use_tqdm=False)
        assert len(out[0].outputs[0].token_ids) == 3
    finally:
        llm.shutdown()


@pytest.mark.parametrize("backend", ["dag", "ray"])
def test_hung_rank_times_out_naming_it(ray_cluster, tiny_dir, backend):
    llm = LLM(tiny_dir("llama"), tensor_parallel_size=2, skip_tokenizer_init=True,
              max_model_len=256, backend=backend, step_timeout_s=3)
    try:
        t0 = time.monotonic()
        with pytest.raises(RankFailure) as err:
            llm.engine.call_all("sleep", 30)
        assert time.monotonic() - t0 < 15
        assert err.value.fatal and "timed out after 3 s" in str(err.value)
        assert err.value.ranks  # the stuck ranks are named
    finally:
        llm.shutdown()


def test_dead_rank_surfaces_as_fatal_error(ray_cluster, tiny_dir):
    import ray

    llm = LLM(tiny_dir("llama"), tensor_parallel_size=2, skip_tokenizer_init=True,
              max_model_len=256, step_timeout_s=10)
    try:
        ray.kill(llm.engine.transport.group.actors[1])
        time.sleep(1)
        t0 = time.monotonic()
        with pytest.raises(RankFailure) as err:
            llm.generate([{"prompt_token_ids": [1, 2, 3]}], SamplingParams(max_tokens=3), use_tqdm=False)
        assert time.monotonic() - t0 < 30
        assert err.value.fatal and 1 in err.value.ranks, str(err.value)
    finally:
        llm.shutdown()


def test_normal_exit_prints_no_traceback(tiny_dir):
    """A user script that generates and simply exits: no tracebacks, no errors."""
    script = textwrap.dedent(f"""
        from spmd import LLM, SamplingParams
        llm = LLM({tiny_dir('llama')!r}, tensor_parallel_size=2, skip_tokenizer_init=True,
                  max_model_len=256)
        out = llm.generate([{{"prompt_token_ids": [1, 2, 3]}}], SamplingParams(max_tokens=4))
        print("TOKENS", out[0].outputs[0].token_ids)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
    assert proc.returncode == 0, proc.stderr
    assert "TOKENS" in proc.stdout
    assert "Traceback" not in proc.stderr and "Error" not in proc.stderr, proc.stderr
