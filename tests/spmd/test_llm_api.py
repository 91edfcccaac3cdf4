"""The offline API as vLLM users know it: text in/out, stops, logprobs, n, errors."""

import math

import pytest

from conftest import hf_greedy
from spmd import LLM, SamplingParams

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def llm(ray_cluster, tiny_chat_model):
    llm = LLM(tiny_chat_model, tensor_parallel_size=2, max_model_len=512)
    yield llm
    llm.shutdown()


def test_text_prompts_detokenize_like_the_tokenizer(llm):
    tok = llm.get_tokenizer()
    outs = llm.generate(["Hello there", "The capital of France is", "1 2 3"],
                        SamplingParams(temperature=0, max_tokens=20, ignore_eos=True), use_tqdm=False)
    for out in outs:
        comp = out.outputs[0]
        assert len(comp.token_ids) == 20 and comp.finish_reason == "length"
        assert comp.text == tok.decode(comp.token_ids, skip_special_tokens=True)
        assert out.prompt_token_ids == tok.encode(out.prompt)


def test_stop_strings_and_stop_token_ids(llm):
    base = llm.generate(["Once upon"], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0]
    # A stop string taken from the middle of the greedy text ends generation right before it.
    stop = base.text[len(base.text) // 2 : len(base.text) // 2 + 3]
    assert stop.strip(), base.text
    cut = llm.generate(["Once upon"], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True,
                                                     stop=[stop]), use_tqdm=False)[0].outputs[0]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    assert cut.text == base.text[: base.text.find(stop)]
    kept = llm.generate(["Once upon"], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True,
                                                      stop=[stop], include_stop_str_in_output=True),
                        use_tqdm=False)[0].outputs[0]
    assert kept.text == base.text[: base.text.find(stop) + len(stop)]
    tok_stop = base.token_ids[5]
    by_id = llm.generate(["Once upon"], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True,
                                                       stop_token_ids=[tok_stop]), use_tqdm=False)[0].outputs[0]
    first = base.token_ids.index(tok_stop)
    assert by_id.token_ids == base.token_ids[: first + 1]
    assert by_id.finish_reason == "stop" and by_id.stop_reason == tok_stop


def test_logprobs_and_n(llm):
    out = llm.generate(["Hi"], SamplingParams(temperature=0, max_tokens=5, logprobs=3, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    assert len(out.logprobs) == 5
    for tok, entry in zip(out.token_ids, out.logprobs):
        assert tok in entry and entry[tok].rank == 1  # greedy picks the top token
        assert len(entry) == 3
        values = sorted((lp.rank, lp.logprob) for lp in entry.values())
        assert all(a[1] >= b[1] for a, b in zip(values, values[1:]))
    assert math.isclose(out.cumulative_logprob, sum(e[t].logprob for t, e in zip(out.token_ids, out.logprobs)),
                        rel_tol=1e-5)
    many = llm.generate(["Hi"], SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=8, ignore_eos=True),
                        use_tqdm=False)[0]
    assert [c.index for c in many.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in many.outputs}) > 1


def test_eos_stops_unless_ignored(llm):
    eng = llm.engine
    eos = llm.get_tokenizer().eos_token_id
    eng.add_request("eos-on", "a", SamplingParams(max_tokens=2))
    eng.add_request("eos-off", "a", SamplingParams(max_tokens=2, ignore_eos=True))
    try:
        assert eos in eng.scheduler.get_request("eos-on").stop_token_ids
        assert eos not in eng.scheduler.get_request("eos-off").stop_token_ids
    finally:
        eng.abort_request("eos-on")
        eng.abort_request("eos-off")
        eng.step()  # frees them on the ranks
    assert not eng.has_unfinished_requests()


CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You answer in one word."},
     {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
     {"role": "user", "content": "Name a colour"}],
]


def test_chat_equals_generate_on_the_template_ids_and_transformers(llm, tiny_chat_model):
    tok = llm.get_tokenizer()
    rendered = [tok.apply_chat_template(c, add_generation_prompt=True) for c in CONVERSATIONS]
    ids = [list(getattr(r, "input_ids", r)) for r in rendered]  # BatchEncoding or a list
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    chats = llm.chat(CONVERSATIONS, greedy, use_tqdm=False)
    plain = llm.generate([{"prompt_token_ids": i} for i in ids], greedy, use_tqdm=False)
    reference = hf_greedy(tiny_chat_model, ids, 12)
    for chat, prompt_ids, out, ref in zip(chats, ids, plain, reference):
        assert chat.prompt_token_ids == prompt_ids
        assert chat.prompt.endswith("<|im_start|>assistant\n")  # add_generation_prompt
        assert chat.outputs[0].token_ids == out.outputs[0].token_ids == ref
    one = llm.chat(CONVERSATIONS[0], greedy, use_tqdm=False)  # a single conversation
    assert len(one) == 1 and one[0].outputs[0].token_ids == chats[0].outputs[0].token_ids


def test_chat_errors_name_the_field(llm, monkeypatch):
    with pytest.raises(ValueError, match="messages: must hold"):
        llm.chat([])
    monkeypatch.setattr(llm.get_tokenizer(), "chat_template", None)
    with pytest.raises(ValueError, match="chat_template: the tokenizer of .* has none"):
        llm.chat(CONVERSATIONS[0])
    monkeypatch.setattr(llm.engine, "tokenizer", None)
    with pytest.raises(ValueError, match="messages: chat needs a tokenizer.*skip_tokenizer_init"):
        llm.chat(CONVERSATIONS[0])
    assert not llm.engine.has_unfinished_requests()


@pytest.mark.parametrize("kwargs, field", [
    (dict(max_tokens=0), "max_tokens"),
    (dict(temperature=-0.5), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(logprobs=-1), "logprobs"),
    (dict(top_k=2**63), "top_k"),
    (dict(seed=2**64), "seed"),
    (dict(temperature=float("inf")), "temperature"),
    (dict(min_p=float("nan")), "min_p"),
    (dict(stop_token_ids=[2**40]), "stop_token_ids"),
    (dict(stop=["\ud800"]), "stop"),
    (dict(n=True), "n"),
    (dict(ignore_eos="yes"), "ignore_eos"),
])
def test_bad_sampling_params(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("kwargs, message", [
    (dict(logprobs=1000), r"logprobs: 1000 exceeds the limit of 20 \(max_logprobs\)"),
    (dict(n=129), r"n: 129 exceeds the limit of 128 \(max_n\)"),
    (dict(stop=["x"] * 33), r"stop: 33 strings exceed the limit of 32"),
    (dict(stop=["x" * 600]), r"stop: a string of 600 characters exceeds the limit of 512"),
    (dict(stop_token_ids=list(range(300))), r"stop_token_ids: 300 ids exceed the limit of 256"),
])
def test_engine_limits_refuse_before_anything_is_queued(llm, kwargs, message):
    with pytest.raises(ValueError, match=message):
        llm.generate([[1, 2, 3]], SamplingParams(**kwargs), use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()


def test_limits_are_engine_options_and_n_is_capped_by_max_num_seqs(ray_cluster, tiny_dir):
    llm = LLM(tiny_dir("llama"), backend="inproc", skip_tokenizer_init=True, max_n=4,
              max_num_seqs=2, max_logprobs=2)
    try:
        with pytest.raises(ValueError, match=r"n: 3 exceeds the limit of 2 \(max_num_seqs\)"):
            llm.generate([[1, 2]], SamplingParams(n=3), use_tqdm=False)
        with pytest.raises(ValueError, match="max_logprobs"):
            llm.generate([[1, 2]], SamplingParams(logprobs=3), use_tqdm=False)
        out = llm.generate([[1, 2]], SamplingParams(n=2, max_tokens=2, logprobs=2), use_tqdm=False)
        assert len(out[0].outputs) == 2
    finally:
        llm.shutdown()


def test_prompt_too_long_names_both_numbers_and_engine_keeps_serving(llm):
    long_prompt = {"prompt_token_ids": [5] * 600}
    with pytest.raises(ValueError, match=r"600 tokens.*max_model_len=512"):
        llm.generate([long_prompt], SamplingParams(max_tokens=4), use_tqdm=False)
    with pytest.raises(ValueError, match="prompt_token_ids"):
        llm.generate([{"prompt_token_ids": [10**9]}], SamplingParams(max_tokens=4), use_tqdm=False)
    # Nothing was queued or leaked; the engine still serves.
    assert not llm.engine.has_unfinished_requests()
    out = llm.generate(["still here"], SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) >= 1
    pool = llm.engine.scheduler.block_pool
    assert pool.num_free_blocks == llm.engine.num_kv_blocks


def test_config_errors_before_any_actor(tmp_path, tiny_dir):
    path = tiny_dir("llama")  # 4 heads, 2 kv heads
    with pytest.raises(ValueError, match="tensor_parallel_size=3.*num_attention_heads=4"):
        LLM(path, tensor_parallel_size=3, skip_tokenizer_init=True)
    with pytest.raises(ValueError, match="does not exist"):
        LLM(str(tmp_path / "missing"), skip_tokenizer_init=True)
    with pytest.raises(ValueError, match="max_model_len"):
        LLM(path, max_model_len=10**6, skip_tokenizer_init=True)
    with pytest.raises(ValueError, match="unknown engine option"):
        LLM(path, tensor_paralel_size=2)
    import json
    import os
    bad = tmp_path / "gpt"
    bad.mkdir()
    cfg = json.load(open(os.path.join(path, "config.json")))
    cfg["architectures"] = ["GPTBigCodeForCausalLM"]
    cfg["model_type"] = "gpt_bigcode"
    json.dump(cfg, open(bad / "config.json", "w"))
    with pytest.raises(ValueError, match="GPTBigCodeForCausalLM"):
        LLM(str(bad), skip_tokenizer_init=True)
