"""Correctness on the GPU, recorded beside the benchmarks (run on a device machine).

    python -m bench.gpu_check --tiny        # fp32 tiny Llama/Qwen2: greedy == transformers, tp=1 (and 2)
    python -m bench.gpu_check --logits      # bf16 7B-shape dummy: prefill logits tp=2 vs tp=1 vs fp32

``--tiny`` builds the tests' tiny random checkpoints, generates greedily through the
engine on CUDA (compiled graph, CUDA graphs for decode, Triton kernels) and compares
with transformers ``generate`` on the same GPU in float32. A mismatch is reported
with the first diverging position and the top-2 logit gap there (an exact tie is the
only acceptable cause). ``--logits`` scores random prompts with the rank call
``score_prompt`` (one prefill, full-vocabulary float32 logits) at tp=1 and tp=2 in
bfloat16, and at tp=1 in float32 on the same (bfloat16-representable) dummy weights,
and prints ‖Δ‖/‖ref‖. Exits non-zero when a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))


def _hf_generate(path: str, prompts: list[list[int]], max_tokens: int):
    """Greedy tokens and per-step logits from transformers on CUDA, float32, one prompt at a time."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).cuda().eval()
    model.generation_config.eos_token_id = None  # never stops early, like ignore_eos
    tokens, scores = [], []
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([p], device="cuda")
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                                 do_sample=False, output_scores=True, return_dict_in_generate=True,
                                 pad_token_id=0)
            tokens.append(out.sequences[0, len(p):].tolist())
            scores.append([s[0].float().cpu() for s in out.scores])
    return tokens, scores


def check_tiny(tp_sizes: list[int], max_tokens: int = 24, eager_too: bool = False) -> list[dict]:
    from conftest import mixed_prompts
    from tiny_models import build_variant
    from spmd import LLM, SamplingParams

    rows = []
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    with tempfile.TemporaryDirectory() as tmp:
        for variant in ("llama", "qwen2"):
            path = build_variant(tmp, variant)
            prompts = mixed_prompts(16, 256, seed=1)
            ref, scores = _hf_generate(path, prompts, max_tokens)
            for tp, eager in [(tp, e) for tp in tp_sizes for e in ((False, True) if eager_too else (False,))]:
                llm = LLM(path, device="cuda", dtype="float32", tensor_parallel_size=tp,
                          skip_tokenizer_init=True, max_model_len=256, gpu_memory_utilization=0.3,
                          enforce_eager=eager)
                try:
                    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                                        use_tqdm=False)
                    steps = llm.engine.stats_total["steps"]
                finally:
                    llm.shutdown()
                got = [o.outputs[0].token_ids for o in outs]
                mismatches = []
                for i, (a, b) in enumerate(zip(got, ref)):
                    if a != b:
                        pos = next(j for j, (x, y) in enumerate(zip(a, b)) if x != y)
                        top2 = scores[i][pos].topk(2).values
                        mismatches.append(dict(prompt=i, position=pos,
                                               top2_gap=float(top2[0] - top2[1])))
                ok = not mismatches or all(m["top2_gap"] == 0.0 for m in mismatches)
                rows.append(dict(check="greedy==transformers", variant=variant, tp=tp, dtype="float32",
                                 cuda_graphs=not eager,
                                 prompts=len(prompts), equal=len(prompts) - len(mismatches),
                                 mismatches=mismatches, steps=steps, ok=ok))
                print(json.dumps(rows[-1]), flush=True)
    return rows


def check_logits(tp_sizes: list[int], num_prompts: int = 2, prompt_len: int = 256,
                 last: int = 32) -> list[dict]:
    from bench.presets import materialize
    from spmd import LLM

    path = materialize("llama2-7b")
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 32000, prompt_len).tolist() for _ in range(num_prompts)]
    logits = {}
    runs = [("bfloat16", tp) for tp in tp_sizes] + [("float32", 1)]
    for dtype, tp in runs:
        llm = LLM(path, load_format="dummy", device="cuda", dtype=dtype, tensor_parallel_size=tp,
                  skip_tokenizer_init=True, max_model_len=1024, enforce_eager=True,
                  gpu_memory_utilization=0.5, max_num_seqs=8)
        try:
            per_prompt = []
            for p in prompts:
                replies = llm.engine.call_all("score_prompt", p, last)
                per_rank = [np.frombuffer(r, dtype=np.float32).reshape(last, -1) for r in replies]
                assert all(np.array_equal(per_rank[0], r) for r in per_rank[1:]), "ranks disagree"
                per_prompt.append(per_rank[0])
            logits[(dtype, tp)] = np.stack(per_prompt).astype(np.float64)
        finally:
            llm.shutdown()

    def rel(a, b):
        return float(np.linalg.norm(a - b) / np.linalg.norm(b))

    rows = []
    ref32 = logits[("float32", 1)]
    for (dtype, tp), value in logits.items():
        finite = bool(np.isfinite(value).all())
        row = dict(check="prefill logits", dtype=dtype, tp=tp, finite=finite,
                   rel_vs_fp32=rel(value, ref32))
        if dtype == "bfloat16" and tp != 1:
            row["rel_vs_tp1_bf16"] = rel(value, logits[("bfloat16", 1)])
        row["ok"] = finite and row["rel_vs_fp32"] <= 1e-2 and row.get("rel_vs_tp1_bf16", 0) <= 1e-2
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def check_hf_bf16_drift(num_prompts: int = 2, prompt_len: int = 256, last: int = 32) -> list[dict]:
    """The same comparison for transformers alone: a randomly initialised Llama-2-7B shape
    (its own N(0, 0.02) init, rounded to bf16), prefill logits in bf16 vs float32. Tells
    whether the engine's bf16 drift is bf16's own on random weights."""
    from transformers import AutoModelForCausalLM

    from bench.presets import materialize
    from workers.model_loader import load_hf_config

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(load_hf_config(materialize("llama2-7b")),
                                                 dtype=torch.bfloat16).eval()
    rng = np.random.default_rng(0)
    ids = torch.tensor(rng.integers(0, 32000, (num_prompts, prompt_len)), device="cuda")
    with torch.inference_mode():
        bf16 = model(ids).logits[:, -last:].double()
        fp32 = model.float()(ids).logits[:, -last:].double()
    rel = float((bf16 - fp32).norm() / fp32.norm())
    row = dict(check="transformers bf16 vs fp32 prefill logits", rel_vs_fp32=rel,
               finite=bool(torch.isfinite(bf16).all()), ok=True)
    print(json.dumps(row), flush=True)
    return [row]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--logits", action="store_true")
    p.add_argument("--hf-drift", action="store_true",
                   help="transformers alone: bf16 vs fp32 logits on a random 7B shape")
    p.add_argument("--eager-too", action="store_true", help="--tiny: also with enforce_eager")
    p.add_argument("--tp", default=None, help="comma list of tp sizes (default: 1, and 2 with 2 GPUs)")
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: no CUDA device", file=sys.stderr)
        return 2
    tps = [int(t) for t in args.tp.split(",")] if args.tp else (
        [1, 2] if torch.cuda.device_count() >= 2 else [1])
    rows = []
    if args.tiny:
        rows += check_tiny(tps, eager_too=args.eager_too)
    if args.logits:
        rows += check_logits(tps)
    if args.hf_drift:
        rows += check_hf_bf16_drift()
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(rows, f, indent=1)
    failed = [r for r in rows if not r["ok"]]
    print(f"gpu_check: {len(rows) - len(failed)}/{len(rows)} checks passed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
