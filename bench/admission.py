"""Admission policies replayed on the engine's own scheduler, before a GPU run (METHOD.md:
predict first, then measure).

    python -m bench.admission --num-blocks 7272 --kv-reserve 0,0.25,0.5,1

Replays ``spmd.scheduler.Scheduler`` on ``num_prompts`` requests of ``input_len`` prompt
tokens that each run to ``output_len`` tokens (EOS ignored, as in ``bench.throughput``),
with a KV cache of ``num_blocks`` blocks (the engine logs it; the throughput JSON has it as
``num_kv_blocks``), once per ``kv_reserve``. No model runs: every step's tokens and decode
contexts are priced by a step-cost model, and the table shows what each policy trades —
preemptions and the prompt tokens they recompute against the size of the decode batch.

The step-cost model (milliseconds): ``max(weights_ms, matmul_us * tokens / 1e3)`` for the
matmuls (at least one read of the weights), ``+ other_us * tokens / 1e3`` (norms, RoPE,
activations, KV writes), ``+ kv_us * context / 1e3`` for each decode row's KV read,
``+ fixed_ms``. Defaults are Llama-2-7B bf16 on one H100, fitted to its 2026-12-07 runs:
a mixed step of 8,192 tokens profiled at 176 ms, of which 144 ms matmuls
(``bench/results/h100_mixed_step_profile_1207.txt``), and a decode step of 31.7 ms at a
batch of 424 (``h100_overlap_onoff_7b_1207b.json``).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class StepCost:
    matmul_us: float = 17.6  # per token: 144 ms / 8,192 tokens
    weights_ms: float = 4.5  # 13.5 GB of bf16 weights at ~3 TB/s
    other_us: float = 3.9  # per token: (176 - 144) ms / 8,192
    kv_us: float = 0.202  # per context token of a decode row (fitted to the decode step)
    fixed_ms: float = 0.3

    def step_ms(self, tokens: int, context: int) -> float:
        return (max(self.weights_ms, self.matmul_us * tokens / 1e3) + self.other_us * tokens / 1e3
                + self.kv_us * context / 1e3 + self.fixed_ms)


@dataclass
class Replay:
    kv_reserve: float
    steps: int
    preemptions: int
    prompt_tokens_run: int  # prompts and recomputed contexts
    max_decode_batch: int
    decode_step_ms: float  # predicted, median over decode steps of >= 7/8 the largest batch
    predicted_s: float


def replay(args, kv_reserve: float, cost: StepCost) -> Replay:
    from spmd.request import Request
    from spmd.scheduler import Scheduler

    sched = Scheduler(num_blocks=args.num_blocks, block_size=args.block_size,
                      max_num_seqs=args.max_num_seqs,
                      max_num_batched_tokens=args.max_num_batched_tokens,
                      max_model_len=args.input_len + args.output_len + args.block_size,
                      kv_watermark=args.kv_watermark, kv_reserve=kv_reserve)
    for i in range(args.num_prompts):
        # distinct prompts: no prefix-cache hits, as with bench.throughput's random ones
        prompt = [(i * args.input_len + j) % 30000 + 1 for j in range(args.input_len)]
        sched.add_request(Request(f"r{i}", i, prompt, args.output_len))
    rows: list[tuple[int, int, int]] = []  # (tokens, decode rows, decode context)
    preemptions = prompt_tokens = 0
    while sched.waiting or sched.running:
        out = sched.schedule()
        sampled, tokens, decode_rows, context = {}, 0, 0, 0
        for req, (seq_id, n), start in zip(out.scheduled_requests, out.scheduled, out.starts):
            tokens += n
            if n == 1 and start >= req.num_prompt_tokens:
                decode_rows += 1
                context += start + 1
            else:
                prompt_tokens += n
            if start + n == req.num_tokens:
                sampled[seq_id] = 0  # any token: none is a stop token
        preemptions += len(out.preempted_ids)
        rows.append((tokens, decode_rows, context))
        sched.update_from_output(out, sampled)
    largest = max(r[1] for r in rows)
    big = [cost.step_ms(t, c) for t, b, c in rows if t == b and b >= largest * 7 // 8]
    return Replay(kv_reserve, len(rows), preemptions, prompt_tokens, largest,
                  round(float(np.median(big)), 2) if big else 0.0,
                  round(sum(cost.step_ms(t, c) for t, _, c in rows) / 1e3, 2))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-blocks", type=int, required=True)
    p.add_argument("--kv-reserve", default="0,0.25,0.5,1",
                   help="comma-separated kv_reserve values, each replayed")
    p.add_argument("--kv-watermark", type=float, default=0.01)
    p.add_argument("--num-prompts", type=int, default=512)
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--max-num-seqs", type=int, default=512)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--block-size", type=int, default=16)
    for name, value in asdict(StepCost()).items():
        p.add_argument(f"--{name.replace('_', '-')}", type=float, default=value,
                       help="step-cost model (see the module docstring)")
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    reserves = [float(x) for x in args.kv_reserve.split(",")]
    if any(not 0 <= r <= 1 for r in reserves):
        p.error(f"--kv-reserve: each value must be in [0, 1], got {args.kv_reserve}")
    cost = StepCost(**{k: getattr(args, k) for k in asdict(StepCost())})
    results = [replay(args, r, cost) for r in reserves]
    base = results[0].predicted_s
    print(f"{'kv_reserve':>10} {'steps':>6} {'preempt':>8} {'prompt tok':>11} {'max batch':>10} "
          f"{'decode ms':>10} {'predicted s':>12} {'× first':>8}")
    for r in results:
        print(f"{r.kv_reserve:>10} {r.steps:>6} {r.preemptions:>8} {r.prompt_tokens_run:>11} "
              f"{r.max_decode_batch:>10} {r.decode_step_ms:>10} {r.predicted_s:>12} "
              f"{base / r.predicted_s:>8.3f}")
    record = dict(args={k: v for k, v in vars(args).items() if k != "json_out"},
                  cost=asdict(cost), results=[asdict(r) for r in results])
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(record, f, indent=1)
    print(json.dumps(record), flush=True)
    return record


if __name__ == "__main__":
    main()
