"""``python -m bench.admission``: the engine's scheduler replayed per kv_reserve, no model."""

from __future__ import annotations

import json

import pytest


def test_admission_replay_trades_preemptions_for_batch(capsys):
    from bench import admission

    # 24 requests of 32 + 32 tokens need 24 * 4 = 96 blocks of 16 at their end; 64 hold 16.
    record = admission.main(["--num-blocks", "64", "--kv-reserve", "0,1", "--num-prompts", "24",
                             "--input-len", "32", "--output-len", "32", "--max-num-seqs", "24",
                             "--max-num-batched-tokens", "256"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == record
    optimistic, reserved = record["results"]
    # Optimistic admission takes every prompt in, then preempts and recomputes; a full
    # reserve admits only what can run to its end: no preemption, each prompt run once.
    assert optimistic["preemptions"] > 0
    assert optimistic["prompt_tokens_run"] > 24 * 32
    assert optimistic["max_decode_batch"] > 16
    assert reserved["preemptions"] == 0
    assert reserved["prompt_tokens_run"] == 24 * 32
    assert reserved["max_decode_batch"] <= 16
    assert min(optimistic["steps"], reserved["steps"]) > 32  # each request decodes 31 steps
    assert all(r["predicted_s"] > 0 for r in record["results"])


def test_admission_refuses_a_reserve_outside_0_1():
    from bench import admission

    with pytest.raises(SystemExit):
        admission.main(["--num-blocks", "64", "--kv-reserve", "0,1.5"])
