"""Overlapped steps (async scheduling, the default) against one step at a time, and with
overlapped rank steps on top (the ranks launch step n+1 before reading back n): the same
tokens, texts, finish and stop reasons and log-probs on every transport, at tp=1 and 2,
with stop strings, stop tokens and max_tokens ending requests mid-batch and a KV cache
small enough that the scheduler preempts."""

import pytest

from conftest import hf_greedy, mixed_prompts
from spmd import LLM, SamplingParams

pytestmark = pytest.mark.slow

PROMPTS = [f"Story {i}: once upon a time, in a land of {w}," for i, w in
           enumerate("rivers hills snow sand glass iron reeds salt".split() * 2)]


def _bytes_for_blocks(path, tp, num_blocks):
    from workers.model_loader import load_hf_config

    cfg = load_hf_config(path)
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    per_block = 2 * 16 * (cfg.num_key_value_heads // tp) * head_dim * 4 * cfg.num_hidden_layers
    return per_block * num_blocks


def _params(base):
    """Greedy, each request ended its own way: a stop string, a stop token, max_tokens, or
    its length with log-probs (stops taken from what the model says unconstrained)."""
    params = []
    for i, out in enumerate(base):
        comp = out.outputs[0]
        kind = i % 4
        if kind == 0:
            stop = comp.text[len(comp.text) // 2: len(comp.text) // 2 + 2]
            params.append(SamplingParams(temperature=0, max_tokens=24, ignore_eos=True,
                                         stop=[stop] if stop.strip() else None))
        elif kind == 1:
            params.append(SamplingParams(temperature=0, max_tokens=24, ignore_eos=True,
                                         stop_token_ids=[comp.token_ids[3 + i % 7]]))
        elif kind == 2:
            params.append(SamplingParams(temperature=0, max_tokens=1 + i, ignore_eos=True))
        else:
            params.append(SamplingParams(temperature=0, max_tokens=24, ignore_eos=True,
                                         logprobs=2))
    return params


def _summary(outs):
    rows = []
    for out in outs:
        comp = out.outputs[0]
        lps = [sorted(d.items()) for d in comp.logprobs] if comp.logprobs else None
        rows.append((comp.token_ids, comp.text, comp.finish_reason, comp.stop_reason,
                     lps and [[(t, round(lp.logprob, 4)) for t, lp in d] for d in lps]))
    return rows


@pytest.mark.parametrize("backend,tp", [("inproc", 1), ("dag", 1), ("dag", 2), ("ray", 2)])
def test_overlapped_steps_change_nothing_a_user_sees(ray_cluster, tiny_chat_model, backend, tp):
    runs, preemptions = {}, {}
    # (async_scheduling, overlap_rank_steps): one step at a time; the engine a step ahead;
    # and the ranks too (on the CPU the launch runs the step, but the protocol is the GPU's)
    modes = ((False, False), (True, False), (True, True))
    for mode in modes:
        llm = LLM(tiny_chat_model, tensor_parallel_size=tp, backend=backend, max_model_len=128,
                  async_scheduling=mode[0], overlap_rank_steps=mode[1], max_num_batched_tokens=64,
                  kv_cache_memory_bytes=_bytes_for_blocks(tiny_chat_model, tp, 12))
        try:
            core = llm.engine.core
            assert (core.async_scheduling, core.overlap_rank_steps) == mode
            if mode == modes[0]:
                base = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=24,
                                                            ignore_eos=True), use_tqdm=False)
                params = _params(base)
            before = core.stats_total["preemptions"]
            runs[mode] = _summary(llm.generate(PROMPTS, params, use_tqdm=False))
            preemptions[mode] = core.stats_total["preemptions"] - before
            assert core.scheduler.block_pool.num_free_blocks == 12
            assert llm.engine.call_all("num_live_requests") == [0] * tp
            assert not core._unread
        finally:
            llm.shutdown()
    assert runs[modes[1]] == runs[modes[0]]
    assert runs[modes[2]] == runs[modes[0]]
    reasons = {row[2] for row in runs[modes[0]]}
    assert reasons == {"stop", "length"}, reasons
    assert all(preemptions[m] > 0 for m in modes), preemptions


@pytest.mark.parametrize("overlap_rank_steps", [False, True])
def test_overlapped_greedy_equals_transformers_and_drains_on_park(ray_cluster, tiny_dir,
                                                                  overlap_rank_steps):
    path = tiny_dir("llama")
    prompts = mixed_prompts(12, 256, seed=31)
    llm = LLM(path, skip_tokenizer_init=True, max_model_len=256,
              overlap_rank_steps=overlap_rank_steps)
    try:
        core = llm.engine.core
        assert core.overlap_rank_steps is overlap_rank_steps
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                            SamplingParams(temperature=0, max_tokens=16, ignore_eos=True),
                            use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outs] == hf_greedy(path, prompts, 16)
        # generate() ends by parking the ranks: nothing is left in flight or on the ranks.
        assert not core._inflight and not core._unread
        assert llm.engine.call_all("num_live_requests") == [0]
        assert core.stats_total["generation_tokens"] == 12 * 16  # dropped tokens not counted
    finally:
        llm.shutdown()


def test_async_scheduling_option_is_checked():
    from spmd.config import EngineConfig, SchedulerConfig

    with pytest.raises(ValueError, match="async_scheduling"):
        EngineConfig(scheduler=SchedulerConfig(async_scheduling="yes"))
    with pytest.raises(ValueError, match="overlap_rank_steps: needs async_scheduling=True"):
        EngineConfig(scheduler=SchedulerConfig(async_scheduling=False, overlap_rank_steps=True))
    with pytest.raises(ValueError, match="overlap_rank_steps: only CPU and CUDA"):
        EngineConfig.from_kwargs(device="tpu", overlap_rank_steps=True)


def test_overlapped_rank_steps_sample_with_penalties_seeds_and_n_as_before(ray_cluster,
                                                                          tiny_chat_model):
    """Penalties read each sequence's whole output, which the ranks append on the host:
    with overlapped rank steps the tokens of the step before must have landed first."""
    params = [SamplingParams(temperature=0.8, seed=3, n=2, max_tokens=20, ignore_eos=True,
                             repetition_penalty=1.3, frequency_penalty=0.4, presence_penalty=0.4),
              SamplingParams(temperature=0, max_tokens=20, ignore_eos=True,
                             repetition_penalty=1.5),
              SamplingParams(temperature=1.0, top_p=0.9, seed=11, max_tokens=20, ignore_eos=True,
                             logprobs=1)] * 3
    runs = {}
    for overlap in (False, True):
        llm = LLM(tiny_chat_model, max_model_len=128, max_num_batched_tokens=64,
                  overlap_rank_steps=overlap)
        try:
            outs = llm.generate(PROMPTS[:9], params, use_tqdm=False)
            runs[overlap] = [[(c.token_ids, [sorted(d) for d in c.logprobs or []])
                              for c in o.outputs] for o in outs]
        finally:
            llm.shutdown()
    assert runs[True] == runs[False]


@pytest.mark.parametrize("backend,tp", [("inproc", 1), ("dag", 2)])
def test_real_eos_mid_batch_is_the_same_with_the_ranks_a_step_ahead(ray_cluster, tiny_dir,
                                                                    tmp_path, backend, tp):
    """The model's own EOS (from its config, no ignore_eos) ends some requests mid-batch
    while the others go on: with the ranks a step ahead, each is cut exactly where
    transformers' greedy text first reaches EOS, with the same finish reasons."""
    import collections
    import json
    import shutil

    src = tiny_dir("llama")
    prompts = mixed_prompts(10, 256, seed=5)
    ref = hf_greedy(src, prompts, 20)
    # EOS := the token greedy decoding reaches mid-output in the most requests
    seen = collections.Counter(t for out in ref for t in set(out[2:16]))
    eos = seen.most_common(1)[0][0]
    path = str(tmp_path / "eos_model")
    shutil.copytree(src, path)
    cfg_path = f"{path}/config.json"
    cfg = json.load(open(cfg_path))
    cfg["eos_token_id"] = eos
    json.dump(cfg, open(cfg_path, "w"))
    want = []
    for out in ref:
        cut = out.index(eos) + 1 if eos in out else len(out)
        want.append((out[:cut], "stop" if eos in out else "length"))
    assert 0 < sum(r == "stop" for _, r in want) < len(want), want
    assert any(len(t) < 20 for t, r in want if r == "stop")
    for overlap in (False, True):
        llm = LLM(path, skip_tokenizer_init=True, max_model_len=128, backend=backend,
                  tensor_parallel_size=tp, overlap_rank_steps=overlap)
        try:
            outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                                SamplingParams(temperature=0, max_tokens=20), use_tqdm=False)
            got = [(o.outputs[0].token_ids, o.outputs[0].finish_reason) for o in outs]
            assert got == want, overlap
            assert llm.engine.call_all("num_live_requests") == [0] * tp
        finally:
            llm.shutdown()
