"""``bench.serving``: the whole HTTP-vs-offline comparison on a tiny model in one
call of ``main()``, and the argument checks."""

from __future__ import annotations

import json

import pytest

from bench import serving


@pytest.mark.slow
def test_start_server_sweep_from_client_processes_and_offline_compare(tmp_path, ray_cluster,
                                                                     tiny_chat_model, capsys):
    """One server for the whole command: a concurrency sweep (1, then 4) spread over
    ``--num-clients 2`` (one client at concurrency 1: no more processes than slots), every
    request complete with exact token counts, ``--serve-env`` recorded, offline
    ``LLM.generate`` on the fastest level's prompts, the JSON line, file and plot."""
    out_json, png = tmp_path / "serving.json", tmp_path / "latency.png"
    record = serving.main(["--start-server", tiny_chat_model, "--engine-arg", "max_model_len=512",
                           "--num-prompts", "8", "--concurrency", "--sweep", "1,4",
                           "--input-len", "16", "--output-len", "8", "--num-clients", "2",
                           "--serve-env", "SPMD_BENCH_SERVING_TEST=1",
                           "--json-out", str(out_json), "--plot", str(png)])
    out = capsys.readouterr().out
    printed = json.loads(out.strip().splitlines()[-1])
    assert printed == record == json.loads(out_json.read_text())
    assert "Successful requests" in out and "HTTP/offline" in out and "Client processes" in out
    assert record["num_clients"] == 2
    assert record["serve_env"] == {"SPMD_BENCH_SERVING_TEST": "1"}
    assert [(b["load"], b["level"]) for b in record["levels"]] == [("concurrency", 1),
                                                                    ("concurrency", 4)]
    for level, clients in zip(record["levels"], (1, 2)):
        assert (level["completed"], level["failed"]) == (8, 0)
        assert level["output_tokens"] == 8 * 8 and level["prompt_tokens"] == 8 * 16
        assert level["requests_per_s"] > 0 and level["output_tokens_per_s"] > 0
        assert level["total_tokens_per_s"] == pytest.approx(3 * level["output_tokens_per_s"],
                                                            rel=0.01)
        for stat in ("mean", "p50", "p99"):
            assert 0 < level["ttft_ms"][stat] <= level["e2e_ms"][stat]
            assert level["tpot_ms"][stat] > 0
        assert level["ttft_ms"]["p50"] <= level["ttft_ms"]["p99"]
        assert level["num_clients"] == clients and level["client_cpu_util"] > 0
        assert 0 < level["client_cpu_util_max"] <= level["client_cpu_util"]
    assert "Client CPU" in out and "Failed replica health checks" in out
    assert isinstance(record["health_check_failures"], int) and record["health_check_failures"] >= 0
    offline = record["offline"]
    best = max(record["levels"], key=lambda b: b["output_tokens_per_s"])
    assert offline["vs_level"] == best["level"]
    assert offline["output_tokens"] == 64 and offline["output_tokens_per_s"] > 0
    assert offline["http_over_offline"] == pytest.approx(
        best["output_tokens_per_s"] / offline["output_tokens_per_s"], rel=1e-3)
    assert png.stat().st_size > 0


@pytest.mark.parametrize("n, load, level, clients, expected", [
    (8, "concurrency", 4, 2, [([0, 2, 4, 6], 2), ([1, 3, 5, 7], 2)]),
    (8, "concurrency", 3, 2, [([0, 2, 3, 5, 6], 2), ([1, 4, 7], 1)]),  # by slot: 2 + 1
    (8, "concurrency", 1, 2, [(list(range(8)), 1)]),  # no more processes than slots
    (5, "request_rate", float("inf"), 3, [([0, 3], 2), ([1, 4], 2), ([2], 1)]),
    (2, "request_rate", 2.0, 4, [([0], 1), ([1], 1)]),  # nor than requests
])
def test_split_level(n, load, level, clients, expected):
    assert serving.split_level(n, load, level, clients) == expected


REPLICA = "Replica(id='43qmx4aw', deployment='LLMServer', app='bench-serving')"
CONTROLLER_LINES = {  # as the Ray 2.60 controller writes them
    "error": f"WARNING 2026-12-01 19:29:12,822 controller 16120 -- Health check for {REPLICA} "
             "failed: ray::ServeReplica:bench-serving:LLMServer.check_health() (pid=16205)",
    "timeout": "WARNING 2026-12-01 19:29:15,864 controller 16120 -- Didn't receive health check "
               f"response for replica {REPLICA} after 1.0s, marking it unhealthy.",
    "crashed": f"WARNING 2026-12-01 19:29:16,001 controller 16120 -- Actor for {REPLICA} crashed, "
               "marking it unhealthy immediately.",
    None: f"WARNING 2026-12-01 19:29:17,002 controller 16120 -- Replica {REPLICA} failed the "
          "health check 3 times in a row, marking it unhealthy.\n"
          f"WARNING 2026-12-01 19:29:17,003 controller 16120 -- Replica {REPLICA} failed health "
          "check, stopping it.\n"
          f"INFO 2026-12-01 19:29:13,870 controller 16120 -- {REPLICA} passed the health check "
          "after 1 consecutive failures.",
}


def test_controller_logs_count_failed_health_checks_appended_since_start(tmp_path):
    serve_dir = tmp_path / "logs" / "serve"
    serve_dir.mkdir(parents=True)
    old, rotated = serve_dir / "controller_1.log", serve_dir / "controller_2.log"
    old.write_text(CONTROLLER_LINES["error"] + "\n")  # before the start: not counted
    rotated.write_text("INFO ... controller 2 -- Controller starting\n" * 5)
    logs = serving.ControllerLogs(str(tmp_path))
    assert logs.count() == dict(total=0, error=0, timeout=0, crashed=0)
    with old.open("a") as f:
        f.write("\n".join(CONTROLLER_LINES.values()) + "\n")
    (serve_dir / "controller_3.log").write_text(CONTROLLER_LINES["timeout"] + "\n")  # new
    rotated.rename(str(rotated) + ".1")  # rotated meanwhile: its tail, then the new file
    with open(str(rotated) + ".1", "a") as f:
        f.write(CONTROLLER_LINES["crashed"] + "\n")
    rotated.write_text(CONTROLLER_LINES["error"] + "\n")
    assert logs.count() == dict(total=6, error=2, timeout=2, crashed=2)
    assert serving.ControllerLogs(str(tmp_path / "elsewhere")).count() is None


@pytest.mark.parametrize("argv, message", [
    (["--concurrency", "4", "--request-rate", "2"], "give one of them"),
    (["--sweep", "1,2"], "say what it sweeps"),
    (["--concurrency", "4", "--sweep", "1,2"], "without one"),
    (["--concurrency"], "needs a value"),
    (["--concurrency", "--sweep", "1,x"], "comma-separated ints"),
    (["--request-rate", "0"], "must be > 0"),
    (["--num-prompts", "0"], "--num-prompts: must be >= 1"),
    (["--engine-arg", "max_model_len=512"], "needs --start-server"),
    (["--serve-env", "RAY_SERVE_THROUGHPUT_OPTIMIZED=1"], "--serve-env: needs --start-server"),
    (["--start-server", "m", "--serve-env", "RAY_SERVE_X"], "--serve-env: expected KEY=VALUE"),
    (["--num-clients", "0"], "--num-clients: must be >= 1"),
    (["--start-server", "m", "--base-url", "http://127.0.0.1:1"], "give one of them"),
    (["--start-server", "m", "--engine-arg", "nonsense"], "KEY=VALUE"),
    (["--start-server", "m", "--engine-arg", "max_modle_len=512"], "unknown argument"),
])
def test_rejects_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit):
        serving.parse_args(argv)
    assert message in capsys.readouterr().err


def test_load_levels_and_request_bodies():
    args = serving.parse_args(["--request-rate", "--sweep", "0.5,inf", "--endpoint", "chat"])
    assert (args.load, args.levels, args.base_url) == ("request_rate", [0.5, float("inf")],
                                                       "http://127.0.0.1:8000")
    assert serving.parse_args([]).levels == [float("inf")]
    workload = serving.make_workload(serving.parse_args(["--num-prompts", "2", "--input-len", "5",
                                                         "--output-len", "3"]), 100)
    [body, _] = serving.request_bodies(workload, "completions", "m")
    assert body["prompt"] == workload.prompts[0] and body["max_tokens"] == 3
    assert body["ignore_eos"] and body["stream_options"] == {"include_usage": True}
    [chat, _] = serving.request_bodies(workload, "chat", None)
    assert "model" not in chat and chat["max_completion_tokens"] == 3
    assert len(chat["messages"][0]["content"].split()) == 5
