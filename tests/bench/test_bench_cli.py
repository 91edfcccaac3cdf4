"""Smoke tests of the benchmark programs: each ``main()`` runs a tiny workload and
prints its human lines and then exactly one JSON line."""

from __future__ import annotations

import json

import pytest

from tiny_models import build_tiny


def _printed_record(capsys) -> tuple[str, dict]:
    out = capsys.readouterr().out
    return out, json.loads(out.strip().splitlines()[-1])


@pytest.mark.slow
def test_throughput_dag_and_hf_side_by_side(tmp_path, ray_cluster, capsys):
    from bench import throughput

    model = build_tiny(tmp_path, "llama")
    record = throughput.main(["--model", model, "--tp", "2", "--backends", "dag,hf",
                              "--num-prompts", "3", "--input-len", "8", "--output-len", "4",
                              "--json-out", str(tmp_path / "out.json")])
    out, printed = _printed_record(capsys)
    assert printed == record
    assert json.loads((tmp_path / "out.json").read_text()) == record
    assert out.count("Throughput: ") == 2
    assert [r["backend"] for r in printed["results"]] == ["dag", "hf"]
    assert printed["backend"] == "dag" and printed["tp"] == 2
    assert printed["num_prompt_tokens"] == 24 and printed["num_output_tokens"] == 12
    for r in printed["results"]:
        assert r["elapsed_s"] > 0 and r["output_tokens_per_s"] > 0
        assert r["total_tokens_per_s"] == pytest.approx(3 * r["output_tokens_per_s"], rel=0.01)
    assert printed["results"][0]["ratio_vs_first"] == 1.0
    assert printed["machine"]["cpu_count"] >= 1


@pytest.mark.slow
def test_throughput_mixed_on_a_preset_in_process(capsys):
    from bench import throughput

    record = throughput.main(["--model", "tiny", "--load-format", "dummy", "--backend", "inproc",
                              "--num-prompts", "2", "--mixed", "--seed", "1"])
    _, printed = _printed_record(capsys)
    assert printed["mixed"] is True and printed["input_len"] is None
    assert 2 * 16 <= printed["num_output_tokens"] <= 2 * 256
    again = throughput.make_workload(throughput.parse_args(
        ["--model", "tiny", "--load-format", "dummy", "--num-prompts", "2", "--mixed", "--seed", "1"]), 1024)
    assert again.num_output_tokens == record["num_output_tokens"]  # seeded


def test_nano_vllm_workload_is_its_bench_py():
    """nano-vllm's bench.py: ``random.seed(0)``, each prompt's ids drawn right after its
    length, then every max_tokens; lengths in 100..1024, ids in 0..10000."""
    import random

    from bench import throughput

    work = throughput.make_workload(throughput.parse_args(
        ["--model", "qwen3-0.6b", "--load-format", "dummy", "--nano-vllm", "--num-prompts", "256",
         "--seed", "0"]), 151936)
    random.seed(0)
    prompts = [[random.randint(0, 10000) for _ in range(random.randint(100, 1024))]
               for _ in range(256)]
    assert work.prompts == prompts
    assert work.output_lens == [random.randint(100, 1024) for _ in range(256)]


def test_throughput_rejects_a_preset_without_dummy_weights():
    from bench import throughput

    with pytest.raises(SystemExit):
        throughput.parse_args(["--model", "llama2-7b"])
    with pytest.raises(SystemExit):
        throughput.parse_args(["--model", "tiny", "--load-format", "dummy", "--tp", "2",
                               "--backends", "dag,inproc"])


@pytest.mark.slow
def test_step_overhead_delta_full_and_engine(tmp_path, ray_cluster, capsys):
    from bench import step_overhead

    png = tmp_path / "overhead.png"
    record = step_overhead.main(["--tp", "2", "--batch-sizes", "1,4", "--context", "40",
                                 "--steps", "5", "--warmup", "1", "--backends", "dag,inproc",
                                 "--plot", str(png)])
    out, printed = _printed_record(capsys)
    assert printed == record
    assert "full/delta" in out and png.stat().st_size > 0
    rows = {(r["backend"], r["batch_size"]): r for r in printed["results"]}
    assert set(rows) == {("dag", 1), ("dag", 4), ("inproc", 1), ("inproc", 4)}
    assert rows["inproc", 4]["tp"] == 1 and rows["dag", 4]["tp"] == 2
    for r in rows.values():
        assert r["delta"]["step_us"]["median"] > 0
        # the delta never carries the 40-token histories; the full re-send does
        assert r["delta"]["bytes"] < 40 * 4 < r["full"]["bytes"] / r["batch_size"]
    assert [r["batch_size"] for r in printed["engine"]] == [1, 4]


@pytest.mark.slow
def test_throughput_static_shape_devices_beside_the_default_engine(tmp_path, capsys):
    from bench import throughput

    model = build_tiny(tmp_path, "llama")
    record = throughput.main(["--model", model, "--backend", "inproc", "--num-prompts", "5",
                              "--input-len", "8", "--output-len", "4",
                              "--devices", "cpu,spyre,tpu-emulated", "--warmup-shapes", "8,4,2",
                              "16,4,4", "--compile-backend", "eager",
                              "--max-num-batched-tokens", "32", "--max-num-seqs", "8"])
    out, printed = _printed_record(capsys)
    assert printed == record and out.count("Throughput: ") == 3
    results = printed["results"]
    assert [r["backend"] for r in results] == ["inproc", "inproc:spyre", "inproc:tpu-emulated"]
    assert results[0]["warmup_s"] is None
    assert list(results[1]["warmup_s"]) == ["prompt_len=8,max_new_tokens=4,batch_size=2",
                                            "prompt_len=16,max_new_tokens=4,batch_size=4"]
    assert list(results[2]["warmup_s"]) == ["num_tokens=16,num_seqs=8", "num_tokens=32,num_seqs=8"]
    assert all(r["output_tokens_per_s"] > 0 for r in results)
    assert "warm-up prompt_len=8,max_new_tokens=4,batch_size=2" in out


def test_roofline_counts_llama2_and_replicates_kv_heads(capsys):
    from bench import roofline

    # Llama-2-7B has 6,738,415,616 parameters; 70B 68,976,648,192 (their model cards' counts).
    assert roofline.shape_of("llama2-7b").params == 6_738_415_616
    assert roofline.shape_of("llama2-70b").params == 68_976_648_192
    row = roofline.main(["--model", "llama2-70b", "--tp", "4", "--num-prompts", "512"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == row
    # 8 KV heads over 4 ranks: 2 per rank, 80 layers, K and V, head 128, bf16.
    assert row["kv_kib_per_token_per_rank"] == 2 * 80 * 2 * 128 * 2 / 1024
    assert row["waves"] == 1 and row["decode_steps"] == 255
    # One wave reads every request's context at each of its 255 steps.
    read = 512 * sum(range(257, 512)) * 2 * 80 * 2 * 128 * 2
    assert row["kv_read_tb_per_rank"] == round(read / 1e12, 2)
    assert row["floor_s"] == pytest.approx(row["prefill_s"] + row["prefill_all_reduce_s"]
                                           + row["decode_s"] + row["decode_all_reduce_s"], abs=2e-3)
    assert row["floor_total_tok_s"] == pytest.approx(512 * 512 / row["floor_s"], rel=1e-3)
    # tp=16 replicates the 8 KV heads (one per rank) instead of splitting them further.
    wide = roofline.floor(roofline.shape_of("llama2-70b"), roofline.GPUS["h200"], 16, 512, 256, 256)
    assert wide["kv_kib_per_token_per_rank"] == 2 * 80 * 1 * 128 * 2 / 1024
    # A 7B shape on one H100 cannot hold 512 requests of 512 tokens at once: more waves.
    h100 = roofline.main(["--model", "llama2-7b", "--gpu", "h100", "--num-prompts", "512"])
    assert h100["concurrent"] < 512 and h100["waves"] >= 2
    with pytest.raises(ValueError, match="do not fit"):
        roofline.floor(roofline.shape_of("llama2-70b"), roofline.GPUS["h100"], 1, 8, 8, 8)


def test_roofline_of_requests_of_differing_lengths():
    from bench import roofline

    shape, h200 = roofline.shape_of("llama2-7b"), roofline.GPUS["h200"]
    # Uniform lengths that fit at once: the same count as the uniform floor.
    same = roofline.floor(shape, h200, 1, 256, 256, 256)
    each = roofline.floor_requests(shape, h200, 1, [256] * 256, [256] * 256)
    assert same["waves"] == 1
    for key in ("prefill_s", "decode_s", "decode_steps", "kv_read_tb_per_rank", "floor_total_tok_s"):
        assert each[key] == pytest.approx(same[key], rel=1e-3), key
    # Two requests, one finishing early: the long one decodes alone after it.
    two = roofline.floor_requests(shape, h200, 1, [100, 10], [3, 6])
    assert two["decode_steps"] == 5 and two["concurrent"] == 2
    kv = 2 * 32 * 32 * 128 * 2
    read = (101 + 11 + 102 + 12 + 13 + 14 + 15) * kv  # contexts at each of the 5 steps
    assert two["kv_read_gb_per_rank"] == round(read / 1e9, 3) > 0
    # max_num_seqs=1 runs them one after the other: 2 + 5 steps.
    assert roofline.floor_requests(shape, h200, 1, [100, 10], [3, 6], max_num_seqs=1)[
        "decode_steps"] == 7
    # nano-vllm's lengths through the CLI: 256 requests, in and out within 100..1024.
    row = roofline.main(["--model", "qwen3-0.6b", "--num-prompts", "256", "--nano-vllm"])
    assert row["nano_vllm"] and row["concurrent"] == 256 and 100 <= row["decode_steps"] <= 1023
    assert row["floor_output_tok_s"] < row["floor_total_tok_s"]


def test_rank_host_times_each_part_of_a_decode_step(capsys):
    from bench import rank_host

    record = rank_host.main(["--model", "tiny", "--batch-size", "4", "--input-len", "8",
                             "--steps", "6"])
    out, printed = _printed_record(capsys)
    assert printed == record and "rank host time per decode step at batch 4" in out
    parts = record["parts_ms"]
    assert set(parts) == {"validate", "apply", "prepare", "tensors", "forward", "sample",
                          "commit", "output", "step", "host"}
    assert all(v > 0 for v in parts.values())
    # The step holds its parts; host is the step less the forward.
    assert parts["forward"] < parts["step"] and parts["host"] < parts["step"]
    assert record["command"] == ("python -m bench.rank_host --model tiny --batch-size 4 "
                                 "--input-len 8 --steps 6")
