"""The real Serve app on the test session's Ray cluster, called with the real
``openai`` client (and httpx for raw bodies): results, streaming, concurrency,
errors, metrics, and aborts of dropped streams. The server runs with overlapped rank
steps (the default on a GPU, off on the CPU), the offline references without them."""

import asyncio
import json
import re
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import free_port
from serve_app import deploy
from spmd import LLM, SamplingParams

pytestmark = pytest.mark.slow

API_KEY = "test-key"
MODEL = "tiny-chat"
MAX_MODEL_LEN = 512
MAX_BODY_BYTES = 64 * 1024
PROMPTS = ["Hello there", "The capital of France is", "1 2 3 4"]
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def base_url(ray_cluster, tiny_chat_model):
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(deploy({"model": tiny_chat_model, "max_model_len": str(MAX_MODEL_LEN),
                      "api_key": API_KEY, "served_model_name": MODEL,
                      "max_body_bytes": str(MAX_BODY_BYTES), "overlap_rank_steps": "true"}),
              name="spmd", route_prefix="/", blocking=False)
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


@pytest.fixture(scope="module")
def offline(tiny_chat_model):
    llm = LLM(tiny_chat_model, backend="inproc", max_model_len=MAX_MODEL_LEN)
    yield llm
    llm.shutdown()


def _greedy(llm, prompts, max_tokens, **kw):
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, **kw)
    return [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]


def _chat_ids(llm, messages):
    tok = llm.get_tokenizer()
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return {"prompt_token_ids": tok.encode(text, add_special_tokens=False)}


def _metrics(http) -> dict:
    """``{(name, labels as sorted tuple): value}`` from ``GET /metrics``."""
    text = http.get("/metrics").text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


# ---- results ------------------------------------------------------------------------

def test_models_and_health(client, http):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert http.get("/health").status_code == 200


def test_completions_equal_offline_generate(client, offline):
    expected = _greedy(offline, PROMPTS, 12)
    resp = client.completions.create(model=MODEL, prompt=PROMPTS, max_tokens=12, temperature=0,
                                     extra_body={"ignore_eos": True})
    assert resp.id.startswith("cmpl-") and resp.object == "text_completion"
    assert [c.index for c in resp.choices] == [0, 1, 2]
    assert [c.text for c in resp.choices] == [e.text for e in expected]
    assert all(c.finish_reason == "length" for c in resp.choices)
    tok = offline.get_tokenizer()
    prompt_tokens = sum(len(tok.encode(p)) for p in PROMPTS)
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens, resp.usage.total_tokens) == \
        (prompt_tokens, 36, prompt_tokens + 36)


def test_token_id_prompts_and_echo(client, offline):
    ids = offline.get_tokenizer().encode("Once upon a time")
    expected = _greedy(offline, [{"prompt_token_ids": ids}], 8)[0]
    resp = client.completions.create(model=MODEL, prompt=[ids, ids], max_tokens=8, temperature=0,
                                     extra_body={"ignore_eos": True})
    assert [c.text for c in resp.choices] == [expected.text] * 2
    echoed = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=8,
                                       temperature=0, echo=True, extra_body={"ignore_eos": True})
    assert echoed.choices[0].text == "Once upon a time" + expected.text


def test_streamed_completion_equals_whole_one(client, offline):
    expected = _greedy(offline, PROMPTS[:1], 16)[0]
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=16,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 16


def test_stop_string_is_never_streamed(client, offline):
    base = _greedy(offline, ["Once upon"], 30)[0].text
    stop = base[len(base) // 2: len(base) // 2 + 3]
    assert stop.strip(), base
    kw = dict(model=MODEL, prompt="Once upon", max_tokens=30, temperature=0, stop=[stop],
              extra_body={"ignore_eos": True})
    whole = client.completions.create(**kw).choices[0]
    assert (whole.text, whole.finish_reason) == (base[: base.find(stop)], "stop")
    streamed = "".join(c.choices[0].text for c in client.completions.create(stream=True, **kw))
    assert streamed == whole.text


def test_chat_equals_offline_generate(client, offline):
    expected = _greedy(offline, [_chat_ids(offline, CHAT)], 12)[0]
    resp = client.chat.completions.create(model=MODEL, messages=CHAT, max_completion_tokens=12,
                                          temperature=0, extra_body={"ignore_eos": True})
    assert resp.id.startswith("chatcmpl-") and resp.object == "chat.completion"
    msg = resp.choices[0].message
    assert (msg.role, msg.content, resp.choices[0].finish_reason) == ("assistant", expected.text,
                                                                       "length")
    prompt_tokens = len(_chat_ids(offline, CHAT)["prompt_token_ids"])
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (prompt_tokens, 12)


def test_chat_stream(client, offline):
    expected = _greedy(offline, [_chat_ids(offline, CHAT)], 12)[0]
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 12 and chunks[-1].usage.total_tokens > 12


def test_raw_stream_is_sse_ending_with_done(http):
    with http.stream("POST", "/v1/completions", json={"model": MODEL, "prompt": "Hi",
                                                      "max_tokens": 3, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        body = r.read().decode()
    events = body.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    assert all(e.startswith("data: {") for e in events[:-2])


def test_sampling_n_seed_and_penalties(client):
    kw = dict(model=MODEL, prompt="Tell me", max_tokens=8, temperature=1.0, top_p=0.9, n=3,
              seed=7, presence_penalty=0.5, frequency_penalty=0.5,
              extra_body={"top_k": 50, "min_p": 0.01, "repetition_penalty": 1.1})
    first, again = client.completions.create(**kw), client.completions.create(**kw)
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    assert 3 <= first.usage.completion_tokens <= 3 * 8  # EOS may end a choice early
    chat = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4, n=2, seed=3,
                                          temperature=0.8)
    assert [c.index for c in chat.choices] == [0, 1]


def test_logprobs(client):
    resp = client.completions.create(model=MODEL, prompt="Hello", max_tokens=6, temperature=0,
                                     logprobs=3, extra_body={"ignore_eos": True})
    lp = resp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    assert "".join(lp.tokens) == resp.choices[0].text
    assert lp.text_offset == [sum(map(len, lp.tokens[:k])) for k in range(6)]
    for logprob, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert 1 <= len(top) <= 3 and logprob == pytest.approx(max(top.values()))  # greedy: rank 1

    chat = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=5, temperature=0,
                                          logprobs=True, top_logprobs=2,
                                          extra_body={"ignore_eos": True})
    content = chat.choices[0].logprobs.content
    assert len(content) == 5 and "".join(t.token for t in content) == chat.choices[0].message.content
    for t in content:
        assert len(t.top_logprobs) == 2 and t.logprob == pytest.approx(t.top_logprobs[0].logprob)
        assert bytes(t.bytes).decode() == t.token

    streamed = list(client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=5,
                                                   temperature=0, logprobs=True, stream=True,
                                                   extra_body={"ignore_eos": True}))
    tokens = [t.token for c in streamed if c.choices and c.choices[0].logprobs
              for t in c.choices[0].logprobs.content]
    assert tokens == [t.token for t in content]


def test_64_concurrent_requests_complete_with_correct_usage(base_url, offline):
    tok = offline.get_tokenizer()
    prompts = [f"Request number {i} says" for i in range(64)]

    async def main():
        async with openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key=API_KEY, max_retries=0,
                                      timeout=300) as aclient:
            return await asyncio.gather(*(aclient.completions.create(
                model=MODEL, prompt=p, max_tokens=4 + i % 8, temperature=0.7, seed=i,
                extra_body={"ignore_eos": True}) for i, p in enumerate(prompts)))

    results = asyncio.run(main())
    for i, (p, r) in enumerate(zip(prompts, results)):
        assert r.choices[0].finish_reason == "length"
        assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == \
            (len(tok.encode(p)), 4 + i % 8, len(tok.encode(p)) + 4 + i % 8)


# ---- errors -------------------------------------------------------------------------

def _error(resp: httpx.Response, status: int) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


@pytest.mark.parametrize("body, param", [
    ({"prompt": "x", "max_tokens": "5"}, "max_tokens"),  # wrong type: 400, not FastAPI's 422
    ({"prompt": "x", "stream": "yes"}, "stream"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"max_tokens": 5}, "prompt"),
    ({"prompt": "x", "temperature": -1}, "temperature"),
    ({"prompt": "x", "top_p": 1.5}, "top_p"),
    ({"prompt": "x", "n": 0}, "n"),
    ({"prompt": "x", "logprobs": 50}, "logprobs"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "presence_penalty": 3}, "presence_penalty"),
    ({"prompt": [1, 2, 10**9]}, "prompt_token_ids"),
    # Valid JSON integers too large for the ranks' int64 / int32 (once: the engine stopped).
    ({"prompt": "x", "top_k": 2**63}, "top_k"),
    ({"prompt": "x", "seed": 2**64 + 5}, "seed"),
    ({"prompt": "x", "stop_token_ids": [2**70]}, "stop_token_ids"),
    ({"prompt": "x", "min_tokens": 2**70}, "min_tokens"),
    ({"prompt": "x", "n": 10000, "max_tokens": 1}, "n"),  # limit: max_n=128
    ({"prompt": "x", "stop": ["s"] * 33}, "stop"),  # limit: max_stop_strings=32
    ({"prompt": "x", "stop": ["s" * 513]}, "stop"),
    ({"prompt": "x", "max_tokens": 5000}, "max_tokens"),  # beyond the context: refused
    ({"prompt": "x", "best_of": 2}, "best_of"),
    ({"prompt": "x", "logit_bias": {"5": 10}}, "logit_bias"),
    ({"prompt": "x", "suffix": "end"}, "suffix"),
])
def test_bad_completion_requests_are_400(http, body, param):
    err = _error(http.post("/v1/completions", json={"model": MODEL, **body}), 400)
    assert err["param"] == param and err["type"] == "invalid_request_error"


@pytest.mark.parametrize("body, param", [
    ({"messages": []}, "messages"),
    ({"messages": [{"content": "no role"}]}, "messages"),
    ({"messages": CHAT, "top_logprobs": 2}, "top_logprobs"),
    ({"messages": CHAT, "top_logprobs": 30, "logprobs": True}, "logprobs"),
    ({"messages": CHAT, "max_completion_tokens": -1}, "max_tokens"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages"),  # unknown role
    ({"messages": [{"role": "user", "content": None}]}, "messages"),
    ({"messages": CHAT, "tools": [{"type": "function", "function": {}}]}, "tools"),
    ({"messages": CHAT, "tool_choice": "required"}, "tool_choice"),
    ({"messages": CHAT, "response_format": {"type": "xml"}}, "response_format"),
    ({"messages": CHAT, "top_logprobs": 21, "logprobs": True}, "logprobs"),
])
def test_bad_chat_requests_are_400(http, body, param):
    assert _error(http.post("/v1/chat/completions", json={"model": MODEL, **body}), 400)["param"] \
        == param


def test_invalid_json_and_non_object_bodies_are_400(http):
    deep = b'{"prompt": "x", "user": ' + b"[" * 1000 + b"]" * 1000 + b"}"
    for content in (b"{not json", b"[1, 2]", b"", deep, b'{"prompt": "x", "temperature": NaN}',
                    b'{"prompt": "x", "top_p": Infinity}', b'{"prompt": "\xff"}'):
        _error(http.post("/v1/completions", content=content,
                         headers={"content-type": "application/json"}), 400)


def test_lone_surrogates_are_400(http):
    """JSON may escape a lone UTF-16 surrogate; the tokenizer raised TypeError (a 500) on it."""
    for path, body, param in (
            ("/v1/completions", b'{"prompt": "x\\ud800y"}', "prompt"),
            ("/v1/completions", b'{"prompt": "x", "stop": ["\\udc00"]}', "stop"),
            ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "a\\udc00"}]}',
             "messages")):
        err = _error(http.post(path, content=body, headers={"content-type": "application/json"}),
                     400)
        assert err["param"] == param, err


def test_max_tokens_beyond_the_context_names_both_numbers(http):
    err = _error(http.post("/v1/completions", json={"model": MODEL, "prompt": [7] * 100,
                                                    "max_tokens": 500}), 400)
    assert "500" in err["message"] and "100" in err["message"] and "512" in err["message"]


def test_chat_edges_users_hit(client, offline):
    """``content: null`` on an assistant turn and an assistant turn with ``tool_calls``
    are served as OpenAI serves them; ``developer`` is a system turn."""
    history = [{"role": "developer", "content": "Be brief."},
               {"role": "user", "content": "Hi"},
               {"role": "assistant", "content": None,
                "tool_calls": [{"id": "call_1", "type": "function",
                                "function": {"name": "f", "arguments": "{}"}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "42"},
               {"role": "user", "content": "And?"}]
    resp = client.chat.completions.create(model=MODEL, messages=history, max_tokens=4,
                                          temperature=0)
    assert resp.choices[0].finish_reason in ("length", "stop")
    assert resp.usage.completion_tokens >= 1


def test_every_route_but_health_needs_the_key(base_url, http):
    for path in ("/metrics", "/openapi.json", "/v1/models"):
        assert httpx.get(f"{base_url}{path}").status_code == 401, path
        assert http.get(path).status_code == 200, path
    assert httpx.get(f"{base_url}/health").status_code == 200
    schema = http.get("/openapi.json").json()
    assert "/v1/chat/completions" in schema["paths"]


@pytest.mark.parametrize("stream", [False, True])
def test_prompt_over_the_context_length_names_both_numbers(http, stream):
    err = _error(http.post("/v1/completions", json={"model": MODEL, "prompt": [7] * 600,
                                                    "stream": stream}), 400)
    assert "600" in err["message"] and str(MAX_MODEL_LEN) in err["message"]
    long_chat = [{"role": "user", "content": "word " * 700}]
    err = _error(http.post("/v1/chat/completions", json={"model": MODEL, "messages": long_chat,
                                                         "stream": stream}), 400)
    assert str(MAX_MODEL_LEN) in err["message"] and err["param"] == "prompt"


def test_unknown_model_is_404(client, http):
    err = _error(http.post("/v1/completions", json={"model": "gpt-5", "prompt": "x"}), 404)
    assert err["param"] == "model" and err["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-5", messages=CHAT)
    _error(http.get("/v1/no-such-route"), 404)


def test_embeddings_on_a_generation_model_is_400(client, http):
    err = _error(http.post("/v1/embeddings", json={"model": MODEL, "input": "hi"}), 400)
    assert err["param"] == "model" and "task=embed" in err["message"]
    with pytest.raises(openai.BadRequestError, match="task=embed"):
        client.embeddings.create(model=MODEL, input=["hi", "there"])


def test_missing_or_wrong_api_key_is_401(base_url):
    body = {"model": MODEL, "prompt": "x", "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        err = _error(httpx.post(f"{base_url}/v1/completions", json=body, headers=headers), 401)
        assert err["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{base_url}/v1", api_key="wrong", max_retries=0).models.list()
    assert httpx.get(f"{base_url}/health").status_code == 200  # health needs no key


def test_body_over_the_size_limit_is_413(http):
    err = _error(http.post("/v1/completions", json={"model": MODEL,
                                                    "prompt": "x" * (MAX_BODY_BYTES + 1)}), 413)
    assert str(MAX_BODY_BYTES) in err["message"]


def test_server_keeps_serving_after_errors(client):
    # Runs after the error tests (file order): the replica is still whole.
    resp = client.completions.create(model=MODEL, prompt="Still there?", max_tokens=3)
    assert resp.usage.completion_tokens >= 1


# ---- metrics and aborts -------------------------------------------------------------

def test_metrics_parse_and_move(client, http):
    before = _metrics(http)
    client.completions.create(model=MODEL, prompt="Count me", max_tokens=5, temperature=0,
                              extra_body={"ignore_eos": True})
    after = _metrics(http)
    ok = ("spmd_requests_total", (("endpoint", "/v1/completions"), ("status", "200")))
    assert after[ok] == before.get(ok, 0) + 1
    assert after[("spmd_generation_tokens_total", ())] == before[("spmd_generation_tokens_total", ())] + 5
    assert after[("spmd_prompt_tokens_total", ())] > before[("spmd_prompt_tokens_total", ())]
    for hist in ("spmd_time_to_first_token_seconds", "spmd_time_per_output_token_seconds",
                 "spmd_e2e_request_latency_seconds"):
        assert after[(hist + "_count", ())] == before[(hist + "_count", ())] + 1
    bad = ("spmd_requests_total", (("endpoint", "/v1/completions"), ("status", "400")))
    http.post("/v1/completions", json={"model": MODEL, "prompt": "x", "n": 0})
    assert _metrics(http)[bad] == after.get(bad, 0) + 1
    for gauge in ("spmd_num_requests_running", "spmd_num_requests_waiting",
                  "spmd_kv_cache_usage_perc", "spmd_kv_cache_free_blocks", "spmd_kv_cache_blocks"):
        assert (gauge, ()) in after


def _wait_idle(http, free_blocks: float, until=lambda m: True, timeout_s: float = 60) -> dict:
    """Metrics once no request runs or waits and ``free_blocks`` are free (and ``until``)."""
    deadline = time.monotonic() + timeout_s
    while True:
        m = _metrics(http)
        idle = (m[("spmd_num_requests_running", ())] == 0 and
                m[("spmd_num_requests_waiting", ())] == 0 and
                m[("spmd_kv_cache_free_blocks", ())] == free_blocks and until(m))
        if idle or time.monotonic() > deadline:
            return m
        time.sleep(0.2)


def test_dropped_streams_abort_and_free_their_blocks(base_url, http):
    before = _metrics(http)
    free = before[("spmd_kv_cache_free_blocks", ())]
    max_tokens = 400

    async def drop_after_two_chunks(c: httpx.AsyncClient, i: int) -> None:
        body = {"model": MODEL, "prompt": f"Stream {i} goes on and on", "max_tokens": max_tokens,
                "stream": True, "ignore_eos": True}
        async with c.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            seen = 0
            async for line in r.aiter_lines():
                seen += line.startswith("data: {")
                if seen == 2:
                    break  # leaving the block closes the connection mid-stream

    async def main():
        async with httpx.AsyncClient(base_url=base_url, timeout=120,
                                     headers={"Authorization": f"Bearer {API_KEY}"}) as c:
            await asyncio.gather(*(drop_after_two_chunks(c, i) for i in range(20)))

    asyncio.run(main())
    after = _wait_idle(http, free)
    assert after[("spmd_kv_cache_free_blocks", ())] == free
    assert after[("spmd_num_requests_running", ())] == 0
    generated = (after[("spmd_generation_tokens_total", ())]
                 - before[("spmd_generation_tokens_total", ())])
    assert generated < 20 * max_tokens / 2  # aborted, not run to the end


def test_dropped_non_streaming_request_aborts(base_url, http):
    before = _metrics(http)
    free = before[("spmd_kv_cache_free_blocks", ())]
    running = ("spmd_num_requests_running", ())

    async def main():
        async with httpx.AsyncClient(base_url=base_url, timeout=120,
                                     headers={"Authorization": f"Bearer {API_KEY}"}) as c:
            request = asyncio.ensure_future(c.post("/v1/completions", json={
                "model": MODEL, "prompt": "Wait for me", "max_tokens": 500, "ignore_eos": True}))
            deadline = time.monotonic() + 60
            while _metrics(http)[running] < 1 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            request.cancel()  # the client walks away while its request runs
            with pytest.raises(asyncio.CancelledError):
                await request

    asyncio.run(main())
    cancelled = ("spmd_requests_total", (("endpoint", "/v1/completions"), ("status", "499")))
    after = _wait_idle(http, free, until=lambda m: m.get(cancelled, 0) > before.get(cancelled, 0))
    assert after.get(cancelled, 0) == before.get(cancelled, 0) + 1
    assert after[("spmd_kv_cache_free_blocks", ())] == free
    generated = (after[("spmd_generation_tokens_total", ())]
                 - before[("spmd_generation_tokens_total", ())])
    assert generated < 500


def test_sse_error_body_shape_is_json(http):
    # A stream refused before it starts is a plain JSON error, not an event stream.
    r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": CHAT, "stream": True,
                                                "temperature": -1})
    assert r.headers["content-type"].startswith("application/json")
    assert json.loads(r.text)["error"]["param"] == "temperature"
    assert re.match(r"temperature: must be >= 0", r.json()["error"]["message"])
