"""How long an engine takes to come up: the ``LLM`` constructor's wall time (Ray already
running), per tensor-parallel size, a few times each.

    python -m bench.start_time --model tiny --load-format dummy --tp 1,2 --repeats 2

``--model`` is a preset (with ``--load-format dummy``), a HF directory or a GGUF. Prints a
line per start and one JSON line (``--json-out`` also writes it).
"""

from __future__ import annotations

import argparse
import sys
import time


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench.start_time", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--load-format", default="auto", choices=("auto", "safetensors", "gguf", "dummy"))
    p.add_argument("--backend", default="dag", choices=("dag", "ray", "inproc"))
    p.add_argument("--tp", default="1,2", help="comma-separated tensor-parallel sizes")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--max-model-len", type=int, default=256)
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    tps = [int(t) for t in args.tp.split(",")]
    if args.repeats < 1 or min(tps) < 1:
        p.error("--repeats and --tp: must be >= 1")

    import ray

    from bench.presets import is_preset, materialize
    from bench.throughput import emit_json, machine_info
    from spmd import LLM

    model = materialize(args.model) if is_preset(args.model) else args.model
    if args.backend != "inproc" and not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False)
    starts: dict[str, list[float]] = {}
    for tp in tps:
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            llm = LLM(model, load_format=args.load_format, tensor_parallel_size=tp,
                      backend=args.backend, max_model_len=args.max_model_len,
                      skip_tokenizer_init=True)
            took = time.perf_counter() - t0
            llm.shutdown()
            starts.setdefault(str(tp), []).append(round(took, 3))
            print(f"tp={tp}: {took:.2f} s", flush=True)
    return emit_json(dict(model=args.model, load_format=args.load_format, backend=args.backend,
                          starts_s=starts, machine=machine_info()), args.json_out)


if __name__ == "__main__":
    main(sys.argv[1:])
