"""Static-shape mode end to end, on the CPU as Spyre and TPU projects test it: the same
code path with ``torch.compile`` on the inductor backend instead of the device's.
Greedy parity with transformers and the default engine, padding invariance,
admission errors, warm-up report, and zero compilations while serving."""

import importlib.util
import random

import pytest

from conftest import hf_greedy, mixed_prompts
from spmd import LLM, SamplingParams

SHAPES = [(16, 8, 4), (48, 12, 4)]
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


def _generate(llm, prompts, params=GREEDY):
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module")
def spyre_llm(ray_cluster, tiny_dir):
    llm = LLM(tiny_dir("llama"), device="spyre", warmup_shapes=SHAPES, compile_backend="inductor",
              skip_tokenizer_init=True, max_model_len=256)
    yield llm
    llm.shutdown()


@pytest.mark.slow
def test_spyre_greedy_equals_transformers_and_the_default_engine(spyre_llm, tiny_dir):
    path = tiny_dir("llama")
    prompts = mixed_prompts(10, 256, seed=1, lo=3, hi=48)
    got = _generate(spyre_llm, prompts)
    assert got == hf_greedy(path, prompts, 8)
    default = LLM(path, skip_tokenizer_init=True, max_model_len=256, backend="inproc")
    try:
        assert got == _generate(default, prompts)
    finally:
        default.shutdown()
    # Warm-up compiled every shape once (a prefill and a decode graph each), reported per shape.
    times = spyre_llm.engine.warmup_times_s
    assert list(times) == [f"prompt_len={p},max_new_tokens={m},batch_size={b}" for p, m, b in SHAPES]
    assert all(t > 0 for t in times.values())
    assert spyre_llm.engine.call_all("num_compiled_graphs") == [2 * len(SHAPES)]
    assert spyre_llm.engine.call_all("num_live_requests") == [0]


@pytest.mark.slow
def test_spyre_padding_never_changes_results(spyre_llm):
    prompt = mixed_prompts(1, 256, seed=3, lo=9, hi=10)[0]
    alone = _generate(spyre_llm, [prompt])[0]  # shape (16, 8, 4): 7 pads, 3 padding rows
    # With a 40-token neighbour the batch runs in (48, 12, 4): 39 pads, other live rows.
    others = mixed_prompts(3, 256, seed=4, lo=20, hi=41)
    others[0] = others[0] + [5] * (40 - len(others[0]))
    batched = _generate(spyre_llm, [others[0], prompt, *others[1:]])
    assert batched[1] == alone
    # And rows that finish early leave the others' results alone.
    short = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    mixed = spyre_llm.generate([{"prompt_token_ids": p} for p in (others[0], prompt)],
                               [short, GREEDY], use_tqdm=False)
    assert mixed[1].outputs[0].token_ids == alone


@pytest.mark.slow
def test_spyre_rejects_a_request_that_fits_no_shape(spyre_llm):
    with pytest.raises(ValueError, match=r"fits no warm-up shape.*\(16, 8, 4\), \(48, 12, 4\)"):
        _generate(spyre_llm, [[1] * 49])
    with pytest.raises(ValueError, match="max_tokens=13"):
        _generate(spyre_llm, [[1] * 5], SamplingParams(temperature=0, max_tokens=13))
    assert not spyre_llm.engine.has_unfinished_requests()
    assert len(_generate(spyre_llm, [[1] * 5])[0]) == 8  # still serving


def _random_requests(n: int, max_prompt: int, max_tokens: int, seed: int):
    rng = random.Random(seed)
    prompts = [[rng.randrange(256) for _ in range(rng.randint(1, max_prompt))] for _ in range(n)]
    params = [SamplingParams(temperature=0, max_tokens=rng.randint(1, max_tokens), ignore_eos=True)
              for _ in range(n)]
    return prompts, params


@pytest.mark.slow
def test_spyre_200_random_requests_compile_nothing(spyre_llm):
    before = spyre_llm.engine.call_all("num_compiled_graphs")
    prompts, params = _random_requests(200, 48, 3, seed=7)
    outs = spyre_llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [p.max_tokens for p in params]
    assert spyre_llm.engine.call_all("num_compiled_graphs") == before == [2 * len(SHAPES)]


@pytest.mark.slow
def test_spyre_tp2_greedy_equals_transformers(ray_cluster, tiny_dir):
    path = tiny_dir("llama")
    prompts = mixed_prompts(6, 256, seed=2, lo=3, hi=32)
    llm = LLM(path, device="spyre", warmup_shapes=[(32, 8, 4)], compile_backend="inductor",
              tensor_parallel_size=2, skip_tokenizer_init=True, max_model_len=256)
    try:
        assert _generate(llm, prompts) == hf_greedy(path, prompts, 8)
        assert llm.engine.call_all("num_compiled_graphs") == [2, 2]
        assert llm.engine.call_all("num_live_requests") == [0, 0]
    finally:
        llm.shutdown()


@pytest.mark.slow
def test_tpu_emulated_buckets_keep_parity_and_compile_nothing_while_serving(ray_cluster, tiny_dir):
    path = tiny_dir("llama")
    llm = LLM(path, device="tpu-emulated", compile_backend="inductor", max_num_batched_tokens=64,
              max_num_seqs=8, skip_tokenizer_init=True, max_model_len=256)
    try:
        # Token buckets 16, 32, 64 × request bucket 8, each compiled at start-up.
        assert list(llm.engine.warmup_times_s) == [f"num_tokens={t},num_seqs=8" for t in (16, 32, 64)]
        prompts = mixed_prompts(12, 256, seed=5)
        params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
        assert _generate(llm, prompts, params) == hf_greedy(path, prompts, 12)
        prompts, params = _random_requests(200, 60, 3, seed=8)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        assert [len(o.outputs[0].token_ids) for o in outs] == [p.max_tokens for p in params]
        assert llm.engine.call_all("num_compiled_graphs") == [3]
    finally:
        llm.shutdown()


def test_tpu_emulated_compiles_every_bucket_in_the_graphs_thread(ray_cluster, tiny_dir):
    """More buckets than TorchDynamo's default limit of 8, compiled in the compiled graph's
    loop thread: each is a graph of its own (past the limit Dynamo would run it eagerly)."""
    llm = LLM(tiny_dir("llama"), device="tpu-emulated", compile_backend="eager",
              max_num_batched_tokens=512, max_num_seqs=32, skip_tokenizer_init=True,
              max_model_len=256)
    try:
        num_buckets = llm.engine.call_all("num_warmup_steps")[0]
        assert num_buckets == 6 * 3 > 8
        assert llm.engine.call_all("num_compiled_graphs") == [num_buckets]
        prompts, params = _random_requests(40, 200, 3, seed=2)
        llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        assert llm.engine.call_all("num_compiled_graphs") == [num_buckets]
    finally:
        llm.shutdown()


@pytest.mark.skipif(importlib.util.find_spec("torch_xla") is not None, reason="torch_xla is installed")
def test_tpu_without_torch_xla_is_a_clear_error(tiny_dir):
    with pytest.raises(RuntimeError, match="device='tpu' needs torch_xla.*tpu-emulated"):
        LLM(tiny_dir("llama"), device="tpu", skip_tokenizer_init=True, backend="inproc")


@pytest.mark.skipif(importlib.util.find_spec("torch_sendnn") is not None,
                    reason="torch_sendnn is installed")
def test_spyre_device_backend_without_its_package_is_a_clear_error(tiny_dir):
    with pytest.raises(RuntimeError, match="compile_backend='sendnn' needs the torch_sendnn package"):
        LLM(tiny_dir("llama"), device="spyre", warmup_shapes=SHAPES, compile_backend="sendnn",
            skip_tokenizer_init=True, max_model_len=256, backend="inproc")


def test_a_shape_longer_than_the_model_fails_before_any_rank_starts(tiny_dir):
    # max_model_len left out: the limit is the model's max_position_embeddings (256).
    with pytest.raises(ValueError, match=r"warmup_shapes: \(200, 100, \.\.\.\) needs 300 .*=256"):
        LLM(tiny_dir("llama"), device="spyre", warmup_shapes="200,100,1", skip_tokenizer_init=True,
            backend="inproc")
