"""AsyncEngine: per-request streams over the same step loop, abort frees blocks."""

import asyncio

import pytest

from conftest import hf_greedy, mixed_prompts
from spmd import AsyncEngine, SamplingParams

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def engine(ray_cluster, tiny_dir):
    eng = AsyncEngine(model=tiny_dir("llama"), tensor_parallel_size=2, skip_tokenizer_init=True,
                      max_model_len=256)
    yield eng
    eng.shutdown()


def test_concurrent_streams_match_transformers(engine, tiny_dir):
    prompts = mixed_prompts(8, 256, seed=31)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)

    async def one(i, p):
        seen = []
        async for out in engine.generate({"prompt_token_ids": p}, params, request_id=f"r{i}"):
            seen.append(len(out.outputs[0].token_ids))
        assert out.finished and seen == sorted(seen) and seen[-1] == 12
        return out.outputs[0].token_ids

    async def main():
        return await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))

    assert asyncio.run(main()) == hf_greedy(tiny_dir("llama"), prompts, 12)


def test_abandoned_streams_abort_and_free_blocks(engine):
    free_before = asyncio.run(engine.fresh_stats())["num_free_blocks"]
    params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)

    async def drop_after_two(i):
        n = 0
        async for _ in engine.generate({"prompt_token_ids": [1, 2, 3, i]}, params):
            n += 1
            if n == 2:
                break  # the consumer walks away: generate()'s finally aborts it

    async def main():
        await asyncio.gather(*(drop_after_two(i) for i in range(20)))
        for _ in range(100):
            stats = await engine.fresh_stats()
            if stats["num_running"] == stats["num_waiting"] == 0:
                return stats
            await asyncio.sleep(0.05)
        return stats

    stats = asyncio.run(main())
    assert stats["num_running"] == stats["num_waiting"] == 0
    assert engine.num_unfinished_requests() == 0
    assert stats["num_free_blocks"] == free_before


def test_bad_request_raises_and_engine_keeps_serving(engine):
    async def main():
        with pytest.raises(ValueError, match="max_model_len"):
            async for _ in engine.generate({"prompt_token_ids": [1] * 300}, SamplingParams()):
                pass
        outs = [o async for o in engine.generate({"prompt_token_ids": [4, 5]},
                                                 SamplingParams(max_tokens=3, ignore_eos=True))]
        return outs[-1]

    last = asyncio.run(main())
    assert last.finished and len(last.outputs[0].token_ids) == 3
