"""Where the offline engine core should live: in the caller's process (``LLM``) or in
its own process (``AsyncEngine``, as serving runs it), timed on the same prompts.

    python -m bench.core_placement --model tiny --load-format dummy --num-prompts 96
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

from bench.throughput import emit_json, machine_info, make_workload


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.core_placement",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny", help="a preset name (bench.presets) or a directory")
    p.add_argument("--load-format", default="dummy")
    p.add_argument("--num-prompts", type=int, default=96)
    p.add_argument("--input-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--mixed", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json-out", default=None)
    return p.parse_args(argv)


def _timed_llm(kwargs: dict, prompts, params) -> float:
    from spmd import LLM

    llm = LLM(**kwargs)
    try:
        llm.generate(prompts[:1], params[:1], use_tqdm=False)  # warm-up
        t0 = time.perf_counter()
        llm.generate(prompts, params)
        return time.perf_counter() - t0
    finally:
        llm.shutdown()


def _timed_async(kwargs: dict, prompts, params) -> float:
    from spmd import AsyncEngine

    engine = AsyncEngine(**kwargs)

    async def run(batch, batch_params) -> None:
        async def one(p, sp):
            async for _ in engine.generate(p, sp, delta=True):
                pass

        await asyncio.gather(*(one(p, sp) for p, sp in zip(batch, batch_params)))

    try:
        asyncio.run(run(prompts[:1], params[:1]))
        t0 = time.perf_counter()
        asyncio.run(run(prompts, params))
        return time.perf_counter() - t0
    finally:
        engine.shutdown()


def main(argv=None) -> dict:
    from bench.presets import is_preset, materialize
    from spmd import SamplingParams

    args = parse_args(argv)
    path = materialize(args.model) if is_preset(args.model) else args.model
    from workers.model_loader import load_hf_config

    vocab = load_hf_config(path).vocab_size
    workload = make_workload(args, vocab)
    prompts = [{"prompt_token_ids": ids} for ids in workload.prompts]
    params = [SamplingParams(temperature=0, ignore_eos=True, max_tokens=k)
              for k in workload.output_lens]
    kwargs = dict(model=path, load_format=args.load_format, skip_tokenizer_init=True)
    tokens = sum(workload.output_lens)
    in_process = _timed_llm(kwargs, prompts, params)
    own_process = _timed_async(kwargs, prompts, params)
    rows = {"in-process core (LLM)": in_process, "core in its own process (AsyncEngine)":
            own_process}
    print(f"{'placement':<42}{'s':>8}{'output tok/s':>14}")
    for name, s in rows.items():
        print(f"{name:<42}{s:>8.2f}{tokens / s:>14.1f}")
    print(f"own process / in process (throughput): {in_process / own_process:.3f}")
    record = dict(model=args.model, num_prompts=args.num_prompts, input_len=args.input_len,
                  output_len=args.output_len, in_process_s=round(in_process, 3),
                  own_process_s=round(own_process, 3),
                  own_over_in_process=round(in_process / own_process, 4),
                  command=" ".join(["python -m bench.core_placement", *(argv or sys.argv[1:])]),
                  machine=machine_info())
    return emit_json(record, args.json_out)


if __name__ == "__main__":
    main()
