"""A rank error attributable to one step fails that step's requests, and only those:
every rank forgets the step's sequences, their KV blocks come back, and the next
requests match transformers. Only a dead or hung rank stops the engine."""

import numpy as np
import pytest

from conftest import hf_greedy, mixed_prompts
from spmd import LLM, RequestFailedError, SamplingParams
from dag.errors import RankFailure

pytestmark = pytest.mark.slow

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


def _ids(prompts):
    return [{"prompt_token_ids": p} for p in prompts]


@pytest.mark.parametrize("backend,tp,overlap", [("inproc", 1, False), ("dag", 2, False),
                                                ("dag", 2, True)])
def test_a_failed_step_fails_its_requests_and_the_engine_goes_on(ray_cluster, tiny_dir, backend,
                                                                 tp, overlap):
    path = tiny_dir("llama")
    prompts = mixed_prompts(6, 256, seed=11)
    ref = hf_greedy(path, prompts, 8)
    llm = LLM(path, tensor_parallel_size=tp, backend=backend, skip_tokenizer_init=True,
              max_model_len=256, overlap_rank_steps=overlap)
    engine = llm.engine
    try:
        # Two requests already decoding, then two more join; the step that runs all four fails.
        engine.add_request("a", _ids(prompts[:1])[0], SamplingParams(temperature=0, max_tokens=50,
                                                                     ignore_eos=True, n=2))
        engine.step()
        engine.step()
        engine.call_all("fail_next_step", "injected fault")
        engine.add_request("b", _ids(prompts[1:2])[0], GREEDY)
        with pytest.raises(RequestFailedError) as err:
            # With async scheduling the call returned the step in flight to the engine;
            # the next step() hands its output over, the one after runs the failing step.
            for _ in range(3):
                engine.step()
        assert sorted(err.value.request_ids) == ["a", "b"]
        assert "injected fault" not in str(err.value)  # the rank's text stays in the log
        engine.step()  # announces what is left to free
        assert not engine.has_unfinished_requests()
        assert engine.call_all("num_live_requests") == [0] * tp
        assert engine.scheduler.block_pool.num_free_blocks == engine.num_kv_blocks
        assert engine.stats_total["failed_steps"] == 1
        # The engine serves on, exactly.
        outs = llm.generate(_ids(prompts), GREEDY, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outs] == ref
        assert engine.call_all("num_live_requests") == [0] * tp
    finally:
        llm.shutdown()


def test_a_failed_step_inside_generate_raises_and_the_next_generate_works(ray_cluster, tiny_dir):
    path = tiny_dir("llama")
    prompts = mixed_prompts(4, 256, seed=12)
    llm = LLM(path, skip_tokenizer_init=True, max_model_len=256)
    try:
        llm.engine.call_all("fail_next_step", "injected fault")
        with pytest.raises(RequestFailedError):
            llm.generate(_ids(prompts), GREEDY, use_tqdm=False)
        outs = llm.generate(_ids(prompts), GREEDY, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outs] == hf_greedy(path, prompts, 8)
        assert llm.engine.scheduler.block_pool.num_free_blocks == llm.engine.num_kv_blocks
    finally:
        llm.shutdown()


def test_a_hung_rank_stops_the_engine_through_the_step_timeout(ray_cluster, tiny_dir):
    llm = LLM(tiny_dir("llama"), skip_tokenizer_init=True, max_model_len=256, step_timeout_s=2)
    try:
        llm.engine.call_all("hang_next_step", 30)
        with pytest.raises(RankFailure, match="timed out") as err:
            llm.generate(_ids(mixed_prompts(2, 256)), GREEDY, use_tqdm=False)
        assert err.value.fatal
    finally:
        llm.shutdown()


def test_an_overlapped_step_that_fails_still_answers_for_the_step_before_it(ray_cluster,
                                                                           tiny_dir):
    """Overlapped rank steps, driven on the rank directly: each call answers with the step
    before it, so a step that fails must still hand that step's output back and raise on
    the next call (where the engine asks for the failed step), not take it down."""
    from serialization import (ExecuteModelRequest, NewRequest, SamplingOptions, decode_output,
                               encode, pack_i32)
    from workers.worker import RankError

    path = tiny_dir("llama")
    prompt = mixed_prompts(1, 256, seed=13, hi=12)[0]  # one KV block holds it and 2 more
    llm = LLM(path, backend="inproc", skip_tokenizer_init=True, max_model_len=64,
              overlap_rank_steps=True)
    worker = llm.engine.core.transport.worker

    def call(step_id, tokens, **delta):
        msg = ExecuteModelRequest(step_id=step_id, scheduled_seq_ids=pack_i32([7] if tokens else []),
                                  num_scheduled_tokens=pack_i32([tokens] if tokens else []), **delta)
        return decode_output(worker.execute_model(encode(msg)))

    try:
        new = NewRequest(7, pack_i32(prompt), SamplingOptions(temperature=0), pack_i32([0]), 0)
        assert call(1, len(prompt), new_requests=[new]).step_id == -1  # nothing before it
        first = call(2, 1)
        assert first.step_id == 1
        worker.fail_next_step("injected fault")  # the rank's own method: no read-back first
        second = call(3, 1)  # fails, and answers with step 2
        assert second.step_id == 2
        got = [*map(int, np.frombuffer(first.token_ids, "<i4")),
               *map(int, np.frombuffer(second.token_ids, "<i4"))]
        assert got == hf_greedy(path, [prompt], 2)[0]
        with pytest.raises(RankError, match="injected fault"):
            call(-1, 0)  # the flush that asks for step 3
        assert call(-1, 0).step_id == -1  # then nothing is pending
        assert worker.forget([7], []) == 1
    finally:
        llm.shutdown()
