"""Soak: waves of 256 concurrent streams (completions and chat, n=1 and 2, with and
without stop strings, half through the real ``openai`` client, half through raw httpx)
for SPMD_SOAK_S seconds (10 by default). Every stream must finish every choice with
exact usage and no 5xx; afterwards the KV cache is free again, the replica's and the
engine's memory has not grown, and no actor or /dev/shm entry outlives the app."""

import asyncio
import json
import os
import time
from collections import Counter
from dataclasses import dataclass

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from reliability_server import (  # noqa: F401 (server: a fixture)
    API_KEY,
    MODEL,
    alive_actors,
    server,
    shm_entries,
    write_figures,
)

pytestmark = pytest.mark.slow

CONCURRENCY = 256
SOAK_S = float(os.environ.get("SPMD_SOAK_S", "10"))  # a test knob, not server behaviour
RSS_GROWTH_LIMIT_MIB = 200
STREAM_TIMEOUT_S = 300
PROMPTS = ["The capital of France is", "Once upon a time", "1 2 3 4 5",
           "Write a haiku about the sea.", "def fibonacci(n):"]
STOP = ["e", "\n"]


@dataclass(frozen=True)
class Spec:
    chat: bool
    via_openai: bool
    n: int
    max_tokens: int
    stop: list[str] | None
    include_usage: bool
    prompt: str


def wave_specs(wave: int) -> list[Spec]:
    specs = []
    for j in range(CONCURRENCY):
        i = wave * CONCURRENCY + j
        specs.append(Spec(chat=j % 2 == 1, via_openai=j % 4 < 2, n=2 if i % 5 == 0 else 1,
                          max_tokens=8 + i % 9, stop=STOP if i % 3 == 0 else None,
                          include_usage=i % 7 != 0, prompt=PROMPTS[i % len(PROMPTS)]))
    return specs


def _body(spec: Spec) -> dict:
    body = dict(model=MODEL, n=spec.n, stop=spec.stop, stream=True, temperature=1.0,
                stream_options={"include_usage": spec.include_usage})
    if spec.chat:
        # top_logprobs=0: one entry per generated token, to count them.
        return dict(body, messages=[{"role": "user", "content": spec.prompt}],
                    max_completion_tokens=spec.max_tokens, logprobs=True, top_logprobs=0)
    return dict(body, prompt=spec.prompt, max_tokens=spec.max_tokens, logprobs=0)


_SAMPLING_EXTRAS = {"ignore_eos": True}  # vLLM's extra: the length of each choice is known


async def _via_openai(client: openai.AsyncOpenAI, spec: Spec) -> tuple[int, list[dict]]:
    body = _body(spec)
    create = client.chat.completions.create if spec.chat else client.completions.create
    try:
        stream = await create(**body, extra_body=_SAMPLING_EXTRAS)
        return 200, [chunk.model_dump() async for chunk in stream]
    except openai.APIStatusError as e:
        return e.status_code, [{"error": e.message}]


async def _via_httpx(client: httpx.AsyncClient, spec: Spec) -> tuple[int, list[dict]]:
    path = "/v1/chat/completions" if spec.chat else "/v1/completions"
    async with client.stream("POST", path, json={**_body(spec), **_SAMPLING_EXTRAS}) as resp:
        if resp.status_code != 200:
            return resp.status_code, [{"error": (await resp.aread()).decode()}]
        chunks = []
        async for line in resp.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[6:]))
        return 200, chunks


def check_stream(spec: Spec, chunks: list[dict], prompt_tokens: int) -> tuple[int, str | None]:
    """(tokens generated, what is wrong with the stream or None)."""
    finish: dict[int, str] = {}
    tokens: Counter = Counter()
    usage = None
    for chunk in chunks:
        if chunk.get("error") is not None:
            return 0, f"error: {chunk['error']}"
        if chunk.get("usage"):  # the openai client's dump adds *_details keys (None)
            usage = {k: chunk["usage"][k] for k in ("prompt_tokens", "completion_tokens",
                                                     "total_tokens")}
        for c in chunk["choices"]:
            if c["index"] in finish:
                return 0, f"choice {c['index']}: a chunk after its finish_reason"
            lp = c.get("logprobs") or {}
            tokens[c["index"]] += len((lp.get("content") if spec.chat else lp.get("tokens"))
                                      or [])
            if c.get("finish_reason"):
                finish[c["index"]] = c["finish_reason"]
    if set(finish) != set(range(spec.n)):
        return 0, f"finish_reason for choices {sorted(finish)} of {spec.n}"
    if spec.stop is None and set(finish.values()) != {"length"}:
        return 0, f"finish_reason {finish} without stop strings and with ignore_eos"
    generated = sum(tokens.values())
    if spec.stop is None and generated != spec.n * spec.max_tokens:
        return 0, f"{generated} tokens streamed, not n * max_tokens = {spec.n * spec.max_tokens}"
    if not spec.include_usage:
        return generated, None if usage is None else "usage without include_usage"
    if usage is None:
        return 0, "no usage chunk"
    want_completion = generated if spec.stop is None else usage["completion_tokens"]
    want = dict(prompt_tokens=prompt_tokens, completion_tokens=want_completion,
                total_tokens=prompt_tokens + want_completion)
    if usage != want or usage["completion_tokens"] > spec.n * spec.max_tokens \
            or usage["completion_tokens"] < generated:
        return 0, f"usage {usage}, want {want} (streamed {generated} tokens)"
    return max(generated, usage["completion_tokens"]), None


def _metrics(url: str, headers: dict) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", headers=headers, timeout=30).text
    return {s.name: s.value for fam in text_string_to_metric_families(text) for s in fam.samples
            if not s.labels}


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def _shm_in_use(pids: list[int]) -> set[str]:
    """/dev/shm entries these processes map or hold open (unlinked ones left out)."""
    found = set()
    for pid in pids:
        with open(f"/proc/{pid}/maps") as f:
            found |= {line.split()[-1] for line in f
                      if "/dev/shm/" in line and not line.rstrip().endswith("(deleted)")}
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("/dev/shm/"):
                found.add(target)
    return found


def _wait_for(predicate, timeout_s: float, interval_s: float = 0.25):
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval_s)


@pytest.fixture(scope="module")
def prompt_tokens(smollm2_tokenizer) -> dict[tuple[bool, str], int]:
    """Prompt tokens of each prompt as the server counts them (chat: the template's)."""
    tok = smollm2_tokenizer
    out = {}
    for p in PROMPTS:
        out[(False, p)] = len(tok.encode(p))
        text = tok.apply_chat_template([{"role": "user", "content": p}],
                                       add_generation_prompt=True, tokenize=False)
        out[(True, p)] = len(tok.encode(text, add_special_tokens=False))
    return out


async def _run_wave(url: str, wave: int, oai: openai.AsyncOpenAI, raw: httpx.AsyncClient,
                    prompt_tokens: dict) -> tuple[int, list[str], int]:
    """(streams completed, problems, tokens generated) of one wave."""
    specs = wave_specs(wave)
    results = await asyncio.gather(*[
        _via_openai(oai, s) if s.via_openai else _via_httpx(raw, s) for s in specs])
    problems, completed, generated = [], 0, 0
    for spec, (status, chunks) in zip(specs, results):
        if status != 200:
            problems.append(f"status {status}: {chunks[0]['error']!s:.300} ({spec})")
            continue
        tokens, problem = check_stream(spec, chunks, prompt_tokens[(spec.chat, spec.prompt)])
        if problem:
            problems.append(f"{problem} ({spec})")
        else:
            completed += 1
            generated += tokens
    return completed, problems, generated


async def _soak(url: str, headers: dict, prompt_tokens: dict, seconds: float,
                first_wave: int = 0) -> dict:
    limits = httpx.Limits(max_connections=CONCURRENCY * 2, max_keepalive_connections=CONCURRENCY)
    timeout = httpx.Timeout(STREAM_TIMEOUT_S, connect=60)
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits,
                                 timeout=timeout) as raw, \
            httpx.AsyncClient(limits=limits, timeout=timeout) as oai_http:
        oai = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0,
                                 http_client=oai_http)
        started = time.monotonic()
        waves, completed, generated, problems = 0, 0, 0, []
        while waves == 0 or time.monotonic() - started < seconds:
            done, wave_problems, tokens = await _run_wave(url, first_wave + waves, oai, raw,
                                                          prompt_tokens)
            waves += 1
            completed += done
            generated += tokens
            problems += wave_problems
        elapsed = time.monotonic() - started
    return dict(waves=waves, streams=waves * CONCURRENCY, completed=completed,
                tokens=generated, seconds=round(elapsed, 1),
                tok_per_s=round(generated / elapsed, 1), problems=problems)


def test_soak(server, prompt_tokens):
    url, headers = server.url, server.headers
    ours = {i: a for i, a in alive_actors().items() if i not in server.actors_before}
    replica = [a.pid for a in ours.values() if a.class_name.startswith("ServeReplica")
               and a.class_name.endswith(":LLMServer")]
    core = [a.pid for a in ours.values() if a.name.startswith("spmd-engine-core-")]
    assert len(replica) == 1 and len(core) == 1, ours
    engine_pids = {"replica": replica[0], "engine_core": core[0],
                   **{f"rank{k}": a.pid for k, a in enumerate(
                       a for a in ours.values() if a.class_name == "RankActor")}}
    start = _metrics(url, headers)
    total_blocks = start["spmd_kv_cache_blocks"]

    warm = asyncio.run(_soak(url, headers, prompt_tokens, 0))  # one wave
    assert warm["problems"] == [], warm["problems"][:5]
    actors_warm = alive_actors()
    rss_before = {k: round(_rss_mib(pid), 1) for k, pid in engine_pids.items()}

    soak = asyncio.run(_soak(url, headers, prompt_tokens, SOAK_S, first_wave=1))
    rss_after = {k: round(_rss_mib(pid), 1) for k, pid in engine_pids.items()}
    idle = _wait_for(lambda: (m := _metrics(url, headers))["spmd_num_requests_running"] == 0
                     and m["spmd_num_requests_waiting"] == 0
                     and m["spmd_kv_cache_free_blocks"] == start["spmd_kv_cache_free_blocks"]
                     and m, 30) or _metrics(url, headers)
    actors_after = alive_actors()
    shm_used = _shm_in_use(list(engine_pids.values()))

    server.shutdown()
    gone = _wait_for(lambda: alive_actors().keys() <= server.actors_before.keys(), 60)
    leftover = {i: a for i, a in alive_actors().items() if i not in server.actors_before}
    shm_left = sorted(p for p in shm_used if os.path.exists(p))
    shm_new = sorted(shm_entries() - server.shm_before)

    figures = dict(
        concurrency=CONCURRENCY, soak_s=SOAK_S, waves=soak["waves"],
        streams=soak["streams"], streams_completed=soak["completed"],
        tokens=soak["tokens"], seconds=soak["seconds"], tok_per_s=soak["tok_per_s"],
        problems=len(soak["problems"]), first_problems=soak["problems"][:10],
        rss_mib_before=rss_before, rss_mib_after=rss_after,
        kv_blocks=total_blocks, kv_free_blocks_start=start["spmd_kv_cache_free_blocks"],
        kv_free_blocks_after=idle["spmd_kv_cache_free_blocks"],
        kv_usage_after=idle["spmd_kv_cache_usage_perc"],
        running_after=idle["spmd_num_requests_running"],
        waiting_after=idle["spmd_num_requests_waiting"],
        actors_new_during_soak=sorted(a.class_name for i, a in actors_after.items()
                                      if i not in actors_warm),
        actors_gone_during_soak=sorted(a.class_name for i, a in actors_warm.items()
                                       if i not in actors_after),
        actors_left_after_teardown=sorted(f"{a.class_name} {a.name}" for a in leftover.values()),
        shm_entries_before=len(server.shm_before), shm_entries_after_teardown=len(
            server.shm_before) + len(shm_new), shm_new_after_teardown=shm_new[:20],
        shm_held_by_engine=sorted(shm_used), shm_held_left_after_teardown=shm_left)
    write_figures("soak", figures)

    assert soak["problems"] == [], f"{len(soak['problems'])} bad streams: {soak['problems'][:5]}"
    assert soak["completed"] == soak["streams"]
    assert idle["spmd_num_requests_running"] == 0 and idle["spmd_num_requests_waiting"] == 0
    assert idle["spmd_kv_cache_free_blocks"] == start["spmd_kv_cache_free_blocks"], figures
    assert idle["spmd_kv_cache_usage_perc"] == 0
    for k in engine_pids:
        assert rss_after[k] - rss_before[k] < RSS_GROWTH_LIMIT_MIB, (k, rss_before, rss_after)
    assert actors_after.keys() == actors_warm.keys(), figures
    assert gone, f"actors alive after serve.shutdown(): {figures['actors_left_after_teardown']}"
    assert shm_left == [], shm_left
    assert shm_new == [], f"/dev/shm entries new after teardown: {shm_new[:20]}"
