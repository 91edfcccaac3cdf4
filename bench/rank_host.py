"""Where a rank's host time goes in a decode step, outside the forward pass: each part of
``Worker._step`` timed with wall clocks (not the profiler, whose overhead distorts small
calls), median over the steady decode steps of a real engine.

    python -m bench.rank_host --model tiny --load-format dummy --batch-size 256

The engine runs in process with ``async_scheduling=False``, so that no engine thread holds
the GIL while the rank works: the times are the rank's own. ``forward`` (the model and the
logits) is there for scale; ``host`` is the step less the forward, what a GPU waits for.
Prints a table and one JSON line (``--json-out`` also writes it).
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

# (label, object attribute path under the worker, method); in the order a step runs them
PARTS = (
    ("validate", "batch", "validate"),
    ("apply", "batch", "apply"),
    ("prepare", "batch", "prepare"),
    ("tensors", None, "_prepare_tensors"),
    ("forward", None, "_compute_logits"),
    ("sample", None, "_sample"),
    ("commit", "batch", "commit"),
    ("output", None, "_output"),
)


def _timed(obj, name: str, label: str, steps: list[dict]):
    """Wraps ``obj.name`` to add its wall time under ``label`` to the step running it."""
    fn = getattr(obj, name)

    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            if steps:
                steps[-1][label] = steps[-1].get(label, 0.0) + time.perf_counter() - t0

    setattr(obj, name, wrapper)


def _timed_step(worker, steps: list[dict]):
    fn = worker._step

    def wrapper(*args, **kwargs):
        steps.append({})
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            steps[-1]["step"] = time.perf_counter() - t0

    worker._step = wrapper


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(prog="python -m bench.rank_host",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny", help="a preset (with --load-format dummy) or a path")
    p.add_argument("--load-format", default="dummy", choices=("auto", "safetensors", "gguf", "dummy"))
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--steps", type=int, default=64, help="decode steps (output tokens)")
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    if min(args.batch_size, args.input_len, args.steps) < 1:
        p.error("--batch-size, --input-len and --steps: must be >= 1")

    from bench.presets import is_preset, materialize
    from bench.throughput import emit_json, machine_info
    from spmd import LLM, SamplingParams

    model = materialize(args.model) if is_preset(args.model) else args.model
    llm = LLM(model, backend="inproc", load_format=args.load_format, async_scheduling=False,
              max_num_seqs=args.batch_size, skip_tokenizer_init=True,
              max_num_batched_tokens=max(2048, args.batch_size),
              max_model_len=args.input_len + args.steps + 16, enable_prefix_caching=False)
    try:
        worker = llm.engine.core.transport.worker
        steps: list[dict] = []  # one dict of part -> seconds per Worker._step call
        for label, attr, name in PARTS:
            _timed(getattr(worker, attr) if attr else worker, name, label, steps)
        _timed_step(worker, steps)
        vocab = llm.engine.hf_config.vocab_size
        prompts = [{"prompt_token_ids": [(7 * i + j) % (vocab - 1) + 1 for j in range(args.input_len)]}
                   for i in range(args.batch_size)]
        params = SamplingParams(temperature=0, ignore_eos=True, max_tokens=args.steps,
                                detokenize=False)
        llm.generate(prompts, params, use_tqdm=False)  # warm-up: first-call costs
        steps.clear()
        llm.generate(prompts, params, use_tqdm=False)
    finally:
        llm.shutdown()
    # The decode steps at the full batch: the last steps-1 that ran a forward (a step that
    # only frees finished requests runs none).
    decode = args.steps - 1
    ran = [s for s in steps if "forward" in s][-decode:]
    for s in ran:
        s["host"] = s["step"] - s["forward"]
    labels = set.intersection(*(set(s) for s in ran))
    ms = {k: round(1e3 * float(np.median([s[k] for s in ran])), 4) for k in labels}
    print(f"rank host time per decode step at batch {args.batch_size}, median of {len(ran)} steps:")
    for label in [p[0] for p in PARTS] + ["step", "host"]:
        if label in ms:
            print(f"  {label:10s} {ms[label]:9.3f} ms")
    record = dict(parts_ms=ms, model=args.model, batch_size=args.batch_size,
                  input_len=args.input_len, steps=args.steps,
                  command=" ".join(["python -m bench.rank_host", *argv]),
                  machine=machine_info())
    emit_json(record, args.json_out)
    return record


if __name__ == "__main__":
    from bench.throughput import run_cli

    run_cli(main)
