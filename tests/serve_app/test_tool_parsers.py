"""Tool calling without a server: `tools` / `tool_choice` checks, parsing of finished and streamed
output in both formats (streamed in any chunking == parsed whole), and the structural tags,
compiled by xgrammar and run on strings."""

import json
import random
import re

import pytest
import xgrammar as xgr

from serve_app.tool_parsers import (PARSERS, ContentDelta, HermesToolParser, Llama3JsonToolParser,
                                    ToolCallDelta, get_tool_parser, validate_tool_choice,
                                    validate_tools)

WEATHER = {"type": "object", "required": ["city"],
           "properties": {"city": {"type": "string"},
                          "unit": {"type": "string", "enum": ["c", "f"]}}}
ADD = {"type": "object", "required": ["a", "b"],
       "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}
TOOLS = validate_tools([
    {"type": "function", "function": {"name": "get_weather", "description": "Weather now",
                                      "parameters": WEATHER}},
    {"type": "function", "function": {"name": "add", "parameters": ADD}},
    {"type": "function", "function": {"name": "ping"}},
])
WEATHER_CALL = ("get_weather", {"city": "Paris", "unit": "c"})
ADD_CALL = ("add", {"a": 1, "b": 2})
PING_CALL = ("ping", {})


def hermes_call(name, args, ws="\n", key="arguments"):
    return f"<tool_call>{ws}{json.dumps({'name': name, key: args})}{ws}</tool_call>"


def llama_call(name, args, key="parameters"):
    return json.dumps({"name": name, key: args})


def calls_of(calls):
    return [(c.name, json.loads(c.arguments)) for c in calls]


# ---------- validate_tools / validate_tool_choice ----------

def test_validate_tools_normalizes():
    assert validate_tools(None) == []
    ping = TOOLS[2]["function"]
    assert ping == {"name": "ping", "parameters": {"type": "object", "properties": {}}}
    assert TOOLS[0]["function"]["description"] == "Weather now"


@pytest.mark.parametrize("tools, message", [
    ("x", "tools: must be a list"),
    ([3], "tools[0]: must be an object"),
    ([{"function": {"name": "f"}}], "tools[0].type: missing"),
    ([{"type": "x", "function": {"name": "f"}}], "tools[0].type: must be 'function', got 'x'"),
    ([{"type": "function"}], "tools[0].function: missing"),
    ([{"type": "function", "function": {"name": "f"}}, {"type": "function", "function": {}}],
     "tools[1].function.name: missing"),
    ([{"type": "function", "function": {"name": "a b"}}], "tools[0].function.name: must be"),
    ([{"type": "function", "function": {"name": "x" * 65}}], "tools[0].function.name: must be"),
    ([{"type": "function", "function": {"name": "required"}}],
     "tools[0].function.name: 'required' is reserved"),
    ([{"type": "function", "function": {"name": "f"}}] * 2,
     "tools[1].function.name: duplicate 'f'"),
    ([{"type": "function", "function": {"name": "f", "description": 3}}],
     "tools[0].function.description: must be a string"),
    ([{"type": "function", "function": {"name": "f", "parameters": []}}],
     "tools[0].function.parameters: must be a JSON schema object"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}],
     "tools[0].function.parameters: not a valid JSON schema"),
])
def test_validate_tools_errors_name_the_field(tools, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        validate_tools(tools)


def test_validate_tool_choice():
    assert validate_tool_choice(None, TOOLS) == "auto"
    assert validate_tool_choice(None, []) == "none"
    assert validate_tool_choice("auto", []) == "none"
    assert validate_tool_choice("none", TOOLS) == "none"
    assert validate_tool_choice("required", TOOLS) == "required"
    assert validate_tool_choice({"type": "function", "function": {"name": "add"}}, TOOLS) == "add"


@pytest.mark.parametrize("choice, tools, message", [
    ("sometimes", TOOLS, "tool_choice: must be 'none', 'auto', 'required'"),
    ({"type": "function"}, TOOLS, "tool_choice: must be"),
    ({"type": "function", "function": {"name": "nope"}}, TOOLS,
     "tool_choice: function 'nope' is not among the tools"),
    ("required", [], "tool_choice: 'required' needs tools"),
    ({"type": "function", "function": {"name": "add"}}, [], "tool_choice: {'type'"),
])
def test_validate_tool_choice_errors(choice, tools, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        validate_tool_choice(choice, tools)


def test_get_tool_parser():
    assert get_tool_parser("hermes") is HermesToolParser
    assert get_tool_parser("llama3_json") is Llama3JsonToolParser
    assert set(PARSERS) == {"hermes", "llama3_json"}
    with pytest.raises(ValueError,
                       match="tool_call_parser: unknown 'x'; known: hermes, llama3_json"):
        get_tool_parser("x")


@pytest.mark.parametrize("parser_cls, marker", [(HermesToolParser, "<tool_call>"),
                                                (Llama3JsonToolParser, '"parameters"')])
def test_system_prompt_describes_tools_and_format(parser_cls, marker):
    prompt = parser_cls(TOOLS).system_prompt()
    assert marker in prompt
    for tool in TOOLS:
        assert json.dumps(tool) in prompt


# ---------- parse(): hermes ----------

def test_hermes_content_then_calls():
    text = ("Let me check.\n\n" + hermes_call("get_weather", {"city": "Paris"}) + "\n"
            + hermes_call("add", {"a": 1, "b": 2}) + "\n")
    content, calls = HermesToolParser(TOOLS).parse(text)
    assert content == "Let me check."
    assert calls_of(calls) == [("get_weather", {"city": "Paris"}), ("add", {"a": 1, "b": 2})]
    assert all(re.fullmatch(r"call_[0-9a-f]{24}", c.id) for c in calls)
    assert calls[0].id != calls[1].id
    assert calls[0].arguments == '{"city": "Paris"}'


@pytest.mark.parametrize("ws", ["", "\n", " \n\t ", "\n\n"])
def test_hermes_whitespace_variants(ws):
    body = '{"name":"add","arguments":{"a":1,"b":2}}'
    content, calls = HermesToolParser(TOOLS).parse(f"<tool_call>{ws}{body}{ws}</tool_call>")
    assert content is None and calls_of(calls) == [("add", {"a": 1, "b": 2})]


def test_hermes_lenient_forms():
    parser = HermesToolParser(TOOLS)
    # arguments before the name, no arguments, non-ASCII kept, a missing closing brace
    _, calls = parser.parse('<tool_call>{"arguments": {"a": 1, "b": 2}, "name": "add"}</tool_call>')
    assert calls_of(calls) == [("add", {"a": 1, "b": 2})]
    _, calls = parser.parse('<tool_call>\n{"name": "ping"}\n</tool_call>')
    assert calls[0].arguments == "{}"
    _, calls = parser.parse(hermes_call("get_weather", {"city": "München"}))
    assert calls[0].arguments == '{"city": "München"}'
    _, calls = parser.parse('<tool_call>\n{"name": "ping", "arguments": {}\n</tool_call>\nok')
    assert calls_of(calls) == [("ping", {})]
    # a nested "name" is not the call's; pretty-printed JSON; a missing </tool_call>
    _, calls = parser.parse('<tool_call>{"meta": {"name": "x"}, "name": "ping"}</tool_call>')
    assert calls_of(calls) == [("ping", {})]
    pretty = json.dumps({"name": "add", "arguments": {"a": 1, "b": 2}}, indent="\t")
    assert calls_of(parser.parse(f"<tool_call>{pretty}</tool_call>")[1]) == [ADD_CALL]
    content, calls = parser.parse('<tool_call>{"name": "ping"} trailing\n' + hermes_call("add", {}))
    assert content is None and calls_of(calls) == [("ping", {}), ("add", {})]


@pytest.mark.parametrize("text", [
    '<tool_call>\n{"name": get_weather}\n</tool_call>',
    "<tool_call>\nnot json\n</tool_call>",
    '<tool_call>\n{"arguments": {"a": 1}}\n</tool_call>',
    '<tool_call>\n{"name": "unknown", "arguments": {}}\n</tool_call>',
    '<tool_call>\n{"name": ["add"], "arguments": {}}\n</tool_call>',
    "I would <tool_call> but no",
    '<tool_call>\n{"name": "get_wea',  # cut off before the name is complete
])
def test_hermes_malformed_is_content(text):
    content, calls = HermesToolParser(TOOLS).parse(text)
    assert (content, calls) == (text.strip(), [])


def test_hermes_call_cut_off_keeps_its_arguments_text():
    content, calls = HermesToolParser(TOOLS).parse(
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par')
    assert content is None
    assert [(c.name, c.arguments) for c in calls] == [("get_weather", '{"city": "Par')]


# ---------- parse(): llama3_json ----------

@pytest.mark.parametrize("prefix", ["", "<|python_tag|>", "  \n", " <|python_tag|> "])
@pytest.mark.parametrize("key", ["parameters", "arguments"])
def test_llama3_single_call(prefix, key):
    text = prefix + llama_call("get_weather", {"city": "Paris", "unit": "c"}, key)
    content, calls = Llama3JsonToolParser(TOOLS).parse(text)
    assert content is None and calls_of(calls) == [("get_weather", {"city": "Paris", "unit": "c"})]


@pytest.mark.parametrize("sep", [";", "; ", " ;\n"])
def test_llama3_several_calls(sep):
    text = llama_call("add", {"a": 1, "b": 2}) + sep + llama_call("ping", {}, "arguments")
    content, calls = Llama3JsonToolParser(TOOLS).parse(text)
    assert content is None and calls_of(calls) == [("add", {"a": 1, "b": 2}), ("ping", {})]


@pytest.mark.parametrize("text", [
    "The weather is fine.",
    '  Here: {"name": "add", "parameters": {}}',
    '{"answer": 42}',
    '{"name": "Alice", "age": 3}',
    "<|python_tag|>print(1)",
    "{not json",
    "[1, 2]",
])
def test_llama3_plain_text_is_content(text):
    assert Llama3JsonToolParser(TOOLS).parse(text) == (text.strip(), [])


def test_llama3_text_after_calls_is_content():
    text = llama_call("ping", {}) + " and that is all"
    content, calls = Llama3JsonToolParser(TOOLS).parse(text)
    assert content == "and that is all" and calls_of(calls) == [("ping", {})]


# ---------- streaming ----------

def _rand_value(rng, depth=0):
    kind = rng.randrange(8 if depth < 3 else 5)
    if kind == 0:
        return rng.randint(-10**6, 10**6)
    if kind == 1:
        return rng.choice([True, False, None, 1.5e-3, -0.25])
    if kind in (2, 3, 4):
        return rng.choice(["", "Paris", 'say "hi"', "back\\slash", "<tool_call>", "}]{[",
                           "ünï\n", "a;b", "</tool_call>", "\u00e9\t"])
    if kind == 5:
        return [_rand_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {rng.choice(["x", "y", "name", "arguments", "k\"ey"]): _rand_value(rng, depth + 1)
            for _ in range(rng.randrange(4))}


def _rand_json(rng, value):
    style = rng.randrange(3)
    if style == 0:
        return json.dumps(value)
    if style == 1:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    return json.dumps(value, indent=rng.choice([1, 2]))


def _rand_args(rng):
    return {k: _rand_value(rng, 1) for k in rng.sample(["city", "a", "b", "q", "opts"],
                                                       rng.randrange(4))}


def _rand_call_object(rng, name):
    key = rng.choice(["arguments", "parameters"])
    members = [("name", name), (key, _rand_args(rng))]
    if rng.random() < 0.2:
        members.reverse()
    if rng.random() < 0.1:
        members.pop()
    text = "{" + ", ".join(f"{json.dumps(k)}: {_rand_json(rng, v)}" for k, v in members) + "}"
    if rng.random() < 0.15:  # one stray character: bad literals, brackets, strings, ...
        i = rng.randrange(len(text) + 1)
        text = text[:i] + rng.choice('x}]{[,:"\\1e-<;') + text[i:]
    return text


def _rand_name(rng):
    return rng.choice(["get_weather", "add", "ping", "ping", "unknown"])


def _hermes_text(rng):
    pieces = []
    for _ in range(rng.randrange(5)):
        kind = rng.randrange(6)
        if kind < 3:
            ws = rng.choice(["", "\n", " \n  "])
            call = _rand_call_object(rng, _rand_name(rng))
            pieces.append(f"<tool_call>{ws}{call}{ws}</tool_call>")
        elif kind == 3:
            pieces.append(rng.choice(["<tool_call>oops</tool_call>", "<tool_call>\n{\"name\": x}",
                                      "<tool_call>{\"arguments\": {}}</tool_call>", "<tool_call>",
                                      "</tool_call>", "<tool_call>{} extra</tool_call>"]))
        else:
            pieces.append(rng.choice(["Hello", " world", "\n", "  ", "a < b", "<tool", "<tool_c",
                                      "x<", "ünï", "{\"name\": \"add\"}", "done."]))
        pieces.append(rng.choice(["", "", "\n", " "]))
    return "".join(pieces)


def _llama_text(rng):
    if rng.random() < 0.25:
        return rng.choice(["", "  ", "Hi there", "{\"answer\": 1}", "<|python", "[1]",
                           " <|python_tag|>x = 1", "{\"name\": \"Bob\", \"parameters\": {}}"])
    head = rng.choice(["", " ", "<|python_tag|>", "\n<|python_tag|> "])
    calls = [_rand_call_object(rng, _rand_name(rng)) for _ in range(1 + rng.randrange(3))]
    tail = rng.choice(["", "", "\n", "; ", " bye", "; {\"x\": 1}", "}"])
    return head + rng.choice([";", "; ", " ;\n", "\n"]).join(calls) + tail


def _chunks(rng, text):
    mode = rng.randrange(3)
    if mode == 0:
        return list(text)
    out, i = [], 0
    while i < len(text):
        n = rng.randint(1, 3 if mode == 1 else 12)
        out.append(text[i:i + n])
        i += n
    return out


def _replay(parser, chunks):
    """Streamed content and calls, checking the order of each call's deltas."""
    stream = parser.stream()
    events = [e for chunk in chunks for e in stream.feed(chunk)] + stream.finish()
    content, calls = "", []
    for e in events:
        if isinstance(e, ContentDelta):
            content += e.text
            continue
        assert isinstance(e, ToolCallDelta)
        if e.name is not None:
            assert e.index == len(calls) and e.id and e.arguments == ""
            calls.append([e.name, ""])
        else:
            assert e.id is None and e.index == len(calls) - 1 and e.arguments
            calls[e.index][1] += e.arguments
    assert stream.called == bool(calls)
    return content, calls


def _norm_args(text):
    try:
        return json.loads(text, strict=False)
    except ValueError:
        return ("raw", text)


def _check_stream_matches_parse(parser, text, chunkings):
    content, calls = parser.parse(text)
    expected = [(c.name, _norm_args(c.arguments)) for c in calls]
    for chunks in chunkings:
        got_content, got_calls = _replay(parser, chunks)
        assert (got_content.strip() or None) == content, text
        assert [(name, _norm_args(args)) for name, args in got_calls] == expected, text


@pytest.mark.parametrize("parser_cls, make_text", [(HermesToolParser, _hermes_text),
                                                   (Llama3JsonToolParser, _llama_text)])
def test_stream_matches_parse_in_any_chunking(parser_cls, make_text):
    rng = random.Random(1234)
    parser = parser_cls(TOOLS)
    for _ in range(400):
        text = make_text(rng)
        if rng.random() < 0.25:  # cut off anywhere, as max_tokens does
            text = text[:rng.randrange(len(text) + 1)]
        _check_stream_matches_parse(parser, text, [_chunks(rng, text) for _ in range(3)])


@pytest.mark.parametrize("parser_cls, text", [
    (HermesToolParser, '<tool_call>{"name": "add", "arguments": {"a": 12x, "b": 2}}</tool_call>ok'),
    (HermesToolParser, hermes_call("ping", {"s": "</tool_call>"}, ws="")),
    (HermesToolParser, '<tool_call>{"name": "get_weather", "arguments": {"city": "a\\"b\\\\"}}'),
    (HermesToolParser, '<tool_call>\n{"name": "ping", "arguments": {}}}\n</tool_call> x'),
    (Llama3JsonToolParser, '{"name": "add", "parameters": {"a": tru, "b": 1}} tail'),
    (Llama3JsonToolParser, '{"name": "add", "parameters": {"a": 1, "b": 2} ; {"name": "ping"}'),
    (Llama3JsonToolParser, '{"name": "add", "parameters": 12e'),
])
def test_stream_matches_parse_on_edge_cases(parser_cls, text):
    chunkings = [list(text), [text]] + [[text[:i], text[i:]] for i in range(len(text))]
    _check_stream_matches_parse(parser_cls(TOOLS), text, chunkings)


def test_stream_calls_only_sends_no_content():
    text = "\n" + hermes_call("ping", {}) + "\n" + hermes_call("add", {"a": 1, "b": 2}) + "\n"
    content, calls = _replay(HermesToolParser(TOOLS), list(text))
    assert content == "" and [name for name, _ in calls] == ["ping", "add"]


def test_stream_holds_whitespace_after_a_call():
    stream = HermesToolParser(TOOLS).stream()
    assert stream.feed("Sure.") == [ContentDelta("Sure.")]
    events = stream.feed("\n" + hermes_call("ping", {}) + "\n")
    assert events[0] == ContentDelta("\n") and events[1].name == "ping"
    assert events[2:] == [ToolCallDelta(0, arguments="{}")]
    assert stream.feed("\n") == []
    assert stream.feed("Done") == [ContentDelta("\n\nDone")]
    assert stream.feed("\n") == [ContentDelta("\n")]
    assert stream.finish() == []


@pytest.mark.parametrize("parser_cls, text", [
    (HermesToolParser, "Sure.\n" + hermes_call("get_weather", {"city": "Paris", "unit": "c"})),
    (Llama3JsonToolParser, "<|python_tag|>" + llama_call("get_weather", {"city": "Paris",
                                                                         "unit": "c"})),
])
def test_stream_name_first_then_arguments_before_the_call_closes(parser_cls, text):
    stream = parser_cls(TOOLS).stream()
    cut = text.index("Par")  # mid-arguments
    events = stream.feed(text[:cut + 2])
    deltas = [e for e in events if isinstance(e, ToolCallDelta)]
    assert deltas[0].name == "get_weather" and deltas[0].id.startswith("call_")
    assert "".join(d.arguments for d in deltas) == '{"city": "Pa'
    rest = stream.feed(text[cut + 2:]) + stream.finish()
    args = "".join(d.arguments for d in deltas + rest if isinstance(d, ToolCallDelta))
    assert args == '{"city": "Paris", "unit": "c"}'  # nothing after the arguments' "}"
    assert stream.called


def test_stream_arguments_before_name_are_sent_with_it():
    stream = HermesToolParser(TOOLS).stream()
    events = stream.feed('<tool_call>{"arguments": {"a": 1, "b": 2}, "name": "add"')
    assert [(e.name, e.arguments) for e in events] == [("add", ""), (None, '{"a": 1, "b": 2}')]


def test_hermes_stream_holds_back_only_a_possible_marker():
    stream = HermesToolParser(TOOLS).stream()
    assert stream.feed("Hello") == [ContentDelta("Hello")]
    assert stream.feed(" <tool") == [ContentDelta(" ")]
    assert stream.feed("box> is") == [ContentDelta("<toolbox> is")]
    assert stream.feed(" <") == [ContentDelta(" ")]
    assert stream.finish() == [ContentDelta("<")]
    assert not stream.called


def test_llama3_stream_sends_content_once_known():
    stream = Llama3JsonToolParser(TOOLS).stream()
    assert stream.feed(" ") == []
    assert stream.feed("<|py") == []
    assert stream.feed("x") == [ContentDelta("<|pyx")]
    assert stream.feed(" {") == [ContentDelta(" {")]
    assert stream.finish() == []


def test_stream_truncated_before_name_is_content():
    stream = Llama3JsonToolParser(TOOLS).stream()
    assert stream.feed('{"name": "ad') == []
    assert stream.finish() == [ContentDelta('{"name": "ad')]
    assert not stream.called


# ---------- structural tags ----------

def _accepts(tag_json, text):
    grammar = xgr.Grammar.from_structural_tag(tag_json)
    compiled = xgr.GrammarCompiler(xgr.TokenizerInfo([]), cache_enabled=False).compile_grammar(
        grammar)
    matcher = xgr.GrammarMatcher(compiled, terminate_without_stop_token=True)
    return matcher.accept_string(text) and matcher.is_terminated()


def _format(parser_cls, calls):
    if parser_cls is HermesToolParser:
        return "\n".join(hermes_call(name, args) for name, args in calls)
    return ";".join(llama_call(name, args) for name, args in calls)


@pytest.mark.parametrize("parser_cls", [HermesToolParser, Llama3JsonToolParser])
@pytest.mark.parametrize("mode, parallel, good, bad", [
    ("required", True,
     [[WEATHER_CALL], [ADD_CALL, PING_CALL], [PING_CALL, WEATHER_CALL, ADD_CALL]],
     [[], [("nope", {})], [("get_weather", {"unit": "c"})], [("add", {"a": "1", "b": 2})],
      [("get_weather", {"city": "Paris", "unit": "k"})]]),
    ("required", False, [[ADD_CALL], [PING_CALL]], [[ADD_CALL, PING_CALL]]),
    ("add", True, [[ADD_CALL]], [[ADD_CALL, ADD_CALL], [WEATHER_CALL], [("add", {"a": 1})]]),
])
def test_structural_tag(parser_cls, mode, parallel, good, bad):
    parser = parser_cls(TOOLS)
    tag = parser.structural_tag(mode, parallel_tool_calls=parallel)
    assert json.loads(tag)["type"] == "structural_tag"
    for calls in good:
        text = _format(parser_cls, calls)
        assert _accepts(tag, text), text
        content, parsed = parser.parse(text)
        assert content is None and calls_of(parsed) == calls
    for calls in bad:
        assert not _accepts(tag, _format(parser_cls, calls)), calls
    assert not _accepts(tag, "Sure! " + _format(parser_cls, good[0]))


def test_structural_tag_refuses_other_modes():
    for mode in ("auto", "none", "nope"):
        with pytest.raises(ValueError, match="tool_choice"):
            HermesToolParser(TOOLS).structural_tag(mode)
    with pytest.raises(ValueError, match="tool_choice"):
        HermesToolParser([]).structural_tag("required")
