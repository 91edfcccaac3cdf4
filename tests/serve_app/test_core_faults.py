"""The Serve app with its engine core in another process, seen over HTTP: /health
answers at once while a long step runs, a slow reader holds nobody back, and
killing the core gives in-flight clients an OpenAI-style 503 and fails /health."""

import json
import os
import signal
import threading
import time

import httpx
import pytest

from bench.faults import wait_healthy
from conftest import free_port
from serve_app import deploy

pytestmark = pytest.mark.slow

GREEDY = dict(temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def base_url(ray_cluster, tiny_dir):
    from ray import serve

    # A 4,000-token prefill of this model is a step of seconds on two cores.
    model = tiny_dir("llama", hidden_size=512, intermediate_size=2048, num_hidden_layers=6,
                     num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=8192)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(deploy({"model": model, "skip_tokenizer_init": "true", "max_model_len": "8192",
                      "max_num_batched_tokens": "4096", "core_heartbeat_timeout_s": "3",
                      "served_model_name": "slow"}),
              name="faults", route_prefix="/", blocking=False)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, 120)
    yield url
    serve.shutdown()


def _metric(url: str, name: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def _stream_tokens(url: str, body: dict, out: dict, key,
                   first: threading.Event | None = None) -> None:
    """Reads one streamed completion; records its chunks, token count and end time, and
    sets `first` once a token has arrived."""
    chunks, errors = 0, []
    with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True},
                      timeout=120) as resp:
        for line in resp.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            if "error" in data:
                errors.append(data["error"])
            elif data["choices"]:
                chunks += 1
                if first is not None:
                    first.set()
    out[key] = dict(status=resp.status_code, chunks=chunks, errors=errors, done=time.monotonic())


def test_health_answers_while_a_long_step_runs(base_url):
    body = dict(model="slow", prompt=[5] * 4000, max_tokens=2, **GREEDY)
    results: dict = {}
    worker = threading.Thread(target=_stream_tokens, args=(base_url, body, results, 0))
    worker.start()
    deadline = time.monotonic() + 60
    while _metric(base_url, "spmd_engine_step_in_flight_seconds") < 0.5:  # the long prefill
        assert time.monotonic() < deadline
        time.sleep(0.05)
    timings = []
    for _ in range(5):
        t0 = time.perf_counter()
        status = httpx.get(f"{base_url}/health", timeout=10).status_code
        timings.append(time.perf_counter() - t0)
        assert status == 200
    still_running = worker.is_alive()
    worker.join(120)
    assert still_running  # the checks overlapped the long step
    assert max(timings) < 1.0, timings
    assert results[0]["status"] == 200 and not results[0]["errors"]


def test_slow_reader_holds_nobody_back(base_url):
    body = dict(model="slow", prompt=[1, 2, 3], max_tokens=64, **GREEDY)
    results: dict = {}

    def slow_reader():
        with httpx.stream("POST", f"{base_url}/v1/completions", json={**body, "stream": True},
                          timeout=120) as resp:
            tokens = 0
            for line in resp.iter_lines():
                time.sleep(0.05)
                if line.startswith("data: {"):
                    tokens += len(json.loads(line[6:])["choices"][:1])
        results["slow"] = dict(done=time.monotonic(), chunks=tokens)

    threads = [threading.Thread(target=slow_reader)]
    threads += [threading.Thread(target=_stream_tokens, args=(base_url, body, results, i))
                for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert all(results[i]["status"] == 200 and results[i]["chunks"] >= 1 for i in range(4))
    assert results["slow"]["chunks"] >= 1
    assert max(results[i]["done"] for i in range(4)) < results["slow"]["done"]


def test_killing_the_core_gives_503_and_fails_health(base_url, ray_cluster):
    import ray

    cores = [a for a in ray.util.list_named_actors(all_namespaces=True)
             if a["name"].startswith("spmd-engine-core-")]
    assert len(cores) == 1
    core = ray.get_actor(cores[0]["name"], namespace=cores[0]["namespace"])
    pid = ray.get(core.ready.remote())["pid"]
    body = dict(model="slow", prompt=[1, 2, 3], max_tokens=3000, **GREEDY)
    results: dict = {}
    firsts = [threading.Event() for _ in range(3)]
    streams = [threading.Thread(target=_stream_tokens, args=(base_url, body, results, i, firsts[i]))
               for i in range(3)]
    for t in streams:
        t.start()

    def whole():
        resp = httpx.post(f"{base_url}/v1/completions", json=body, timeout=120)
        results["whole"] = resp

    plain = threading.Thread(target=whole)
    plain.start()
    deadline = time.monotonic() + 60
    # Every stream has its first token (its 200 is sent) and the whole request runs too.
    while _metric(base_url, "spmd_num_requests_running") < 4 or not all(e.is_set() for e in firsts):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    killed_at = time.monotonic()
    for t in [*streams, plain]:
        t.join(60)
    for i in range(3):
        assert results[i]["status"] == 200  # the stream had begun: the error comes in-band
        assert results[i]["errors"] and results[i]["errors"][0]["type"] == "server_error"
        assert results[i]["errors"][0]["code"] == "engine_unavailable"
        assert results[i]["done"] - killed_at < 10
    whole_resp = results["whole"]
    assert whole_resp.status_code == 503
    assert whole_resp.json()["error"]["code"] == "engine_unavailable"
    health = httpx.get(f"{base_url}/health", timeout=5)
    assert health.status_code == 503 and "engine unhealthy" in health.json()["error"]["message"]
