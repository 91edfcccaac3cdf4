"""``bench.serving``: the whole HTTP-vs-offline comparison on a tiny model in one
call of ``main()``, and the argument checks."""

from __future__ import annotations

import json

import pytest

from bench import serving


@pytest.mark.slow
def test_start_server_load_and_offline_compare(tmp_path, ray_cluster, tiny_chat_model, capsys):
    out_json, png = tmp_path / "serving.json", tmp_path / "latency.png"
    record = serving.main(["--start-server", tiny_chat_model, "--engine-arg", "max_model_len=512",
                           "--num-prompts", "8", "--concurrency", "4", "--input-len", "16",
                           "--output-len", "8", "--json-out", str(out_json), "--plot", str(png)])
    out = capsys.readouterr().out
    printed = json.loads(out.strip().splitlines()[-1])
    assert printed == record == json.loads(out_json.read_text())
    assert "Successful requests" in out and "HTTP/offline" in out
    [level] = record["levels"]
    assert (level["load"], level["level"]) == ("concurrency", 4)
    assert (level["completed"], level["failed"]) == (8, 0)
    assert level["output_tokens"] == 8 * 8 and level["prompt_tokens"] == 8 * 16
    assert level["requests_per_s"] > 0 and level["output_tokens_per_s"] > 0
    assert level["total_tokens_per_s"] == pytest.approx(3 * level["output_tokens_per_s"], rel=0.01)
    for stat in ("mean", "p50", "p99"):
        assert 0 < level["ttft_ms"][stat] <= level["e2e_ms"][stat]
        assert level["tpot_ms"][stat] > 0
    assert level["ttft_ms"]["p50"] <= level["ttft_ms"]["p99"]
    offline = record["offline"]
    assert offline["output_tokens"] == 64 and offline["output_tokens_per_s"] > 0
    assert offline["http_over_offline"] > 0
    assert png.stat().st_size > 0


@pytest.mark.parametrize("argv, message", [
    (["--concurrency", "4", "--request-rate", "2"], "give one of them"),
    (["--sweep", "1,2"], "say what it sweeps"),
    (["--concurrency", "4", "--sweep", "1,2"], "without one"),
    (["--concurrency"], "needs a value"),
    (["--concurrency", "--sweep", "1,x"], "comma-separated ints"),
    (["--request-rate", "0"], "must be > 0"),
    (["--num-prompts", "0"], "--num-prompts: must be >= 1"),
    (["--engine-arg", "max_model_len=512"], "needs --start-server"),
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
