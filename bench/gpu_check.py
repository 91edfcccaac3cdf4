"""Correctness on the GPU, recorded beside the benchmarks (run on a device machine).

    python -m bench.gpu_check --tiny        # fp32 tiny Llama/Qwen2: greedy == transformers, tp=1 (and 2)
    python -m bench.gpu_check --logits --tp 1,2,4   # bf16 7B-shape dummy: prefill logits
    python -m bench.gpu_check --logits --device cpu --model qwen3-0.6b --tp 1,2   # the same on the CPU

``--tiny`` builds the tests' tiny random checkpoints, generates greedily through the
engine on CUDA (compiled graph, CUDA graphs for decode, Triton kernels) and compares
with transformers ``generate`` on the same GPU in float32. A mismatch is reported
with the first diverging position and the top-2 logit gap there (an exact tie is the
only acceptable cause). ``--logits`` scores random prompts with the rank call
``score_prompt`` (one prefill, full-vocabulary float32 logits) at each tp size in
bfloat16 and at tp=1 in float32, and runs transformers in bfloat16 and float32 on the
same (bfloat16-representable) dummy weights: it prints ‖Δ‖/‖ref‖ against transformers'
float32, and judges each bf16 run against transformers' own bf16 drift. Exits non-zero
when a check fails.
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

DRIFT_FACTOR = 1.5  # a bf16 run may drift this many times transformers' own bf16 drift


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


def check_logits(tp_sizes: list[int], model: str = "llama2-7b", device: str = "cuda",
                 num_prompts: int = 2, prompt_len: int = 256, last: int = 32,
                 drift_factor: float = DRIFT_FACTOR) -> list[dict]:
    """Prefill logits of the engine in bfloat16 at each tp size and in float32 at tp=1, and
    of transformers in bfloat16 and float32, all on the same dummy weights (the engine's
    ``load_format="dummy"`` draw, loaded into transformers too). A bf16 run passes when
    its distance to transformers' float32 (and, at tp > 1, to the engine's tp=1 bf16) is
    within ``drift_factor`` times transformers' own bf16-vs-fp32 drift; the float32 engine
    run must match transformers' float32 to 1e-4 (it proves the weights are the same)."""
    from bench.presets import is_preset, materialize
    from spmd import LLM

    path = materialize(model) if is_preset(model) else model
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, _vocab(path), prompt_len).tolist() for _ in range(num_prompts)]
    hf = _hf_logits(path, prompts, last, device)  # first: it frees its memory before the ranks start
    logits = {}
    runs = [("bfloat16", tp) for tp in tp_sizes] + [("float32", 1)]
    for dtype, tp in runs:
        extra = dict(gpu_memory_utilization=0.5, enforce_eager=True) if device == "cuda" else {}
        llm = LLM(path, load_format="dummy", device=device, dtype=dtype, tensor_parallel_size=tp,
                  skip_tokenizer_init=True, max_model_len=max(1024, prompt_len), max_num_seqs=8,
                  **extra)
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

    ref32, own = hf["float32"], _rel(hf["bfloat16"], hf["float32"])
    bar = max(1e-2, drift_factor * own)
    rows = [dict(check="prefill logits", model=model, device=device, who="transformers",
                 dtype="bfloat16", tp=1, finite=bool(np.isfinite(hf["bfloat16"]).all()),
                 rel_vs_fp32=own, ok=True)]
    print(json.dumps(rows[-1]), flush=True)
    for (dtype, tp), value in logits.items():
        finite = bool(np.isfinite(value).all())
        row = dict(check="prefill logits", model=model, device=device, who="engine", dtype=dtype,
                   tp=tp, finite=finite, rel_vs_fp32=_rel(value, ref32))
        if dtype == "float32":
            row["ok"] = finite and row["rel_vs_fp32"] <= 1e-4
        else:
            if tp != 1:
                row["rel_vs_tp1_bf16"] = _rel(value, logits[("bfloat16", 1)])
            row["over_transformers_bf16"] = round(row["rel_vs_fp32"] / own, 3)
            row["bar"] = bar
            row["ok"] = finite and row["rel_vs_fp32"] <= bar and row.get("rel_vs_tp1_bf16", 0) <= bar
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows



def _rel(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _vocab(path: str) -> int:
    from workers.model_loader import load_hf_config

    return load_hf_config(path).vocab_size


def _hf_logits(path: str, prompts: list[list[int]], last: int, device: str) -> dict:
    """transformers' prefill logits (last ``last`` positions, float64) in bfloat16 and in
    float32, on the weights the engine draws for ``load_format="dummy"`` (seed 0)."""
    from transformers import AutoModelForCausalLM

    from workers.model_loader import iter_dummy_weights, load_hf_config

    config = load_hf_config(path)
    tied = getattr(config, "tie_word_embeddings", False)
    ids = torch.tensor(prompts, device=device)
    out = {}
    # A model per dtype, built in it: casting one (model.to) would also round the rotary
    # frequencies (a float32 buffer) to bfloat16, and the float32 run would inherit that.
    for dtype in (torch.bfloat16, torch.float32):
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
        missing = set(model.state_dict())
        for name, tensor in iter_dummy_weights(config, 0, dtype, device):
            if tied and name == "lm_head.weight":  # the embedding's draw, as the engine ties it
                continue
            model.get_parameter(name).data.copy_(tensor)
            missing.discard(name)
        if missing - {"lm_head.weight"}:  # tied heads share the embedding
            raise RuntimeError(f"dummy weights left these unset: {sorted(missing)[:5]}")
        with torch.inference_mode():
            logits = model(ids).logits[:, -last:]
        out[str(dtype).removeprefix("torch.")] = logits.double().cpu().numpy()
        del model, logits
        if device == "cuda":
            torch.cuda.empty_cache()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--logits", action="store_true")
    p.add_argument("--hf-drift", action="store_true",
                   help="same as --logits, which always measures transformers' own bf16 drift too")
    p.add_argument("--model", default="llama2-7b", help="--logits: a preset or model directory")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--eager-too", action="store_true", help="--tiny: also with enforce_eager")
    p.add_argument("--tp", default=None, help="comma list of tp sizes (default: 1, and 2 with 2 GPUs)")
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device (--device cpu runs --logits on the CPU)", file=sys.stderr)
        return 2
    if args.device == "cpu" and args.tiny:
        print("error: --tiny runs on CUDA only (the tests check the CPU)", file=sys.stderr)
        return 2
    tps = [int(t) for t in args.tp.split(",")] if args.tp else (
        [1, 2] if args.device == "cpu" or torch.cuda.device_count() >= 2 else [1])
    rows = []
    if args.tiny:
        rows += check_tiny(tps, eager_too=args.eager_too)
    if args.logits or args.hf_drift:
        rows += check_logits(tps, args.model, args.device)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(rows, f, indent=1)
    failed = [r for r in rows if not r["ok"]]
    print(f"gpu_check: {len(rows) - len(failed)}/{len(rows)} checks passed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
