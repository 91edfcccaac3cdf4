"""Offline throughput, shaped like vLLM's ``benchmark_throughput``: random token-id
prompts, greedy decoding that never stops early, only ``generate`` timed.

    python -m bench.throughput --model llama2-7b --load-format dummy --tp 2 \\
        --input-len 256 --output-len 256 --num-prompts 1000 --backends dag,hf

``--backends`` runs several backends one after the other in this process on the
same prompts and prints their ratios to the first: on a noisy machine, numbers
taken side by side are the ones to compare. ``hf`` is Hugging Face transformers
``generate`` on the same model, all prompts in one left-padded batch (or batches
of ``--hf-batch-size``). Every backend counts the same tokens: each prompt's
tokens plus the output tokens that request asked for.

``--lora-rank 16 --num-loras 4`` writes that many random adapters (all seven
projections of every layer) and runs each engine three times on the same prompts:
the base model (LoRA off), every request on one adapter, and the requests spread
round-robin over all of them; the ratios are the cost of LoRA.

Static-shape mode (``--device spyre --warmup-shapes 256,128,8``, or ``--device
tpu-emulated``) is compared with the default engine on the same prompts by
``--devices cpu,spyre``; the warm-up (compile) time of each shape is reported.

``--structured json`` runs each engine twice on the same prompts: unconstrained, then
every request constrained by the same moderate JSON schema (``STRUCTURED_SCHEMA``,
xgrammar masks on every rank); the ratio is the cost of structured outputs. Its
grammar needs a tokenizer: ``--tokenizer`` (default: the model's own; for a dummy
preset, SmolLM2's, with the preset's vocabulary resized to it).

``dag-sync`` (``inproc-sync``, ``ray-sync``) is that backend with ``async_scheduling``
off, for the cost of running one step at a time; ``dag-nooverlap`` (``inproc-nooverlap``,
``ray-nooverlap``) keeps it on but turns ``overlap_rank_steps`` off (the ranks read each step back before launching the
next, the default on the CPU). ``--engine-arg key=value`` passes
engine options (``kv_reserve=1``, ``kv_cache_dtype=fp8``) to every engine run, and
``--profile-steps START,N`` traces N decode-time steps of each engine run with
torch.profiler from its rank's step START on, reporting the device's idle gap between
consecutive steps (traces go to ``--profile-dir``).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np

from bench.presets import PRESETS, is_preset, materialize

ENGINE_BACKENDS = ("dag", "ray", "inproc")
# "<backend>-sync": the same engine with async_scheduling off (one step at a time);
# "<backend>-nooverlap": with overlap_rank_steps off (ranks read each step back first)
BACKENDS = (ENGINE_BACKENDS + tuple(f"{b}-{m}" for m in ("sync", "nooverlap")
                                    for b in ENGINE_BACKENDS) + ("hf",))
MIXED_RANGE = (16, 256)  # --mixed: input and output lengths, inclusive
# --structured json: nested objects, an array of objects, enums, bounded numbers and free
# strings (so the grammar stays live for long outputs).
STRUCTURED_SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 1000000},
        "name": {"type": "string"},
        "status": {"enum": ["active", "inactive", "pending"]},
        "score": {"type": "number", "minimum": 0, "maximum": 100},
        "address": {"type": "object", "properties": {
            "street": {"type": "string"}, "city": {"type": "string"},
            "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["street", "city", "zip"]},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 8},
        "orders": {"type": "array", "items": {"type": "object", "properties": {
            "sku": {"type": "string"}, "quantity": {"type": "integer", "minimum": 1,
                                                    "maximum": 99},
            "note": {"type": "string"}}, "required": ["sku", "quantity", "note"]}},
    },
    "required": ["id", "name", "status", "score", "address", "tags", "orders"],
}


@dataclasses.dataclass
class Workload:
    prompts: list[list[int]]
    output_lens: list[int]  # each request's max_tokens

    @property
    def num_prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    @property
    def num_output_tokens(self) -> int:
        return sum(self.output_lens)


@dataclasses.dataclass
class Result:
    backend: str
    startup_s: float
    elapsed_s: float
    num_requests: int
    num_prompt_tokens: int
    num_output_tokens: int
    warmup_s: dict[str, float] | None = None  # static-shape devices: compile + first run, per shape
    extra: dict = dataclasses.field(default_factory=dict)  # engine: steps, overhead, NaN count

    def summary(self) -> dict:
        return dict(
            **self.extra,
            backend=self.backend, startup_s=round(self.startup_s, 3),
            warmup_s={k: round(v, 2) for k, v in self.warmup_s.items()} if self.warmup_s else None,
            elapsed_s=round(self.elapsed_s, 3),
            requests_per_s=round(self.num_requests / self.elapsed_s, 4),
            total_tokens_per_s=round((self.num_prompt_tokens + self.num_output_tokens) / self.elapsed_s, 2),
            output_tokens_per_s=round(self.num_output_tokens / self.elapsed_s, 2))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.throughput", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct",
                   help=f"HF directory, .gguf file, the default model's name, or (with --load-format "
                        f"dummy) a preset: {', '.join(PRESETS)}")
    p.add_argument("--load-format", default="auto", choices=("auto", "safetensors", "gguf", "dummy"))
    p.add_argument("--tp", "--tensor-parallel-size", dest="tp", type=int, default=1)
    p.add_argument("--backend", default="dag", choices=BACKENDS)
    p.add_argument("--backends", default=None,
                   help="comma list run side by side on the same prompts (overrides --backend); "
                        "ratios are to the first")
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--num-prompts", type=int, default=1000)
    p.add_argument("--mixed", action="store_true",
                   help="input length and max_tokens each uniform in %d..%d per request" % MIXED_RANGE)
    p.add_argument("--nano-vllm", action="store_true",
                   help="nano-vllm's benchmark workload (its bench.py): Python's random seeded "
                        "with --seed, token ids uniform in 0..10000, each input length and then "
                        "each max_tokens uniform in 100..1024 (with --num-prompts 256: the "
                        "figure people quote)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    p.add_argument("--device", default="auto", help="auto (cuda where a GPU is visible, else cpu) "
                   "| cpu | cuda | spyre | tpu | tpu-emulated (hf: a torch device)")
    p.add_argument("--devices", default=None,
                   help="comma list of engine devices run side by side on the same prompts "
                        "(overrides --device for the engine backends); ratios are to the first")
    p.add_argument("--warmup-shapes", nargs="+", default=None, metavar="P,M,B",
                   help="spyre: prompt_len,max_new_tokens,batch_size of each compiled shape")
    p.add_argument("--compile-backend", default="inductor",
                   help="spyre, tpu-emulated: torch.compile backend (inductor | eager | sendnn)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--enforce-eager", action="store_true", help="GPU: no CUDA graphs")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--num-threads-per-rank", type=int, default=0,
                   help="torch threads per rank (0: the engine's default, cores / tp); "
                        "hf runs with this times --tp")
    p.add_argument("--disable-detokenize", action="store_true",
                   help="do not detokenize outputs (they are always detokenized when the model has a tokenizer)")
    p.add_argument("--hf-batch-size", type=int, default=0, help="hf backend: prompts per generate call; 0: all")
    p.add_argument("--lora-rank", type=int, default=16, help="rank of the random adapters")
    p.add_argument("--num-loras", type=int, default=0,
                   help="> 0: compare the base model, 1 adapter and this many (random, PEFT format)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--engine-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="an engine option for every engine run (repeatable), e.g. kv_reserve=1")
    p.add_argument("--profile-steps", default=None, metavar="START,N",
                   help="trace N steps of each engine run from its rank's step START on")
    p.add_argument("--profile-dir", default="/tmp/spmd-bench-profile")
    p.add_argument("--structured", default=None, choices=("json",),
                   help="each engine also runs every request under STRUCTURED_SCHEMA")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer path (structured outputs); default: the model's own, "
                        "SmolLM2's for a dummy preset")
    p.add_argument("--json-out", default=None, help="also write the JSON line to this file")
    args = p.parse_args(argv)
    if args.device == "auto":
        from spmd.config import detect_device

        args.device = detect_device()
    args.backends = [b.strip() for b in (args.backends or args.backend).split(",") if b.strip()]
    args.devices = [d.strip() for d in (args.devices or args.device).split(",") if d.strip()]
    if args.num_loras < 0 or args.lora_rank < 1:
        p.error("--num-loras must be >= 0 and --lora-rank >= 1")
    args.engine_args = {}
    for item in args.engine_arg:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            p.error(f"--engine-arg: {item!r} is not KEY=VALUE")
        args.engine_args[key.strip()] = _parse_value(value)
    if args.profile_steps is not None:
        try:
            start, num = (int(x) for x in args.profile_steps.split(","))
            assert start >= 0 and num >= 2
        except (ValueError, AssertionError):
            p.error(f"--profile-steps: {args.profile_steps!r} is not START,N (N >= 2)")
        args.profile_steps = (start, num)
    for b in args.backends:
        if b not in BACKENDS:
            p.error(f"--backends: unknown backend {b!r}; choose from {', '.join(BACKENDS)}")
    if any(b.partition("-")[0] == "inproc" for b in args.backends) and args.tp != 1:
        p.error(f"--backends: 'inproc' runs --tp 1 only, got --tp {args.tp}")
    if "spyre" in args.devices and not args.warmup_shapes:
        p.error("--warmup-shapes: --device spyre needs at least one P,M,B shape")
    if "hf" in args.backends and args.device in ("spyre", "tpu", "tpu-emulated"):
        p.error(f"--backends: hf runs on a torch device, not {args.device!r}; compare engine "
                "devices with --devices cpu,spyre")
    if is_preset(args.model) and args.load_format != "dummy":
        p.error(f"--model: preset {args.model!r} has no weights; add --load-format dummy")
    for name in ("num_prompts", "input_len", "output_len", "max_num_seqs", "max_num_batched_tokens"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}: must be >= 1")
    return args


# ---- workload ---------------------------------------------------------------------------

def make_workload(args, vocab_size: int) -> Workload:
    """Seeded random prompts drawn from the whole vocabulary."""
    n = args.num_prompts
    if getattr(args, "nano_vllm", False):
        import random

        py = random.Random(args.seed)
        prompts = [[py.randint(0, 10000) for _ in range(py.randint(100, 1024))] for _ in range(n)]
        return Workload(prompts, [py.randint(100, 1024) for _ in range(n)])
    rng = np.random.default_rng(args.seed)
    if args.mixed:
        lo, hi = MIXED_RANGE
        input_lens = rng.integers(lo, hi + 1, n)
        output_lens = rng.integers(lo, hi + 1, n)
    else:
        input_lens = np.full(n, args.input_len)
        output_lens = np.full(n, args.output_len)
    prompts = [rng.integers(0, vocab_size, int(k)).tolist() for k in input_lens]
    return Workload(prompts, [int(k) for k in output_lens])


def check_fits(workload: Workload, max_model_len: int) -> None:
    longest = max(len(p) + k for p, k in zip(workload.prompts, workload.output_lens))
    if longest > max_model_len:
        raise ValueError(f"input + output length: {longest} tokens exceed max_model_len={max_model_len}; "
                         "lower --input-len/--output-len or pick a longer model")


# ---- backends -----------------------------------------------------------------------------

def run_engine(backend: str, device: str, model_path: str, workload: Workload, args,
               adapters: list[str] = (), structured: str | None = None) -> Result:
    """One engine run; with ``adapters``, LoRA on and request i runs adapter i mod n;
    with ``structured="json"``, every request constrained by ``STRUCTURED_SCHEMA``."""
    from spmd import LLM, LoRARequest, SamplingParams, StructuredOutputsParams

    static = dict(warmup_shapes=";".join(args.warmup_shapes) if device == "spyre" else None,
                  compile_backend=args.compile_backend)
    label = backend if device == "cpu" else f"{backend}:{device}"
    backend, _, mode = backend.partition("-")
    modes = dict(async_scheduling=mode != "sync")
    if mode == "nooverlap":
        modes["overlap_rank_steps"] = False
    t0 = time.perf_counter()
    llm = LLM(model_path, tensor_parallel_size=args.tp, backend=backend, load_format=args.load_format,
              **{**modes, **args.engine_args},
              dtype=args.dtype, device=device, **static, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
              seed=args.seed, num_threads_per_rank=args.num_threads_per_rank,
              skip_tokenizer_init=not (args.tokenizer or _has_tokenizer(model_path)),
              **(dict(tokenizer=args.tokenizer) if args.tokenizer else {}),
              gpu_memory_utilization=args.gpu_memory_utilization, enforce_eager=args.enforce_eager,
              **(dict(enable_lora=True, max_loras=len(adapters), max_lora_rank=args.lora_rank)
                 if adapters else {}))
    try:
        startup_s = time.perf_counter() - t0
        guided = StructuredOutputsParams(json=STRUCTURED_SCHEMA) if structured else None
        params = [SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=k,
                                 # --structured: both runs detokenize (the check reads text)
                                 detokenize=not args.disable_detokenize or bool(args.structured),
                                 structured_outputs=guided) for k in workload.output_lens]
        prompts = [{"prompt_token_ids": p} for p in workload.prompts]
        loras = [LoRARequest(f"adapter{i}", i + 1, path) for i, path in enumerate(adapters)]
        for lora in loras:  # loaded before the clock starts, as a server loads them at deploy
            llm.engine.add_lora(lora)
        per_prompt = [loras[i % len(loras)] for i in range(len(prompts))] if loras else None
        steps = _record_steps(llm.engine)
        trace = None
        if args.profile_steps:
            os.makedirs(args.profile_dir, exist_ok=True)
            trace = os.path.join(args.profile_dir, f"{label.replace(':', '_')}.json")
            llm.engine.call_all("profile_steps", *args.profile_steps, trace)
        t0 = time.perf_counter()
        outputs = llm.generate(prompts, params, lora_request=per_prompt)
        elapsed_s = time.perf_counter() - t0
        if trace:
            steps_profile = llm.engine.call_all("profile_result")[0]
        extra = dict(step_stats(steps), num_kv_blocks=llm.engine.num_kv_blocks,
                     **(dict(profile={k: v for k, v in steps_profile.items() if k != "step_gaps_ms"})
                        if trace else {}),
                     preemptions=llm.engine.stats_total["preemptions"],
                     nonfinite_steps=max(llm.engine.call_all("nonfinite_steps")))
        warmup_s = llm.engine.warmup_times_s
        if structured:
            extra.update(structured_check(outputs))
    finally:
        llm.shutdown()
    label += f"+lora{len(adapters)}" if adapters else ""
    label += f"+{structured}" if structured else ""
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    if generated != workload.num_output_tokens:
        print(f"warning: {label} generated {generated} tokens, {workload.num_output_tokens} requested",
              file=sys.stderr)
    return Result(label, startup_s, elapsed_s, len(outputs), workload.num_prompt_tokens,
                  workload.num_output_tokens, warmup_s or None, extra)


def structured_check(outputs) -> dict:
    """How many constrained outputs hold one whole JSON value that validates (with
    ``ignore_eos`` a finished grammar then emits only end tokens), how many do not parse
    (cut by ``max_tokens`` inside the value) and how many parse but do not validate."""
    import jsonschema

    valid = cut = bad = 0
    for out in outputs:
        text = out.outputs[0].text.strip()
        try:
            jsonschema.validate(json.loads(text), STRUCTURED_SCHEMA)
            valid += 1
        except json.JSONDecodeError:
            cut += 1
        except jsonschema.ValidationError:
            bad += 1
    return dict(structured_valid=valid, structured_unparsed=cut,
                structured_invalid=bad)


def _record_steps(engine) -> list[dict]:
    """Collects every step's ``last_step_stats`` (engine-side timings) while generating."""
    records: list[dict] = []
    inner = engine.step

    def step():
        before = engine.last_step_stats
        out = inner()
        if engine.last_step_stats is not before:
            records.append(engine.last_step_stats)
        return out

    engine.step = step
    return records


def step_stats(records: list[dict]) -> dict:
    """Step counts and the engine's own cost per step, as medians over pure decode steps
    of at least 7/8 of the largest decode batch seen: the step's wall time (from the step
    before's output to its own: with overlapped steps, schedule and send are hidden), the
    rank's model time (forward and sampling), the difference (engine time not hidden
    behind the model), and the rank's idle time before the forward (host work the device
    waits through)."""
    decode = [(i, r) for i, r in enumerate(records) if r["num_tokens"] == r["num_seqs"]]
    out = dict(steps=len(records), decode_steps=len(decode))
    # Wall time by kind of step (from the step before's output to this one's), so that a
    # gap between backends shows whether decode or prefill (mixed) steps hold it.
    walls = [r["done_at"] - q["done_at"] for q, r in zip(records, records[1:])]
    is_decode = [r["num_tokens"] == r["num_seqs"] for r in records[1:]]
    out.update(decode_wall_s=round(sum(w for w, d in zip(walls, is_decode) if d), 3),
               mixed_wall_s=round(sum(w for w, d in zip(walls, is_decode) if not d), 3),
               mixed_model_s=round(sum(r["model_time_s"] for r in records[1:]
                                       if r["num_tokens"] != r["num_seqs"]), 3),
               first_step_s=round(records[0]["round_trip_s"] + records[0]["schedule_encode_s"], 3)
               if records else 0.0)
    if not decode:
        return out
    largest = max(r["num_seqs"] for _, r in decode)
    big = [(i, r) for i, r in decode if r["num_seqs"] >= largest * 7 // 8 and i > 0]
    if not big:
        return dict(out, max_decode_batch=largest)
    wall = [r["done_at"] - records[i - 1]["done_at"] for i, r in big]
    model = [r["model_time_s"] for _, r in big]
    ms = lambda xs: round(1e3 * float(np.median(xs)), 3)  # noqa: E731
    return dict(out, max_decode_batch=largest, decode_step_ms=ms(wall),
                decode_model_ms=ms(model),
                decode_overhead_ms=ms([w - m for w, m in zip(wall, model)]),
                decode_idle_ms=ms([r.get("idle_s", 0.0) for _, r in big]))


def run_hf(model_path: str, workload: Workload, args, adapters: list[str] = ()) -> Result:
    """transformers ``generate``: greedy, EOS disabled, left padding with an attention mask.
    With ``adapters``: PEFT, every adapter loaded, row i of a batch on adapter i mod n
    (PEFT's mixed-batch ``adapter_names``; one adapter is simply the active one)."""
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM

    from workers.model_loader import load_hf_config, resolve_model_path

    t0 = time.perf_counter()
    if args.num_threads_per_rank:
        torch.set_num_threads(args.num_threads_per_rank * args.tp)
    dtype = getattr(torch, _dtype_name(args.dtype, args.device))
    if args.load_format == "dummy":
        torch.manual_seed(args.seed)
        with torch.device(args.device):  # a 7B model is drawn on the GPU in seconds
            model = AutoModelForCausalLM.from_config(load_hf_config(model_path), dtype=dtype)
    else:
        folder, gguf_file = resolve_model_path(model_path)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=dtype)
    model = model.to(args.device).eval()
    names = [f"adapter{i}" for i in range(len(adapters))]
    if adapters:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapters[0], adapter_name=names[0]).eval()
        for name, path in zip(names[1:], adapters[1:]):
            model.load_adapter(path, adapter_name=name)
        model = model.to(device=args.device, dtype=dtype)
    gen = model.generation_config
    gen.eos_token_id = None  # never stop early: the same tokens as ignore_eos=True
    gen.do_sample, gen.temperature, gen.top_p, gen.top_k = False, None, None, None
    pad_id = gen.pad_token_id if gen.pad_token_id is not None else 0
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    startup_s = time.perf_counter() - t0

    n = len(workload.prompts)
    size = args.hf_batch_size or n
    t0 = time.perf_counter()
    with torch.inference_mode():
        for start in tqdm(range(0, n, size), desc="hf generate", unit="batch"):
            prompts = workload.prompts[start:start + size]
            max_new = max(workload.output_lens[start:start + size])
            width = max(len(p) for p in prompts)
            ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, p in enumerate(prompts):
                ids[i, width - len(p):] = torch.tensor(p)
                mask[i, width - len(p):] = 1
            mixed = dict(adapter_names=[names[(start + i) % len(names)] for i in range(len(prompts))]
                         ) if len(names) > 1 else {}
            out = model.generate(input_ids=ids.to(args.device), attention_mask=mask.to(args.device),
                                 max_new_tokens=max_new, do_sample=False, pad_token_id=pad_id,
                                 **mixed)
            assert out.shape[1] == width + max_new, out.shape
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    elapsed_s = time.perf_counter() - t0
    del model
    label = f"hf+lora{len(adapters)}" if adapters else "hf"
    return Result(label, startup_s, elapsed_s, n, workload.num_prompt_tokens, workload.num_output_tokens)


def _parse_value(text: str):
    """``--engine-arg`` values: ints, floats, true/false/none, else the string."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered == "none":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _dtype_name(dtype: str, device: str) -> str:
    # the same rule as spmd.EngineConfig.dtype
    if dtype != "auto":
        return dtype
    return "float32" if device == "cpu" else "bfloat16"


def _has_tokenizer(model_path: str) -> bool:
    if model_path.endswith(".gguf"):
        return True
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
    if os.path.isdir(model_path):
        files = set(os.listdir(model_path))
        return bool(files & set(names)) or any(f.endswith(".gguf") for f in files)
    return False


# ---- report -------------------------------------------------------------------------------

def emit_json(record: dict, path: str | None) -> dict:
    """Prints the benchmark's one JSON line (and writes it to ``path`` if given)."""
    line = json.dumps(record)
    print(line, flush=True)
    if path:
        with open(path, "w") as f:
            f.write(line + "\n")
    return record


def machine_info() -> dict:
    """Where and when a number was taken (recorded with every result)."""
    import torch

    info = dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        host=platform.node(), platform=platform.platform(), python=platform.python_version(),
        cpu=_cpu_model(), cpu_count=os.cpu_count(), load_avg_1m=round(os.getloadavg()[0], 2),
        torch=torch.__version__, gpu=None, git_commit=_git_commit())
    if torch.cuda.is_available():
        info["gpu"] = f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}"
    try:
        import ray

        info["ray"] = ray.__version__
    except ImportError:
        pass
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=5, cwd=os.path.dirname(os.path.abspath(__file__)))
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def print_table(results: list[dict]) -> None:
    base = results[0]["output_tokens_per_s"]
    header = f"{'backend':<16} {'startup s':>9} {'elapsed s':>9} {'req/s':>8} {'total tok/s':>11} " \
             f"{'out tok/s':>10} {'× ' + results[0]['backend']:>8}"
    print(header)
    print("-" * len(header))
    for r in results:
        print(f"{r['backend']:<16} {r['startup_s']:>9.1f} {r['elapsed_s']:>9.2f} {r['requests_per_s']:>8.2f} "
              f"{r['total_tokens_per_s']:>11.1f} {r['output_tokens_per_s']:>10.1f} "
              f"{r['output_tokens_per_s'] / base:>8.2f}")


# ---- main ---------------------------------------------------------------------------------

def main(argv=None) -> dict:
    """Runs the benchmark; returns the dict printed as the JSON line."""
    args = parse_args(argv)
    from spmd.config import resolve_model
    from workers.model_loader import load_hf_config

    overrides = {}
    if args.structured and is_preset(args.model):  # a preset has no tokenizer: SmolLM2's
        from spmd.config import DEFAULT_MODEL
        from spmd.tokenizer import load_tokenizer

        args.tokenizer = resolve_model(args.tokenizer or DEFAULT_MODEL)
        tok = load_tokenizer(args.tokenizer)
        overrides = dict(vocab_size=len(tok), eos_token_id=tok.eos_token_id,
                         bos_token_id=tok.bos_token_id)
    elif args.tokenizer:
        args.tokenizer = resolve_model(args.tokenizer)
    model_path = (materialize(args.model, **overrides) if is_preset(args.model)
                  else resolve_model(args.model))
    hf_config = load_hf_config(model_path)
    workload = make_workload(args, hf_config.vocab_size)
    check_fits(workload, args.max_model_len or getattr(hf_config, "max_position_embeddings", None) or 2048)

    import ray

    ray_was_up = ray.is_initialized()
    results = []
    try:
        adapters = []
        if args.num_loras:
            import tempfile

            from bench.adapters import write_random_adapters

            root = tempfile.mkdtemp(prefix="spmd-bench-lora-")
            adapters = write_random_adapters(root, hf_config, args.lora_rank, args.num_loras,
                                             seed=args.seed, dtype=_dtype_name(args.dtype, args.device))
        lora_sets = [[], adapters[:1], adapters] if args.num_loras > 1 else [[], adapters] \
            if args.num_loras else [[]]
        kinds = [None, args.structured] if args.structured else [None]
        runs = [(b, d, s, k) for d in args.devices for b in args.backends if b != "hf"
                for s in lora_sets for k in kinds]
        runs += [("hf", args.device, s, None) for s in lora_sets] if "hf" in args.backends else []
        for backend, device, lora_set, structured in runs:
            if backend == "hf":
                result = run_hf(model_path, workload, args, lora_set)
            else:
                result = run_engine(backend, device, model_path, workload, args, lora_set,
                                    structured)
            results.append(result.summary())
            r = results[-1]
            print(f"Throughput: {r['requests_per_s']:.2f} requests/s, {r['total_tokens_per_s']:.2f} "
                  f"total tokens/s, {r['output_tokens_per_s']:.2f} output tokens/s "
                  f"(backend={r['backend']}, startup {r['startup_s']:.1f} s)", flush=True)
            for shape, seconds in (r["warmup_s"] or {}).items():
                print(f"  warm-up {shape}: {seconds:.1f} s", flush=True)
            if "decode_overhead_ms" in r:
                print(f"  {r['steps']} steps, {r['preemptions']} preemptions, NaN/Inf steps "
                      f"{r['nonfinite_steps']}; decode at batch ~{r['max_decode_batch']}: step "
                      f"{r['decode_step_ms']} ms, model {r['decode_model_ms']} ms, engine overhead "
                      f"{r['decode_overhead_ms']} ms (rank idle before the forward "
                      f"{r['decode_idle_ms']} ms)", flush=True)
            if r.get("profile"):
                prof = r["profile"]
                print(f"  profiled {args.profile_steps[1]} steps: device busy "
                      f"{prof.get('busy_share', 0):.1%}, gap between steps median "
                      f"{prof.get('step_gap_median_ms', 0):.3f} ms, max "
                      f"{prof.get('step_gap_max_ms', 0):.3f} ms ({prof['trace']})", flush=True)
    finally:
        if not ray_was_up and ray.is_initialized():
            ray.shutdown()
    if len(results) > 1:
        print_table(results)
    base = results[0]["output_tokens_per_s"]
    for r in results:
        r["ratio_vs_first"] = round(r["output_tokens_per_s"] / base, 4)
    record = dict(
        results[0], backends=args.backends, devices=args.devices,
        warmup_shapes=args.warmup_shapes, compile_backend=args.compile_backend, tp=args.tp, model=args.model, load_format=args.load_format,
        dtype=_dtype_name(args.dtype, args.device), num_prompts=args.num_prompts,
        input_len=None if args.mixed or args.nano_vllm else args.input_len,
        output_len=None if args.mixed or args.nano_vllm else args.output_len, mixed=args.mixed,
        nano_vllm=args.nano_vllm or None,
        num_prompt_tokens=workload.num_prompt_tokens, num_output_tokens=workload.num_output_tokens,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        num_threads_per_rank=args.num_threads_per_rank or None,
        hf_batch_size=(args.hf_batch_size or args.num_prompts) if "hf" in args.backends else None,
        lora_rank=args.lora_rank if args.num_loras else None, num_loras=args.num_loras or None,
        seed=args.seed, engine_args=args.engine_args or None, structured=args.structured,
        tokenizer=args.tokenizer,
        results=results, command=" ".join(["python -m bench.throughput", *(argv or sys.argv[1:])]),
        machine=machine_info())
    return emit_json(record, args.json_out)


def run_cli(main, errors: tuple[type[BaseException], ...] = (ValueError,)) -> None:
    """A bench's ``__main__``: ``errors`` print one ``error:`` line and exit 2 (no
    traceback for a bad flag or model); Ctrl-C exits 130."""
    try:
        main()
    except errors as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    run_cli(main)
