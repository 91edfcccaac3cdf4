"""Structured outputs, as a request asks for them (vLLM's ``StructuredOutputsParams``
shape) and as the ranks receive them (``GuidedSpec``: text every rank compiles with
xgrammar). Everything is checked here, in the frontend, so that a bad schema, regex or
grammar is a ``ValueError`` naming the field before the request is queued; the ranks
then only compile what parsed."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field, fields

from serialization import GuidedSpec

MAX_SPEC_CHARS = 100_000  # a schema, regex, grammar or tag longer than this is refused

# JSON Schema keywords the grammar enforces; annotations are accepted and ignored. Any
# other keyword is refused by name: xgrammar would drop it silently (uniqueItems, not,
# if/then/else, dependentRequired, unevaluatedProperties, ...), and the output would
# then not obey the schema the client sent.
_ENFORCED = frozenset({
    "type", "properties", "required", "additionalProperties", "patternProperties",
    "propertyNames", "minProperties", "maxProperties", "items", "prefixItems", "minItems",
    "maxItems", "enum", "const", "anyOf", "oneOf", "allOf", "$ref", "$defs", "definitions",
    "minLength", "maxLength", "pattern", "format", "minimum", "maximum", "exclusiveMinimum",
    "exclusiveMaximum", "multipleOf",
})
_ANNOTATIONS = frozenset({"title", "description", "default", "examples", "$schema", "$id",
                          "$comment", "deprecated", "readOnly", "writeOnly"})
_FORMATS = frozenset({"email", "date", "time", "date-time", "duration", "ipv4", "ipv6",
                      "hostname", "uuid", "uri", "uri-reference", "uri-template",
                      "json-pointer", "relative-json-pointer"})
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")  # name -> schema
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SCHEMA_VALUES = ("additionalProperties", "items", "propertyNames")


@dataclass
class StructuredOutputsParams:
    """Exactly one constraint: ``json`` (a JSON schema, as a dict or its text), ``regex``,
    ``choice`` (the output is one of these strings), ``grammar`` (EBNF / GBNF, with a
    ``root`` rule), ``json_object=True`` (any JSON object) or ``structural_tag`` (an
    xgrammar structural tag's JSON, as tool calling builds it)."""

    json: str | dict | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: str | None = None
    # How the request named it (errors say "response_format.json_schema.schema: ...").
    source: str = field(default="structured_outputs", repr=False, compare=False)

    def __post_init__(self):
        given = [f.name for f in fields(self)
                 if f.name != "source" and getattr(self, f.name) not in (None, False)]
        if len(given) != 1:
            raise ValueError("structured_outputs: set exactly one of json, regex, choice, "
                             f"grammar, json_object, structural_tag (got {given or 'none'})")

    @classmethod
    def coerce(cls, value) -> StructuredOutputsParams | None:
        """Itself, or one built from a dict of its fields (``ValueError`` naming a key
        it does not have)."""
        if value is None or isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"structured_outputs: must be a StructuredOutputsParams or a dict, "
                             f"got {type(value).__name__}")
        known = {f.name for f in fields(cls)}
        if unknown := sorted(set(value) - known):
            raise ValueError(f"structured_outputs: unknown key(s) {unknown}; known: "
                             f"{sorted(known)}")
        return cls(**value)


def guided_spec(params: StructuredOutputsParams, end_token_ids: list[int]) -> GuidedSpec:
    """The ranks' form of ``params``, after checking that it parses; ``end_token_ids``:
    the tokens that may end the output."""
    end = sorted(end_token_ids)
    if params.json_object:
        return GuidedSpec("json_object", "", end)
    where = params.source
    if where == "structured_outputs":
        where += "." + next(f.name for f in fields(params) if f.name != "source"
                            and getattr(params, f.name) is not None)
    if params.json is not None:
        text = _schema_text(params.json, where)
        _parse(where, "json", text)
        return GuidedSpec("json", text, end)
    if params.regex is not None:
        regex = _text(where, params.regex)
        _parse(where, "regex", regex)
        return GuidedSpec("regex", regex, end)
    if params.choice is not None:
        choice = params.choice
        if not isinstance(choice, list) or not choice or not all(
                isinstance(c, str) and c for c in choice):
            raise ValueError(f"{where}: must be a non-empty list of non-empty strings")
        grammar = "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choice)
        _text(where, grammar)
        _parse(where, "grammar", grammar)
        return GuidedSpec("grammar", grammar, end)
    if params.grammar is not None:
        grammar = _text(where, params.grammar)
        _parse(where, "grammar", grammar)
        return GuidedSpec("grammar", grammar, end)
    tag = _text(where, params.structural_tag)
    _parse(where, "structural_tag", tag)
    return GuidedSpec("structural_tag", tag, end)


def check_json_schema(schema, where: str) -> str:
    """The schema's JSON text, after checking that it is an object schema made only of
    keywords the grammar enforces (``ValueError`` naming ``where``, the keyword and its
    path); for schemas that reach the grammar another way (tool parameters)."""
    return _schema_text(schema, where)


def _schema_text(schema, where: str) -> str:
    if isinstance(schema, str):
        _text(where, schema)
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(schema, dict):
        raise ValueError(f"{where}: a JSON schema must be an object, got "
                         f"{type(schema).__name__}")
    _check_keywords(schema, where, "#")
    text = json.dumps(schema, ensure_ascii=False)
    return _text(where, text)


def _check_keywords(schema, where: str, path: str) -> None:
    """Walks every subschema (iteratively: a deep schema cannot exhaust the stack)."""
    todo = [(schema, path)]
    while todo:
        node, at = todo.pop()
        if isinstance(node, bool):
            continue
        if not isinstance(node, dict):
            raise ValueError(f"{where}: the subschema at {at} must be an object or a bool, "
                             f"got {type(node).__name__}")
        for key, value in node.items():
            if key not in _ENFORCED and key not in _ANNOTATIONS:
                raise ValueError(f"{where}: keyword {key!r} at {at} is not supported (it "
                                 "cannot be enforced while decoding); supported: "
                                 f"{', '.join(sorted(_ENFORCED))}")
            if key == "format" and value not in _FORMATS:
                raise ValueError(f"{where}: format {value!r} at {at} is not supported; "
                                 f"supported: {', '.join(sorted(_FORMATS))}")
            if key == "format" and ("minLength" in node or "maxLength" in node):
                raise ValueError(f"{where}: format with minLength/maxLength at {at} is not "
                                 "supported (the grammar would drop the length bounds)")
            if key in _SCHEMA_MAPS:
                if not isinstance(value, dict):
                    raise ValueError(f"{where}: {key} at {at} must be an object")
                todo += [(sub, f"{at}/{key}/{name}") for name, sub in value.items()]
            elif key in _SCHEMA_LISTS:
                if not isinstance(value, list):
                    raise ValueError(f"{where}: {key} at {at} must be an array")
                todo += [(sub, f"{at}/{key}/{i}") for i, sub in enumerate(value)]
            elif key in _SCHEMA_VALUES:
                todo.append((value, f"{at}/{key}"))


def _text(where: str, value) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{where}: must be a non-empty string")
    if len(value) > MAX_SPEC_CHARS:
        raise ValueError(f"{where}: {len(value)} characters; the limit is {MAX_SPEC_CHARS}")
    return value


def _parse(where: str, kind: str, text: str) -> None:
    try:
        _parses(kind, text)
    except (RuntimeError, ValueError, TypeError) as e:
        # xgrammar's messages start with its source location; keep the reason.
        reason = str(e).strip().splitlines()
        reason = next((line for line in reason if line.strip()), type(e).__name__)
        raise ValueError(f"{where}: {_strip_location(reason)}") from None


@functools.lru_cache(maxsize=256)
def _parses(kind: str, text: str) -> bool:
    """Parses a constraint with xgrammar (about 1 ms for a moderate schema); a text that
    parsed is remembered, so a schema every request repeats is parsed once (errors are
    not cached: they raise again)."""
    import xgrammar as xgr

    build = {"json": lambda: xgr.Grammar.from_json_schema(text, any_whitespace=False),
             "regex": lambda: xgr.Grammar.from_regex(text),
             "grammar": lambda: xgr.Grammar.from_ebnf(text),
             "structural_tag": lambda: xgr.Grammar.from_structural_tag(text)}[kind]
    build()
    return True


def _strip_location(message: str) -> str:
    head, sep, rest = message.partition(": ")
    if sep and (".cc:" in head or head.startswith("[")):
        return _strip_location(rest)
    return message
