"""Fuzz of both POST endpoints from the server's own /openapi.json (schemathesis
strategies, positive and negative, driven by hypothesis), then hostile bodies that a
generator will not find: deep nesting, lone surrogates, huge ints, NaN, oversized
bodies. The contract: never a 5xx, every 4xx an OpenAI error body whose message shows
no internals, and the server still serves afterwards."""

import itertools
import json
import time
from collections import Counter

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from reliability_server import INTERNALS, MODEL, server, wait_healthy, write_figures  # noqa: F401

pytestmark = pytest.mark.slow

PATHS = ["/v1/completions", "/v1/chat/completions"]
MAX_EXAMPLES = 100  # per endpoint
BUDGET_S = 45  # per endpoint: examples past it are drawn but not sent
REQUEST_TIMEOUT_S = 30
RAW_EVERY = 4  # one generated body in this many is sent as drawn; the rest get small n/max_tokens
HUGE = [2**63, 2**64 + 5, -2**63 - 1]

STATS: dict = {}  # source -> path -> counts
REFUSALS: dict = {}  # path -> what the 4xx bodies named (param, or the message up to ":")
VIOLATIONS: list[dict] = []
BROKEN_BY: list[str] = []  # the hostile case after which the server was down


@pytest.fixture(scope="module", autouse=True)
def figures():
    yield
    refusals = {p: dict(c.most_common(15)) for p, c in REFUSALS.items()}
    write_figures("fuzz", {"stats": STATS, "refusals": refusals, "violations": len(VIOLATIONS),
                           "first_violations": VIOLATIONS[:20]})


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers=server.headers,
                      timeout=REQUEST_TIMEOUT_S) as client:
        yield client


@pytest.fixture(scope="module")
def api(http):
    resp = http.get("/openapi.json")
    assert resp.status_code == 200, resp.text
    return schemathesis.openapi.from_dict(resp.json())


# ---- the contract -------------------------------------------------------------------

def _counts(source: str, path: str) -> Counter:
    return STATS.setdefault(source, {}).setdefault(path, Counter())


def _violation(source: str, path: str, what: str, sent: bytes, resp_text: str) -> None:
    VIOLATIONS.append(dict(source=source, path=path, what=what, sent=sent[:300].decode(
        "utf-8", "replace"), got=resp_text[:500]))


def _leaks(message: str, sent: bytes) -> list[str]:
    """Internals in ``message``, less what the client sent itself (an echoed model name)."""
    echoed = sent.decode("utf-8", "replace")
    return [m for m in INTERNALS.findall(message) if m not in echoed]


def _check_error(body, sent: bytes) -> str | None:
    """What is wrong with an error body (None: an OpenAI one that leaks nothing)."""
    err = body.get("error") if isinstance(body, dict) else None
    if not (isinstance(err, dict) and isinstance(err.get("message"), str)
            and isinstance(err.get("type"), str)):
        return "not an OpenAI error body"
    leaks = _leaks(err["message"], sent)
    return f"message shows internals {leaks}" if leaks else None


def _post(http: httpx.Client, path: str, content, headers: dict) -> httpx.Response:
    """A POST whose whole answer (a stream too) must come within REQUEST_TIMEOUT_S."""
    deadline = time.monotonic() + REQUEST_TIMEOUT_S
    with http.stream("POST", path, content=content, headers=headers) as resp:
        body = bytearray()
        for chunk in resp.iter_bytes():
            body += chunk
            if time.monotonic() > deadline:
                raise httpx.ReadTimeout("the answer took longer than REQUEST_TIMEOUT_S")
    return httpx.Response(resp.status_code, headers=resp.headers, content=bytes(body),
                          request=resp.request)


def send(http: httpx.Client, source: str, path: str, sent: bytes | None, *,
         headers: dict | None = None, content=None) -> httpx.Response | None:
    """POSTs ``sent`` (or the iterable ``content``) and records whether the answer keeps
    the contract; returns the response (None on a client timeout)."""
    counts = _counts(source, path)
    counts["tried"] += 1
    sent = sent if sent is not None else b"<streamed body>"
    try:
        resp = _post(http, path, content if content is not None else sent,
                     {"content-type": "application/json", **(headers or {})})
    except httpx.TimeoutException:
        counts["timeouts"] += 1
        return None
    status = resp.status_code
    counts[f"{status // 100}xx"] += 1
    if 400 <= status < 500:
        counts[str(status)] += 1
    if status >= 500:
        _violation(source, path, f"status {status}", sent, resp.text)
        return resp
    problem = None
    if status >= 400:
        try:
            problem = _check_error(resp.json(), sent)
        except ValueError:
            problem = "error body is not JSON"
        if problem is None:
            err = resp.json()["error"]
            reason = err.get("param") or err["message"].partition(":")[0][:40]
            REFUSALS.setdefault(path, Counter())[f"{status} {reason}"] += 1
    elif resp.headers.get("content-type", "").startswith("text/event-stream"):
        problem = _check_stream(resp.text, sent)
    else:
        try:
            problem = None if isinstance(resp.json().get("choices"), list) else "no choices"
        except (ValueError, AttributeError):
            problem = "2xx body is not a JSON object"
    if problem:
        _violation(source, path, f"status {status}: {problem}", sent, resp.text)
    return resp


def _check_stream(text: str, sent: bytes) -> str | None:
    events = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
    if not events or events[-1] != "[DONE]":
        return "stream does not end with [DONE]"
    for event in events[:-1]:
        data = json.loads(event)
        if "error" in data:
            return f"in-band error: {data['error']}"
    return None


# ---- generated from /openapi.json ---------------------------------------------------

def _small(path: str, body):
    """The same body with small n / token counts (where they are ints), so that the run
    stays bounded, and a content in each chat message; other fields as drawn."""
    if not isinstance(body, dict):
        return body
    body = dict(body)
    for key, cap in (("n", 2), ("max_tokens", 4), ("max_completion_tokens", 4),
                     ("min_tokens", 4)):
        if type(body.get(key)) is int and body[key] > cap:
            body[key] = 1 + body[key] % cap
    if path == "/v1/completions":
        body.setdefault("max_tokens", 4)
        if isinstance(body.get("prompt"), list) and len(body["prompt"]) > 2 \
                and all(isinstance(p, (str, list)) for p in body["prompt"]):
            body["prompt"] = body["prompt"][:2]
    else:
        if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
            body["max_completion_tokens"] = 4
        # SmolLM2's template needs a content (the schema has it optional): without one, most
        # drawn conversations stop at the template's 400 and never reach the engine.
        if isinstance(body.get("messages"), list):
            body["messages"] = [dict(m, content="") if isinstance(m, dict)
                                and m.get("content") is None else m for m in body["messages"]]
    return body


@pytest.mark.parametrize("path", PATHS)
def test_fuzz_from_openapi(path, api, http):
    operation = api[path]["POST"]
    cases = st.one_of(operation.as_strategy(GenerationMode.POSITIVE),
                      operation.as_strategy(GenerationMode.NEGATIVE))
    started = time.monotonic()
    drawn = itertools.count()
    source = "openapi"

    @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, derandomize=True,
              phases=[Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=cases)
    def fuzz(case):
        if time.monotonic() - started > BUDGET_S:
            _counts(source, path)["over_budget"] += 1
            return
        body = case.body
        if next(drawn) % RAW_EVERY:
            body = _small(path, body)
        try:
            sent = json.dumps(body).encode()
        except (TypeError, ValueError):  # not JSON at all (a NOT_SET body, bytes)
            sent = b""
        send(http, source, path, sent)

    n_before = len(VIOLATIONS)
    fuzz()
    assert VIOLATIONS[n_before:] == [], _summary(VIOLATIONS[n_before:])


def _summary(violations: list[dict]) -> str:
    kinds = Counter(v["what"][:120] for v in violations)
    return f"{len(violations)} violations: {dict(kinds)}; first: {violations[0]}"


# ---- hostile bodies -----------------------------------------------------------------

def _raw(obj) -> bytes:
    return json.dumps(obj).encode()


CMPL = {"model": MODEL, "prompt": "Hello", "max_tokens": 4}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}],
        "max_completion_tokens": 4}
INT_FIELDS = {
    "/v1/completions": ["n", "top_k", "seed", "max_tokens", "min_tokens", "logprobs",
                        "stop_token_ids", "prompt"],
    "/v1/chat/completions": ["n", "top_k", "seed", "max_tokens", "max_completion_tokens",
                             "min_tokens", "top_logprobs", "stop_token_ids"],
}
ANY = None  # any status but a 5xx


def _huge_int_cases():
    for path, fields in INT_FIELDS.items():
        base = CMPL if path == "/v1/completions" else CHAT
        for key in fields:
            for value in HUGE:
                body = dict(base, **{key: [value] if key in ("stop_token_ids", "prompt")
                                     else value})
                if key == "top_logprobs":
                    body["logprobs"] = True
                # A seed or a stop token id out of int64 may be served or refused; the rest is
                # a count or a token id out of range.
                expect = ANY if key in ("seed", "stop_token_ids") else {400}
                yield pytest.param(path, _raw(body), expect, id=f"{path}-{key}={value}")


def _deep(depth: int) -> bytes:
    return b'{"model": "tiny-chat", "prompt": ' + b"[" * depth + b"1" + b"]" * depth + b"}"


TOOL_CALL = {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}
C, H = "/v1/completions", "/v1/chat/completions"
HOSTILE = [
    pytest.param(C, _deep(1000), {400}, id="prompt-nested-1000"),
    pytest.param(C, b"[" * 100_000 + b"]" * 100_000, {400}, id="array-nested-100000"),
    pytest.param(H, b'{"messages": ' + b'{"a": ' * 1000 + b"1" + b"}" * 1000 + b"}", {400},
                 id="object-nested-1000"),
    pytest.param(C, b'{"prompt": "hi \\ud800 there", "max_tokens": 4}', {200, 400},
                 id="prompt-lone-surrogate"),
    pytest.param(C, b'{"prompt": ["ok", "\\udfff"], "max_tokens": 4}', {200, 400},
                 id="prompt-list-lone-surrogate"),
    pytest.param(C, b'{"prompt": "hi", "stop": ["\\ud800"], "max_tokens": 4}', {200, 400},
                 id="stop-lone-surrogate"),
    pytest.param(H, b'{"messages": [{"role": "user", "content": "hi \\ud800"}], '
                 b'"max_completion_tokens": 4}', {200, 400}, id="chat-lone-surrogate"),
    pytest.param(H, b'{"messages": [{"role": "user", "content": [{"type": "text", '
                 b'"text": "\\udbff"}]}], "max_completion_tokens": 4}', {200, 400},
                 id="chat-part-lone-surrogate"),
    pytest.param(C, b'{"prompt": "hi", "temperature": NaN, "max_tokens": 4}', {400},
                 id="temperature-NaN"),
    pytest.param(C, b'{"prompt": "hi", "top_p": Infinity, "max_tokens": 4}', {400},
                 id="top_p-Infinity"),
    pytest.param(H, b'{"messages": [{"role": "user", "content": "hi"}], '
                 b'"presence_penalty": -Infinity, "max_completion_tokens": 4}', {400},
                 id="presence_penalty-minus-Infinity"),
    pytest.param(C, b'{"prompt": "\xff\xfe", "max_tokens": 4}', {400}, id="not-utf8"),
    pytest.param(C, b"", {400}, id="empty-body"),
    pytest.param(C, b"null", {400}, id="body-null"),
    pytest.param(H, b"[]", {400}, id="body-array"),
    pytest.param(C, _raw(dict(CMPL, prompt="x " * 600_000)), {413}, id="body-over-1MiB"),
    pytest.param(C, _raw(dict(CMPL, n=10_000)), {400}, id="n=10000"),
    pytest.param(H, _raw(dict(CHAT, n=10_000, stream=True)), {400}, id="chat-n=10000-stream"),
    pytest.param(C, _raw(dict(CMPL, max_tokens=10 ** 6)), {400}, id="max_tokens-beyond-context"),
    pytest.param(C, _raw(dict(CMPL, prompt=[[1, 2]] * 10_000)), {400}, id="10000-prompts"),
    pytest.param(C, _raw(dict(CMPL, stop=[f"s{i}" for i in range(1000)])), ANY,
                 id="1000-stop-strings"),
    pytest.param(H, _raw(dict(CHAT, stop=["x" * 10_000] * 4)), ANY, id="long-stop-strings"),
    pytest.param(H, _raw(dict(CHAT, messages=[{"role": "user", "content": None}])), ANY,
                 id="content-null"),
    pytest.param(H, _raw(dict(CHAT, messages=[{"role": "wizard", "content": "hi"}])), ANY,
                 id="unknown-role"),
    pytest.param(H, _raw(dict(CHAT, messages=[{"role": "user"}])), ANY, id="content-missing"),
    pytest.param(H, _raw(dict(CHAT, messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://10.0.0.1/x.png"}}]}])), ANY,
                 id="image-part"),
    pytest.param(H, _raw(dict(CHAT, tools=[{"type": "function", "function": {
        "name": "get_weather", "parameters": {"type": "object"}}}], tool_choice="auto")), ANY,
                 id="tools"),
    pytest.param(H, _raw(dict(CHAT, response_format={"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object"}}})), ANY, id="response_format"),
    pytest.param(H, _raw(dict(CHAT, messages=[
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [TOOL_CALL]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}])), ANY,
                 id="assistant-tool_calls"),
    pytest.param(H, _raw(dict(CHAT, messages=[])), {400}, id="messages-empty"),
    pytest.param(C, _raw(dict(CMPL, model="nope")), {404}, id="unknown-model"),
    pytest.param(C, _raw(dict(CMPL, prompt=[])), {400}, id="prompt-empty-list"),
    pytest.param(C, _raw(dict(CMPL, prompt=[-1])), {400}, id="prompt-token-negative"),
    pytest.param(C, _raw(dict(CMPL, prompt=[10 ** 9])), {400}, id="prompt-token-beyond-vocab"),
    pytest.param(C, _raw(dict(CMPL, prompt="hi " * 2000)), {400}, id="prompt-beyond-context"),
    *_huge_int_cases(),
]


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=10).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.mark.parametrize("path, sent, expect", HOSTILE)
def test_hostile_body(path, sent, expect, http, server):
    if BROKEN_BY:  # fail fast, naming the culprit, rather than time out case after case
        if not _healthy(server.url):
            pytest.fail(f"the server has been down since case {BROKEN_BY[0]}")
        BROKEN_BY.clear()
    resp = send(http, "hostile", path, sent)
    if resp is None:
        BROKEN_BY.append(f"{path} {sent[:80]!r} (timed out)")
        pytest.fail("no answer within the client timeout")
    assert resp.status_code < 500, resp.text[:500]
    problem = _check_error(resp.json(), sent) if resp.status_code >= 400 else None
    assert problem is None, f"{problem}: {resp.text[:500]}"
    if expect is not None:
        assert resp.status_code in expect, resp.text[:500]
    # One bad request must not take the engine down with it.
    if not _healthy(server.url):
        BROKEN_BY.append(f"{path} {sent[:80]!r}")
        pytest.fail("/health is not 200 after this request")


def test_oversized_chunked_body_is_413(http):
    chunks = (b'{"prompt": "' + b"x" * 65536 for _ in range(20))  # 1.25 MiB, no Content-Length
    resp = send(http, "hostile", C, None, content=chunks)
    assert resp is not None and resp.status_code == 413, resp and resp.text[:500]
    assert _check_error(resp.json(), b"") is None


@pytest.mark.parametrize("headers", [{"Authorization": ""}, {"Authorization": "Bearer wrong"},
                                     {"Authorization": "Basic cmVsaWFiaWxpdHkta2V5"}],
                         ids=["no-key", "wrong-key", "basic-auth"])
def test_bad_api_key_is_401(headers, http):
    resp = send(http, "hostile", C, _raw(CMPL), headers=headers)
    assert resp is not None and resp.status_code == 401, resp and resp.text[:500]
    assert _check_error(resp.json(), b"") is None


def test_server_still_serves_after_fuzz(http, server):
    wait_healthy(server.url, 30)
    resp = http.post(C, json=dict(CMPL, max_tokens=8, ignore_eos=True))
    assert resp.status_code == 200, resp.text[:500]
    assert resp.json()["choices"][0]["text"]
    resp = http.post(H, json=dict(CHAT, max_completion_tokens=8, ignore_eos=True))
    assert resp.status_code == 200, resp.text[:500]
    assert resp.json()["choices"][0]["message"]["content"]
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
