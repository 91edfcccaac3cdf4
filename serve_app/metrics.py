"""Prometheus metrics of one replica (its own registry), served at ``GET /metrics``."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from spmd import RequestOutput

_LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                      120.0)
_TOKEN_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5,
                    0.75, 1.0, 2.5)


class ServerMetrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("spmd_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("spmd_prompt_tokens", "Prompt tokens of finished or aborted "
                                     "requests", registry=r)
        self.embedding_inputs = Counter("spmd_embedding_inputs", "Inputs embedded (a string or "
                                        "a token-id list each; their tokens count as prompt "
                                        "tokens)", registry=r)
        self.generation_tokens = Counter("spmd_generation_tokens", "Generated tokens", registry=r)
        self.ttft = Histogram("spmd_time_to_first_token_seconds", "Request arrival to its first "
                              "token", buckets=_LATENCY_BUCKETS_S, registry=r)
        self.tpot = Histogram("spmd_time_per_output_token_seconds", "Inter-token latency: (last "
                              "token - first token) / (tokens - 1), per request",
                              buckets=_TOKEN_BUCKETS_S, registry=r)
        self.e2e = Histogram("spmd_e2e_request_latency_seconds", "Request arrival to its last "
                             "token", buckets=_LATENCY_BUCKETS_S, registry=r)
        self.running = Gauge("spmd_num_requests_running", "Requests in the running batch",
                             registry=r)
        self.waiting = Gauge("spmd_num_requests_waiting", "Requests waiting to be scheduled",
                             registry=r)
        self.kv_usage = Gauge("spmd_kv_cache_usage_perc", "Fraction of KV-cache blocks in use "
                              "(0 to 1)", registry=r)
        self.kv_free_blocks = Gauge("spmd_kv_cache_free_blocks", "KV-cache blocks free to "
                                    "allocate (cached-but-unreferenced included)", registry=r)
        self.step_in_flight = Gauge("spmd_engine_step_in_flight_seconds", "How long the engine "
                                    "step in flight has run (0 between steps), as of the core's "
                                    "last heartbeat", registry=r)
        self.kv_blocks = Gauge("spmd_kv_cache_blocks", "KV-cache blocks in all", registry=r)
        self.core_restarts = Gauge("spmd_engine_core_restarts", "Times this replica rebuilt its "
                                   "engine core (ranks, graph) after a failure", registry=r)
        self.failed_steps = Gauge("spmd_engine_failed_steps", "Steps that raised on the ranks "
                                  "(their requests failed; the engine went on)", registry=r)
        self.healthy = Gauge("spmd_engine_healthy", "1 while the engine core serves, 0 while it "
                             "is down or being rebuilt", registry=r)

    def render(self, stats: dict) -> bytes:
        """Prometheus text, with the gauges read from ``AsyncEngine.stats()`` now."""
        self.running.set(stats["num_running"])
        self.waiting.set(stats["num_waiting"])
        self.kv_usage.set(stats["kv_usage"])
        self.kv_free_blocks.set(stats["num_free_blocks"])
        self.kv_blocks.set(stats["num_kv_blocks"])
        self.step_in_flight.set(stats["step_running_s"])
        self.core_restarts.set(stats.get("num_core_restarts", 0))
        self.failed_steps.set(stats.get("num_failed_steps", 0))
        self.healthy.set(1 if stats.get("healthy", True) else 0)
        return generate_latest(self.registry)

    def timer(self, start: float) -> RequestTimer:
        return RequestTimer(self, start)


class RequestTimer:
    """Latencies and token counts of one engine request, from the deltas it streams."""

    def __init__(self, metrics: ServerMetrics, start: float):
        self.metrics = metrics
        self.start = start  # time.perf_counter() when the HTTP request arrived
        self.first_token_at: float | None = None
        self.prompt_tokens = 0
        self.tokens: dict[int, int] = {}  # completion index -> tokens so far
        self.seen = False
        self.finished = False

    def observe(self, out: RequestOutput) -> None:
        self.seen = True
        self.prompt_tokens = len(out.prompt_token_ids)
        for c in out.outputs:
            self.tokens[c.index] = self.tokens.get(c.index, 0) + len(c.token_ids)
        if self.first_token_at is None and any(self.tokens.values()):
            self.first_token_at = time.perf_counter()
            self.metrics.ttft.observe(self.first_token_at - self.start)
        self.finished = out.finished

    def done(self) -> None:
        """Called once, finished or not; latencies count only for finished requests."""
        if not self.seen:
            return
        m = self.metrics
        m.prompt_tokens.inc(self.prompt_tokens)
        m.generation_tokens.inc(sum(self.tokens.values()))
        if not self.finished:
            return
        now = time.perf_counter()
        m.e2e.observe(now - self.start)
        longest = max(self.tokens.values(), default=0)
        if self.first_token_at is not None and longest > 1:
            m.tpot.observe((now - self.first_token_at) / (longest - 1))
