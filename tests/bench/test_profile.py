"""``python -m bench.profile``: per-module and per-op tables, a JSON line and Chrome
traces from a tiny checkpoint on the CPU; module ranges that leave no hooks behind."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import types

import pytest
import torch
from torch import nn

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow
def test_profile_tables_and_traces_on_a_tiny_llama(tiny_dir, tmp_path):
    trace = tmp_path / "trace.json"
    cmd = [sys.executable, "-m", "bench.profile", "--model", tiny_dir("llama"), "--phase", "both",
           "--batch-size", "2", "--input-len", "16", "--warmup-steps", "1", "--steps", "2",
           "--num-threads-per-rank", "1", "--trace", str(trace)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout

    assert "== decode: per module, per step ==" in out and "== prefill: per module, per step ==" in out
    rows = [line.split() for line in out.splitlines()]
    names = {r[0] for r in rows if r}
    for module in ("engine.step", "model.layers.*.self_attn", "model.layers.*.self_attn.attn",
                   "model.layers.*.mlp", "model.layers.*.mlp.down_proj", "lm_head", "sampler"):
        assert module in names, module
    # the custom op with its input shapes: q [tokens, heads, head_dim] first
    assert re.search(r"spmd::paged_attention\(2x4x16, 2x\d+x16x2x16,", out)  # decode: 2 tokens
    assert re.search(r"spmd::paged_attention\(32x4x16, ", out)  # prefill: 2 x 16 tokens
    assert re.search(r"^\* spmd::paged_attention +2 ", out, re.M)  # op table, 2 layers a step

    record = json.loads(out.strip().splitlines()[-1])
    assert set(record["phases"]) == {"decode", "prefill"}
    for phase, result in record["phases"].items():
        assert result["steps"] == (2 if phase == "decode" else 1)
        assert result["nesting_ok"], phase
        modules = {m["name"]: m for m in result["modules"]}
        assert modules["model.layers.*.self_attn"]["calls"] == 2  # two layers, aggregated
        assert modules["model.layers.*.self_attn"]["module_class"] == "LlamaAttention"
        for m in modules.values():
            assert m["device_us"] == 0  # CPU run
            if m["parent"] is not None:
                assert m["cpu_us"] <= modules[m["parent"]]["cpu_us"], m["name"]
        children = sum(m["cpu_us"] for m in modules.values() if m["parent"] == "model.layers.*")
        assert 0 < children <= modules["model.layers.*"]["cpu_us"]
        assert any(o["name"] == "spmd::paged_attention" and o["input_shapes"] for o in result["ops"])

        path = tmp_path / f"trace.{phase}.json"
        assert result["trace"] == str(path)
        events = json.loads(path.read_text())["traceEvents"]
        event_names = {e.get("name") for e in events}
        assert "module: model.layers.1.self_attn" in event_names  # traces keep the layer index
        assert "spmd::paged_attention" in event_names and "engine.step" in event_names


@pytest.mark.slow
def test_profile_mixed_phase_prefills_new_prompts_beside_the_decoding_batch(tiny_dir, tmp_path):
    from bench import profile

    record = profile.main(["--model", tiny_dir("llama"), "--phase", "mixed", "--batch-size", "3",
                           "--mixed-prompts", "2", "--input-len", "16", "--warmup-steps", "1",
                           "--steps", "1", "--num-threads-per-rank", "1",
                           "--trace", str(tmp_path / "mixed.json")])
    result = record["phases"]["mixed"]
    assert result["steps"] == 1 and result["nesting_ok"]
    # one step: 3 decode tokens and 2 x 16 prompt tokens, 5 sequences
    shapes = [o["input_shapes"] for o in result["ops"] if o["name"] == "spmd::paged_attention"]
    assert shapes and all(s.startswith("35x4x16, ") and ", 5x" in s for s in shapes), shapes
    with pytest.raises(SystemExit):
        profile.main(["--model", tiny_dir("llama"), "--phase", "mixed"])  # no --mixed-prompts


def test_module_ranges_remove_their_hooks():
    from bench.profile import MODULE_PREFIX, ModuleRanges, aggregate_name

    model = nn.Sequential(nn.Linear(4, 4), nn.ModuleList([nn.ReLU()]))
    model.forward = lambda x: model[1][0](model[0](x))

    def sampler(x):
        return x.argmax(-1)

    worker = types.SimpleNamespace(model=model, sampler=sampler)
    with torch.profiler.profile() as prof:
        with ModuleRanges(worker) as ranges:
            worker.sampler(model(torch.ones(2, 4)))
    names = {e.name for e in prof.events()}
    assert {MODULE_PREFIX + "Sequential", MODULE_PREFIX + "0", MODULE_PREFIX + "1.0",
            MODULE_PREFIX + "sampler"} <= names
    assert ranges.classes["1.*"] == "ReLU"
    assert worker.sampler is sampler
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    assert aggregate_name("model.layers.31.mlp.down_proj") == "model.layers.*.mlp.down_proj"
    assert aggregate_name("model.layers.7") == "model.layers.*"
