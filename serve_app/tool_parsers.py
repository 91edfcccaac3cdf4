"""OpenAI tool calling: checking `tools` / `tool_choice`, turning generated text into
`message.tool_calls` (whole or streamed), and the xgrammar structural tags that force calls.

Formats (server config ``tool_call_parser``):

- ``hermes`` (Hermes, Qwen2.5, Qwen3): optional text, then blocks
  ``<tool_call>\\n{"name": "fn", "arguments": {...}}\\n</tool_call>``;
- ``llama3_json`` (Llama 3.1 / 3.2): ``{"name": "fn", "parameters": {...}}`` objects (or
  ``"arguments"``), optionally after ``<|python_tag|>``, separated by ``;``; output that does not
  start with ``{`` is plain content.

One incremental scanner serves both streaming and `ToolParser.parse` (which feeds it the whole
text), so a streamed reply always agrees with the non-streamed one. A call is committed as soon
as its ``"name"`` value is complete and names one of the tools; text that turns out not to be a
call before that (bad JSON, no name, an unknown name) is content. A committed call is never taken
back: its arguments are the text of its arguments value as generated (canonical JSON when that
text parses, the raw text otherwise, e.g. when the output was cut off mid-call), ``"{}"`` when it
has none. Hermes text inside a call's block after its JSON object is dropped.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from jsonschema import SchemaError, validators

_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_MODES = ("none", "auto", "required")  # reserved as tool names: a mode and a name never clash
_ARG_KEYS = ("arguments", "parameters")
_WS = " \t\r\n"
_LITERAL = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?|true|false|null")
_LITERAL_RUN = re.compile(r"[0-9A-Za-z+.\-]*")
_STRING_STOP = re.compile(r'["\\]')
# a closing bracket: its opener, and the expectation right after that opener
_CLOSERS = {"}": ("{", "key_or_close"), "]": ("[", "value_or_close")}


@dataclass
class ToolCall:
    id: str  # "call_" + 24 hex digits
    name: str
    arguments: str  # JSON text of the arguments


@dataclass
class ContentDelta:
    text: str


@dataclass
class ToolCallDelta:
    index: int  # the call's index within its choice
    id: str | None = None  # on the call's first delta only
    name: str | None = None  # on the call's first delta only
    arguments: str = ""  # a piece of the arguments' JSON text


StreamEvent = ContentDelta | ToolCallDelta


def validate_tools(tools: Any) -> list[dict]:
    """Checks an OpenAI ``tools`` list (None: no tools) and returns it normalized: each item
    ``{"type": "function", "function": {"name", "description"?, "parameters"}}`` with
    ``parameters`` defaulting to an empty object schema. ``ValueError`` names the field."""
    if tools is None:
        return []
    _require(isinstance(tools, list), "tools", f"must be a list, got {type(tools).__name__}")
    out, seen = [], set()
    for i, tool in enumerate(tools):
        at = f"tools[{i}]"
        _require(isinstance(tool, dict), at, "must be an object")
        _require("type" in tool, f"{at}.type", "missing")
        _require(tool["type"] == "function", f"{at}.type",
                 f"must be 'function', got {tool['type']!r}")
        fn = tool.get("function")
        _require(fn is not None, f"{at}.function", "missing")
        _require(isinstance(fn, dict), f"{at}.function", "must be an object")
        name = fn.get("name")
        _require(name is not None, f"{at}.function.name", "missing")
        _require(isinstance(name, str) and _NAME.fullmatch(name), f"{at}.function.name",
                 f"must be 1 to 64 of A-Z a-z 0-9 _ -, got {name!r}")
        _require(name not in _MODES, f"{at}.function.name", f"{name!r} is reserved")
        _require(name not in seen, f"{at}.function.name", f"duplicate {name!r}")
        seen.add(name)
        desc = fn.get("description")
        _require(desc is None or isinstance(desc, str), f"{at}.function.description",
                 "must be a string")
        params = fn.get("parameters")
        if params is None:
            params = {"type": "object", "properties": {}}
        _require(isinstance(params, dict), f"{at}.function.parameters",
                 "must be a JSON schema object")
        try:
            validators.validator_for(params).check_schema(params)
        except SchemaError as e:
            raise ValueError(f"{at}.function.parameters: not a valid JSON schema: {e.message}") \
                from None
        fn = {k: v for k, v in fn.items() if v is not None}
        out.append({"type": "function", "function": {**fn, "parameters": params}})
    return out


def validate_tool_choice(tool_choice: Any, tools: list[dict]) -> str:
    """The mode for ``tool_choice`` given the validated ``tools``: "none", "auto", "required", or
    the name of the function it names (tool names cannot be a mode, see `validate_tools`).
    None or "auto" without tools is "none"."""
    names = [t["function"]["name"] for t in tools]
    if tool_choice is None or tool_choice == "auto":
        return "auto" if names else "none"
    if tool_choice == "none":
        return "none"
    named = (isinstance(tool_choice, dict) and tool_choice.get("type") == "function"
             and isinstance(tool_choice.get("function"), dict))
    _require(tool_choice == "required" or named, "tool_choice",
             "must be 'none', 'auto', 'required' or "
             f"{{'type': 'function', 'function': {{'name': ...}}}}, got {tool_choice!r}")
    _require(bool(names), "tool_choice", f"{tool_choice!r} needs tools")
    if tool_choice == "required":
        return "required"
    name = tool_choice["function"].get("name")
    _require(name in names, "tool_choice", f"function {name!r} is not among the tools {names}")
    return name


def _require(ok: Any, field: str, message: str) -> None:
    if not ok:
        raise ValueError(f"{field}: {message}")


def _loads(text: str) -> Any:
    """The JSON value of ``text`` (control characters in strings allowed), None if not JSON."""
    try:
        return json.loads(text, strict=False)
    except ValueError:
        return None


def _canonical(text: str) -> str:
    """``text`` re-serialized if it is JSON (so that equal arguments read the same), else as is."""
    try:
        return json.dumps(json.loads(text, strict=False), ensure_ascii=False)
    except ValueError:
        return text


class _ObjectScanner:
    """Incremental structural scanner of one call's JSON object: finds where its first "name"
    value ends and where its first arguments value starts and ends. Lenient on purpose: strings
    are checked only for their end, so json.loads has the last word on the arguments."""

    def __init__(self):
        self.stack = ""  # the open brackets, outermost first
        self.expect = "value"  # value | value_or_close | key | key_or_close | colon | next
        self.string_start = self.literal_start = -1
        self.escaped = self.in_key = False
        self.key: str | None = None  # the current member's key in the outermost object
        self.value_start = -1
        self.name_span: tuple[int, int] | None = None
        self.args_start = self.args_end = -1

    def advance(self, text: str, pos: int) -> tuple[int, str | None]:
        """Scans ``text`` from ``pos`` (where the object starts, or where the last call stopped)
        to the next event: None (all of ``text`` scanned), "name" (just after the name value),
        "closed" (just after the object) or "error" (at the offending character)."""
        n = len(text)
        while pos < n:
            event = None
            if self.escaped:
                self.escaped, pos = False, pos + 1
                continue
            if self.string_start >= 0:
                m = _STRING_STOP.search(text, pos)
                if m is None:
                    return n, None
                pos = m.end()
                if m.group() == "\\":
                    self.escaped = True
                    continue
                start, self.string_start = self.string_start, -1
                if self.in_key:
                    self.in_key, self.expect = False, "colon"
                    if len(self.stack) == 1:
                        self.key = _loads(text[start:pos])
                    continue
                event = self._value_end(start, pos)
            elif self.literal_start >= 0:
                pos = _LITERAL_RUN.match(text, pos).end()
                if pos == n:
                    return n, None
                start, self.literal_start = self.literal_start, -1
                if not _LITERAL.fullmatch(text, start, pos):
                    return pos, "error"
                event = self._value_end(start, pos)
            else:
                c, e = text[pos], self.expect
                if c in _WS:
                    pos += 1
                    continue
                if c == '"' and e in ("key", "key_or_close"):
                    self.string_start, self.in_key = pos, True
                elif c == ":" and e == "colon":
                    self.expect = "value"
                elif c == "," and e == "next":
                    self.expect = "key" if self.stack[-1] == "{" else "value"
                elif c in _CLOSERS and self.stack[-1:] == _CLOSERS[c][0] and e in (
                        "next", _CLOSERS[c][1]):
                    self.stack = self.stack[:-1]
                    if not self.stack:
                        return pos + 1, "closed"
                    event = self._value_end(self.value_start, pos + 1)
                elif c in '{["-0123456789tfn' and e in ("value", "value_or_close"):
                    if len(self.stack) == 1:
                        self.value_start = pos
                        if self.key in _ARG_KEYS and self.args_start < 0:
                            self.args_start = pos
                    if c in "{[":
                        self.stack += c
                        self.expect = "key_or_close" if c == "{" else "value_or_close"
                    elif c == '"':
                        self.string_start = pos
                    else:
                        self.literal_start = pos
                        continue
                else:
                    return pos, "error"
                pos += 1
            if event:
                return pos, event
        return pos, None

    def _value_end(self, start: int, end: int) -> str | None:
        self.expect = "next"
        if len(self.stack) != 1:
            return None
        if start == self.args_start:
            self.args_end = end
        elif self.key == "name" and self.name_span is None:
            self.name_span = (start, end)
            return "name"
        return None


class ToolStream:
    """Turns one choice's generated text, fed piece by piece, into `StreamEvent`s. Content is
    held back only while it may still start a call, and whitespace only while no other content
    has followed the start or the last call (so a reply of calls alone streams no content)."""

    _IDLE = ("content", "skip")  # states that keep no position in the text before _pos
    _INITIAL: str

    def __init__(self, names: frozenset[str]):
        self._names = names
        self._text = ""
        self._pos = 0  # text before _pos is processed
        self._hold = 0  # start of the text held back while it may be a call
        self._state = self._INITIAL
        self._events: list[StreamEvent] = []
        self._any_content = False
        self._run_ws: str | None = ""  # whitespace opening the current content run; None: sent
        self._scanner: _ObjectScanner | None = None
        self._committed = False  # whether the current object is a call already announced
        self._args_sent = 0  # text before it of the current call's arguments is sent
        self._num_calls = 0

    @property
    def called(self) -> bool:
        """Whether any tool call was emitted."""
        return self._num_calls > 0

    def feed(self, delta_text: str) -> list[StreamEvent]:
        """Events for the text generated since the last feed."""
        if self._state in self._IDLE:
            self._text, self._pos = self._text[self._pos:], 0
        self._text += delta_text
        self._advance()
        return self._take()

    def finish(self) -> list[StreamEvent]:
        """Events at the end of the output: held-back text that never became a call is content
        (trailing whitespace excepted); a committed call keeps what its arguments got so far."""
        if self._state == "object" and self._committed:
            self._end_call()
        else:
            self._flush()
        return self._take()

    def _advance(self) -> None:
        raise NotImplementedError

    def _flush(self) -> None:
        raise NotImplementedError

    def _take(self) -> list[StreamEvent]:
        events, self._events = self._events, []
        return events

    def _content(self, text: str) -> None:
        if self._run_ws is not None:
            text = self._run_ws + text
            if not text or text.isspace():
                self._run_ws = text
                return
            self._run_ws = None
            if not self._any_content:
                text, self._any_content = text.lstrip(), True
        if text:
            if self._events and isinstance(self._events[-1], ContentDelta):
                self._events[-1].text += text
            else:
                self._events.append(ContentDelta(text))

    def _begin_object(self) -> None:
        self._scanner, self._committed = _ObjectScanner(), False
        self._state = "object"

    def _scan_object(self) -> str:
        """Advances the call object: "more" (needs text), "failed" (not a call: the text from
        _hold to _pos is content) or "done" (the call ended at _pos)."""
        sc = self._scanner
        while True:
            self._pos, event = sc.advance(self._text, self._pos)
            if event == "name":
                name = _loads(self._text[sc.name_span[0]:sc.name_span[1]])
                if not (isinstance(name, str) and name in self._names):
                    return "failed"
                self._events.append(ToolCallDelta(self._num_calls, f"call_{uuid.uuid4().hex[:24]}",
                                                  name))
                self._num_calls += 1
                self._committed, self._run_ws = True, ""
            if self._committed and sc.args_start >= 0:
                end = sc.args_end if sc.args_end >= 0 else self._pos
                self._send_args(self._text[max(sc.args_start, self._args_sent):end])
                self._args_sent = end
            if event is None:
                return "more"
            if event != "name":
                if not self._committed:
                    return "failed"
                self._end_call()
                return "done"

    def _send_args(self, piece: str) -> None:
        if not piece:
            return
        last = self._events[-1] if self._events else None
        if isinstance(last, ToolCallDelta) and last.index == self._num_calls - 1 and not last.name:
            last.arguments += piece
        else:
            self._events.append(ToolCallDelta(self._num_calls - 1, arguments=piece))

    def _end_call(self) -> None:
        if self._scanner.args_start < 0:
            self._send_args("{}")
        self._scanner, self._committed, self._args_sent = None, False, 0


def _skip_ws(text: str, pos: int, chars: str = _WS) -> int:
    while pos < len(text) and text[pos] in chars:
        pos += 1
    return pos


def _partial_start(text: str, pos: int, markers: tuple[str, ...]) -> int:
    """Where the longest end of ``text[pos:]`` that begins a marker starts (len(text): none)."""
    n = len(text)
    for i in range(max(pos, n - max(map(len, markers)) + 1), n):
        if any(m.startswith(text[i:]) for m in markers):
            return i
    return n


_OPEN, _CLOSE = "<tool_call>", "</tool_call>"
_PYTHON_TAG = "<|python_tag|>"


class _HermesStream(ToolStream):
    """States: content, open (after <tool_call>), object (the call's JSON), skip (the rest of
    the call's block up to </tool_call>, or up to a new <tool_call> if that comes first)."""

    _INITIAL = "content"

    def _advance(self) -> None:
        text = self._text
        while True:
            if self._state == "content":
                i = text.find(_OPEN, self._pos)
                end = i if i >= 0 else _partial_start(text, self._pos, (_OPEN,))
                self._content(text[self._pos:end])
                self._pos = end
                if i < 0:
                    return
                self._hold, self._pos, self._state = i, i + len(_OPEN), "open"
            elif self._state == "open":
                self._pos = _skip_ws(text, self._pos)
                if self._pos == len(text):
                    return
                if text[self._pos] == "{":
                    self._begin_object()
                else:
                    self._not_a_call()
            elif self._state == "object":
                result = self._scan_object()
                if result == "more":
                    return
                if result == "failed":
                    self._not_a_call()
                else:
                    self._state = "skip"
            else:
                close, opened = text.find(_CLOSE, self._pos), text.find(_OPEN, self._pos)
                if close >= 0 and not 0 <= opened < close:
                    self._pos, self._state = close + len(_CLOSE), "content"
                elif opened >= 0:
                    self._pos, self._state = opened, "content"
                else:
                    self._pos = _partial_start(text, self._pos, (_OPEN, _CLOSE))
                    return

    def _not_a_call(self) -> None:
        self._content(self._text[self._hold:self._pos])
        self._state = "content"

    def _flush(self) -> None:
        if self._state == "content":
            self._content(self._text[self._pos:])
        elif self._state != "skip":
            self._content(self._text[self._hold:])


class _Llama3JsonStream(ToolStream):
    """States: start (before the first non-blank text), object (a call's JSON), after (between
    calls), content (the rest of the output)."""

    _INITIAL = "start"

    def _advance(self) -> None:
        text = self._text
        while True:
            if self._state == "start":
                pos = _skip_ws(text, 0)
                if text.startswith(_PYTHON_TAG, pos):
                    pos = _skip_ws(text, pos + len(_PYTHON_TAG))
                if pos == len(text) or _PYTHON_TAG.startswith(text[pos:]):
                    return
                self._pos = pos
                if text[pos] == "{":
                    self._begin_object()
                else:
                    self._pos, self._state = 0, "content"
            elif self._state == "object":
                result = self._scan_object()
                if result == "more":
                    return
                if result == "failed":
                    self._pos, self._state = self._hold, "content"
                else:
                    self._state = "after"
            elif self._state == "after":
                self._pos = _skip_ws(text, self._pos, _WS + ";")
                if self._pos == len(text):
                    return
                if text[self._pos] == "{":
                    self._hold = self._pos
                    self._begin_object()
                else:
                    self._state = "content"
            else:
                self._content(text[self._pos:])
                self._pos = len(text)
                return

    def _flush(self) -> None:
        if self._state in ("start", "object"):
            self._content(self._text[self._hold:])


class ToolParser:
    """Tool calls of one output format, for a request's validated tools."""

    name: str
    _stream_type: type[ToolStream]
    _begin: str  # a call's text before its arguments, formatted with the name as JSON
    _end: str  # a call's text after its arguments
    _separator: str  # between calls
    _how_to_call: str  # the end of `system_prompt`

    def __init__(self, tools: list[dict]):
        self.tools = tools
        self._names = frozenset(t["function"]["name"] for t in tools)

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """A finished output's content (None if blank) and calls; never raises."""
        stream = self.stream()
        content, calls, pieces = [], [], []
        for event in stream.feed(text) + stream.finish():
            if isinstance(event, ContentDelta):
                content.append(event.text)
            elif event.name is not None:
                calls.append(ToolCall(event.id, event.name, ""))
                pieces.append([])
            else:
                pieces[event.index].append(event.arguments)
        for call, parts in zip(calls, pieces):
            call.arguments = _canonical("".join(parts))
        return "".join(content).strip() or None, calls

    def stream(self) -> ToolStream:
        """A parser of one streamed choice."""
        return self._stream_type(self._names)

    def system_prompt(self) -> str:
        """The tools and how to call them in this format, for a system message when the chat
        template does not render ``tools`` itself."""
        specs = "\n".join(json.dumps(t, ensure_ascii=False) for t in self.tools)
        return f"You can call these functions:\n{specs}\n\n{self._how_to_call}"

    def structural_tag(self, mode: str, parallel_tool_calls: bool = True) -> str:
        """JSON text of an xgrammar structural tag allowing only calls in this format, their
        arguments following each tool's ``parameters`` schema: for mode "required" one or more
        calls of any tool (exactly one if not ``parallel_tool_calls``), for a tool's name
        exactly one call of it. ``ValueError`` for other modes ("auto" and "none" force nothing)."""
        schemas = {t["function"]["name"]: t["function"]["parameters"] for t in self.tools}
        if mode == "required" and schemas:
            fmt = {"type": "tags_with_separator",
                   "tags": [self._tag(name, schema) for name, schema in schemas.items()],
                   "separator": self._separator, "at_least_one": True,
                   "stop_after_first": not parallel_tool_calls}
        elif mode in schemas:
            fmt = self._tag(mode, schemas[mode])
        else:
            raise ValueError(f"tool_choice: no structural tag for mode {mode!r}")
        return json.dumps({"type": "structural_tag", "format": fmt})

    def _tag(self, name: str, schema: dict) -> dict:
        # Whitespace runs of one character at most: a model cannot pad the arguments with
        # blank lines until max_tokens cuts the call short.
        return {"type": "tag", "begin": self._begin.format(json.dumps(name)),
                "content": {"type": "json_schema", "json_schema": schema,
                            "max_whitespace_cnt": 1}, "end": self._end}


class HermesToolParser(ToolParser):
    name = "hermes"
    _stream_type = _HermesStream
    _begin = _OPEN + '\n{{"name": {}, "arguments": '
    _end = "}\n" + _CLOSE
    _separator = "\n"
    _how_to_call = ("To call a function, write its name and arguments between <tool_call> tags, "
                    "one block per call:\n<tool_call>\n"
                    '{"name": <function name>, "arguments": <arguments as a JSON object>}'
                    "\n</tool_call>")


class Llama3JsonToolParser(ToolParser):
    name = "llama3_json"
    _stream_type = _Llama3JsonStream
    _begin = '{{"name": {}, "parameters": '
    _end = "}"
    _separator = ";"
    _how_to_call = ("To call a function, reply with only a JSON object "
                    '{"name": <function name>, "parameters": <arguments as a JSON object>}, '
                    'several calls separated by ";". Otherwise reply in plain text.')


PARSERS: dict[str, type[ToolParser]] = {p.name: p for p in (HermesToolParser, Llama3JsonToolParser)}


def get_tool_parser(name: str) -> type[ToolParser]:
    """The parser class for the server's ``tool_call_parser`` setting."""
    if name not in PARSERS:
        raise ValueError(f"tool_call_parser: unknown {name!r}; known: {', '.join(PARSERS)}")
    return PARSERS[name]
