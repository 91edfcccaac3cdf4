"""Fault injection against a real Serve app: the figures of RELIABILITY.md.

    python -m bench.faults --model DIR [--engine-arg k=v ...] [--faults fail,kill-rank,...]
                           [--offline-lifetime] [--json-out F]

Each fault runs while streams are in flight: ``fail`` (one step raises on rank 0),
``kill-rank`` / ``kill-core`` (SIGKILL of rank 0 / the engine core), ``hang`` (rank 0
stalls past ``step_timeout_s``). For each: when the clients heard (a clean OpenAI error
in-band), when ``/health`` was 200 again, and whether a later request gets the tokens
it got before the fault. ``--offline-lifetime`` times two ``LLM``s in a row in one
process (the first deleted, not shut down). The tests in ``tests/reliability`` use the
same helpers."""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import signal
import threading
import time

import httpx

PROMPT = [5, 17, 42, 99, 3, 8, 250, 11]
GREEDY = dict(prompt=PROMPT, temperature=0, ignore_eos=True)
INTERNALS = re.compile(r"Traceback|File \"|/work/|\.py\b|ActorID|actor_id|pid\b|"
                       r"\b\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}\b")


def wait_healthy(base: str, timeout_s: float) -> float:
    """Seconds until ``/health`` is 200; AssertionError after ``timeout_s``."""
    t0 = time.monotonic()
    while True:
        try:
            if httpx.get(f"{base}/health", timeout=5).status_code == 200:
                return time.monotonic() - t0
        except httpx.HTTPError:
            pass
        assert time.monotonic() - t0 < timeout_s, f"not healthy after {timeout_s:.0f} s"
        time.sleep(0.2)


def complete(base: str, **body) -> httpx.Response:
    return httpx.post(f"{base}/v1/completions", json={**GREEDY, **body}, timeout=120)


def reference_text(base: str) -> str:
    resp = complete(base, max_tokens=12)
    assert resp.status_code == 200, resp.text
    return resp.json()["choices"][0]["text"]


def assert_clean(error: dict) -> None:
    """An OpenAI error body with nothing internal in it."""
    assert set(error) >= {"message", "type"}, error
    assert not INTERNALS.search(error["message"]), error["message"]


class Stream(threading.Thread):
    """One streamed completion read in the background: chunks, its error, when it ended."""

    def __init__(self, base: str, max_tokens: int):
        super().__init__(daemon=True)
        self.base, self.max_tokens = base, max_tokens
        self.chunks, self.error, self.ended = 0, None, None
        self.started = threading.Event()

    def run(self):
        body = {**GREEDY, "max_tokens": self.max_tokens, "stream": True}
        try:
            with httpx.stream("POST", f"{self.base}/v1/completions", json=body,
                              timeout=300) as resp:
                for line in resp.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    data = json.loads(line[6:])
                    if "error" in data:
                        self.error = data["error"]
                    else:
                        self.chunks += 1
                        self.started.set()
        finally:
            self.ended = time.monotonic()
            self.started.set()


def metric(base: str, name: str, headers: dict | None = None) -> float:
    for line in httpx.get(f"{base}/metrics", headers=headers, timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def actors(class_name: str) -> list[dict]:
    """Alive actors of a class in this driver's cluster (from the GCS; no dashboard)."""
    from ray._private import state

    return [a for a in state.actors().values()
            if a["ActorClassName"] == class_name and a["State"] == "ALIVE"]


def inject(kind: str, arg) -> None:
    """A fault on rank 0, through its control thread: ("fail", message) or ("hang", s)."""
    import ray

    rank = next(a for a in ray.util.list_named_actors(all_namespaces=True)
                if a["name"].startswith("spmd-rank-") and a["name"].endswith("-0"))
    ray.get(ray.get_actor(rank["name"], namespace=rank["namespace"]).inject_fault.remote(kind, arg))


def kill(class_name: str) -> None:
    os.kill(actors(class_name)[0]["Pid"], signal.SIGKILL)


FAULTS = {
    "fail": lambda hang_s: inject("fail", "injected fault"),
    "kill-rank": lambda hang_s: kill("RankActor"),
    "kill-core": lambda hang_s: kill("EngineCoreActor"),
    "hang": lambda hang_s: inject("hang", hang_s),
}


def fault_and_recover(base: str, fault: str, *, num_streams: int = 3, max_tokens: int = 4000,
                      hang_s: float = 120, heard_bound_s: float = 60,
                      healthy_bound_s: float = 300) -> dict:
    """Runs one fault under ``num_streams`` streams; its figures. Asserts that every
    stream ended with a clean error, the app is healthy again and serves the same text."""
    ref = reference_text(base)
    restarts = metric(base, "spmd_engine_core_restarts")
    streams = [Stream(base, max_tokens) for _ in range(num_streams)]
    for s in streams:
        s.start()
    for s in streams:
        assert s.started.wait(120), "a stream never started"
    t0 = time.monotonic()
    FAULTS[fault](hang_s)
    for s in streams:
        s.join(heard_bound_s)
        assert s.ended is not None, f"{fault}: a stream never ended"
        assert s.error is not None, f"{fault}: a stream ended without an error"
        assert_clean(s.error)
    heard_s = max(s.ended for s in streams) - t0
    wait_healthy(base, healthy_bound_s)
    healthy_s = time.monotonic() - t0
    assert reference_text(base) == ref, f"{fault}: different text after recovery"
    rebuilt = metric(base, "spmd_engine_core_restarts") - restarts
    assert metric(base, "spmd_engine_healthy") == 1
    return dict(streams_in_flight=num_streams, clients_heard_s=round(heard_s, 2),
                healthy_again_s=round(healthy_s, 1), core_rebuilt=int(rebuilt),
                same_text_after=True, error_code=streams[0].error.get("code"))


def offline_lifetime(model: str, engine_kwargs: dict) -> dict:
    """Two ``LLM``s in a row in one process, the first only deleted: both start times."""
    from spmd import LLM, SamplingParams

    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    out = {}
    for name in ("first", "second"):
        t0 = time.monotonic()
        llm = LLM(model, **engine_kwargs)
        out[f"{name}_start_s"] = round(time.monotonic() - t0, 1)
        text = llm.generate([{"prompt_token_ids": PROMPT}], params, use_tqdm=False)
        out[f"{name}_tokens"] = text[0].outputs[0].token_ids
        del llm, text
        gc.collect()
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--engine-arg", action="append", default=[], help="k=v, as serve_app:deploy")
    p.add_argument("--faults", default="fail,kill-rank,kill-core,hang")
    p.add_argument("--max-tokens", type=int, default=4000, help="of the streams in flight")
    p.add_argument("--hang-s", type=float, default=600)
    p.add_argument("--offline-lifetime", action="store_true")
    p.add_argument("--json-out")
    args = p.parse_args(argv)
    engine = dict(kv.split("=", 1) for kv in args.engine_arg)
    results: dict = {"model": args.model, "engine_args": engine}

    import ray
    from ray import serve

    from serve_app import deploy

    ray.init(include_dashboard=False)
    if args.offline_lifetime:
        kwargs = {k: _typed(v) for k, v in engine.items() if k not in ("step_timeout_s",)}
        results["offline_lifetime"] = offline_lifetime(args.model, kwargs)
        print("offline lifetime:", results["offline_lifetime"], flush=True)
    port = 8000
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    t0 = time.monotonic()
    serve.run(deploy({"model": args.model, **engine}), name="faults", route_prefix="/",
              blocking=False)
    base = f"http://127.0.0.1:{port}"
    wait_healthy(base, 900)
    results["start_s"] = round(time.monotonic() - t0, 1)
    for fault in [f for f in args.faults.split(",") if f]:
        results[fault] = fault_and_recover(base, fault, max_tokens=args.max_tokens,
                                           hang_s=args.hang_s)
        print(fault, results[fault], flush=True)
    serve.shutdown()
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(results, f, indent=1)


def _typed(value: str):
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(value.lower(), value)


if __name__ == "__main__":
    main()
