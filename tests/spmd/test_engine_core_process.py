"""The serving engine's core in its own process: health answered from heartbeats
while a long step runs, no starvation of a request that arrives mid-decode, slow
consumers get merged deltas without slowing the others, and a rank dying while idle
fails the health check within a bounded time (a killed core, through HTTP:
tests/reliability/test_serve_faults.py)."""

import asyncio
import os
import signal
import time

import pytest

from conftest import hf_greedy
from spmd import AsyncEngine, SamplingParams
from spmd.async_engine import EngineDeadError

pytestmark = pytest.mark.slow

GREEDY = dict(temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(ray_cluster, tiny_dir):
    eng = AsyncEngine(model=tiny_dir("llama"), skip_tokenizer_init=True, max_model_len=256,
                      max_num_seqs=64)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def slow_model(tiny_dir):
    """Big enough that a 4,000-token prefill is a step of seconds on two cores."""
    return tiny_dir("llama", hidden_size=512, intermediate_size=2048, num_hidden_layers=6,
                    num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=8192)


def test_core_is_another_process_and_streams_match_transformers(engine, tiny_dir):
    assert engine.core_pid != os.getpid()
    prompts = [[1, 2, 3, 4, 5], [9, 8, 7], [100, 101, 102, 103]]

    async def one(p):
        async for out in engine.generate({"prompt_token_ids": p},
                                         SamplingParams(max_tokens=10, **GREEDY)):
            pass
        return out.outputs[0].token_ids

    async def main():
        return await asyncio.gather(*(one(p) for p in prompts))

    assert asyncio.run(main()) == hf_greedy(tiny_dir("llama"), prompts, 10)


def test_request_arriving_mid_decode_gets_its_first_token_within_two_steps(engine):
    """32 streams decode; a new request's first token comes from the step that runs its
    prefill, at most two steps after the one in flight when it arrived (counted by the core:
    its step count when it took the request, and when it sampled the first token)."""
    params = SamplingParams(max_tokens=200, **GREEDY)

    async def stream(i):
        async for _ in engine.generate({"prompt_token_ids": [3, 4, 5, i]}, params):
            pass

    async def main():
        background = [asyncio.ensure_future(stream(i)) for i in range(32)]
        while (await engine.fresh_stats())["num_running"] < 32:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)  # well into the decode
        waits = []
        for k in range(3):
            steps_before = (await engine.fresh_stats())["num_steps"]
            gen = engine.generate({"prompt_token_ids": [7] * 32 + [k]},
                                  SamplingParams(max_tokens=1, **GREEDY), delta=True)
            first = await anext(gen)
            await gen.aclose()
            assert first.metrics["arrival_step"] >= steps_before  # it arrived mid-decode
            waits.append(first.metrics["step"] - first.metrics["arrival_step"])
        running = (await engine.fresh_stats())["num_running"]
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        return waits, running

    waits, running = asyncio.run(main())
    assert running >= 32  # the new requests really did arrive mid-decode
    assert all(1 <= w <= 3 for w in waits), waits


def test_slow_consumer_gets_merged_deltas_and_others_are_not_held_back(engine):
    params = SamplingParams(max_tokens=60, **GREEDY)

    async def consume(i, pause_s):
        outs = []
        async for out in engine.generate({"prompt_token_ids": [11, 12, i]}, params, delta=True):
            outs.append(out)
            if pause_s:
                await asyncio.sleep(pause_s)
        return outs, time.perf_counter()

    async def main():
        return await asyncio.gather(consume(0, 0.25), *(consume(i, 0) for i in range(8)))

    (slow, slow_done), *fast = asyncio.run(main())
    tokens = [t for out in slow for t in out.outputs[0].token_ids]
    assert len(tokens) == 60 and slow[-1].finished
    assert len(slow) < 20  # merged: a handful of deltas of many tokens, no per-token queue
    assert max(len(out.outputs[0].token_ids) for out in slow) > 3
    for outs, done in fast:
        assert sum(len(o.outputs[0].token_ids) for o in outs) == 60
        assert done < slow_done  # nobody waited for the slow reader
    # The same prompt read fast gives the same tokens as read slowly (the merge loses nothing).
    assert tokens == [t for out in fast[0][0] for t in out.outputs[0].token_ids]


def test_health_answers_at_once_while_a_long_step_runs(ray_cluster, slow_model):
    eng = AsyncEngine(model=slow_model, skip_tokenizer_init=True, max_num_batched_tokens=4096,
                      max_model_len=8192)
    try:
        async def main():
            gen = eng.generate({"prompt_token_ids": [5] * 4000},
                               SamplingParams(max_tokens=2, **GREEDY))
            task = asyncio.ensure_future(anext(gen))
            deadline = time.monotonic() + 60
            while eng.stats()["step_running_s"] < 0.5:  # from the heartbeat: a step is in flight
                assert time.monotonic() < deadline and not task.done()
                await asyncio.sleep(0.05)
            t0 = time.perf_counter()
            eng.check_health()
            health_s = time.perf_counter() - t0
            step_s = eng.stats()["step_running_s"]
            t0 = time.perf_counter()
            stats = await eng.fresh_stats()  # a call between steps waits for the step
            call_s = time.perf_counter() - t0
            await task
            await gen.aclose()
            return health_s, step_s, call_s, stats

        health_s, step_s, call_s, stats = asyncio.run(main())
        assert health_s < 1.0
        assert step_s >= 0.5 and call_s > 0.1  # the health check really overlapped a long step
        assert stats["num_steps"] >= 1
    finally:
        eng.shutdown()


def test_rank_dying_while_idle_fails_health_in_bounded_time(ray_cluster, tiny_dir):
    eng = AsyncEngine(model=tiny_dir("llama"), skip_tokenizer_init=True, max_model_len=256,
                      tensor_parallel_size=2)
    try:
        async def main():
            async for _ in eng.generate({"prompt_token_ids": [1, 2]},
                                        SamplingParams(max_tokens=2, **GREEDY)):
                pass
            return await eng.call_all("pid")

        pids = asyncio.run(main())
        eng.check_health()
        os.kill(pids[1], signal.SIGKILL)  # the engine is idle: no step will notice
        t0 = time.monotonic()
        while time.monotonic() - t0 < 20:
            try:
                eng.check_health()
            except EngineDeadError as e:
                assert "rank" in str(e) or "engine core" in str(e)
                break
            time.sleep(0.1)
        else:
            pytest.fail("a dead rank left the engine healthy for 20 s")
        assert time.monotonic() - t0 < 10
    finally:
        eng.shutdown()


def test_the_core_and_its_ranks_start_from_the_frontends_config_without_transformers(tiny_dir):
    """The frontend sends the model's config: the core reads nothing and its ranks
    (here in its own process, inproc) build from it; neither imports transformers, which
    took ~3.5 s of every core and rank start."""
    import subprocess
    import sys

    from spmd.config import EngineConfig
    from spmd.input_processor import ModelInfo
    from workers.model_loader import config_json

    path = tiny_dir("qwen3_moe")
    config = EngineConfig.from_kwargs(model=path, backend="inproc", max_model_len=128)
    data = config_json(ModelInfo(config).hf_config)
    code = ("import sys; from spmd.config import EngineConfig; "
            "from spmd.engine_core import EngineCore; from spmd.input_processor import ModelInfo; "
            f"c = EngineConfig.from_kwargs(model={path!r}, backend='inproc', max_model_len=128); "
            f"core = EngineCore(c, ModelInfo(c, {data!r})); "
            "print(core.max_model_len, core.num_kv_blocks > 0, 'transformers' in sys.modules); "
            "core.shutdown()")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=root, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["128", "True", "False"]
