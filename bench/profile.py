"""Where an engine step's time goes, per module and per op, under the PyTorch profiler.

    python -m bench.profile --model llama2-7b --load-format dummy --device cuda \\
        --batch-size 32 --input-len 512 --steps 5 --phase both

The engine runs with ``backend="inproc"``, so the rank's model lives in this
process. A batch of ``--batch-size`` random prompts is prefilled and decoded for
``--warmup-steps`` outside the profiler; then ``--steps`` decode steps (and/or
the prefill of a fresh batch, or one mixed step where ``--mixed-prompts`` new
prompts prefill beside the decoding batch, ``--phase``) run under ``torch.profiler`` with
input shapes recorded; on a GPU eagerly, unless ``--cuda-graphs``. While
profiling, forward pre/post hooks on every module open and close a
``record_function`` range named for the module's path (the Chrome trace shows
``model.layers.3.self_attn``); the tables aggregate the layers
(``model.layers.*.self_attn``). Printed per phase, per step:

* modules: calls, CPU total and self µs, CUDA µs, % of the step (CUDA time on a
  GPU, CPU time on the CPU), and the module's own ops with their input shapes,
  our custom ``spmd::`` ops first. The ranges add a few µs of CPU time per
  module call; CUDA times are unaffected;
* ops: the top ops by self CUDA time (self CPU time on the CPU), grouped by
  input shape, every ``spmd::`` op included and marked ``*``.

Then one JSON line, and the Chrome trace (``--trace``; with ``--phase both``
one file per phase, ``NAME.decode.json`` and ``NAME.prefill.json``).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import os
import re
import sys

import numpy as np
import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

from bench.presets import PRESETS, is_preset, materialize
from bench.throughput import emit_json, machine_info, run_cli

STEP_RANGE = "engine.step"
MODULE_PREFIX = "module: "  # record_function names of module ranges
SAMPLER = "sampler"
_LAYER_INDEX = re.compile(r"\.\d+(?=\.|$)")


def parse_args(argv=None) -> argparse.Namespace:
    from spmd.config import DEFAULT_MODEL

    p = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"HF directory, .gguf file, the default model's name, or (with --load-format "
                        f"dummy) a preset: {', '.join(PRESETS)}")
    p.add_argument("--load-format", default="auto", choices=("auto", "safetensors", "gguf", "dummy"))
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="auto: cuda where a GPU is visible, else cpu")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="cuda: decode replays CUDA graphs, as when serving; the graph's kernels are in "
                        "the trace but in no table row. Default: eager, so every module is attributed")
    p.add_argument("--batch-size", type=int, default=8, help="requests decoding together")
    p.add_argument("--input-len", type=int, default=128, help="prompt tokens per request")
    p.add_argument("--phase", default="decode", choices=("decode", "prefill", "both", "mixed"),
                   help="profile decode steps, the prefill of a fresh batch, both (one after the "
                        "other), or one mixed step (--mixed-prompts prefilling beside the batch)")
    p.add_argument("--warmup-steps", type=int, default=3, help="decode steps run before profiling")
    p.add_argument("--steps", type=int, default=5, help="decode steps profiled")
    p.add_argument("--trace", default=os.path.join(os.path.dirname(__file__), "out", "profile_trace.json"),
                   help="Chrome trace (chrome://tracing, Perfetto); default under bench/out/ (not tracked)")
    p.add_argument("--top", type=int, default=20, help="rows of the op table (spmd:: ops always shown)")
    p.add_argument("--mixed-prompts", type=int, default=0,
                   help="--phase mixed: new prompts of --input-len tokens prefilled in one step "
                        "beside the --batch-size decoding requests")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="default: batch size x input length, so that the prefill is one step")
    p.add_argument("--num-threads-per-rank", type=int, default=0, help="torch threads; 0: the engine's default")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json-out", default=None, help="also write the JSON line to this file")
    args = p.parse_args(argv)
    if args.device == "auto":
        from spmd.config import detect_device

        args.device = detect_device()
    if is_preset(args.model) and args.load_format != "dummy":
        p.error(f"--model: preset {args.model!r} has no weights; add --load-format dummy")
    for name in ("batch_size", "input_len", "steps", "top"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}: must be >= 1")
    if args.phase == "mixed" and args.mixed_prompts < 1:
        p.error("--phase mixed: needs --mixed-prompts >= 1")
    if args.phase == "mixed" and args.steps != 1:
        p.error("--phase mixed: profiles one step; --steps must be 1")
    if args.warmup_steps < 0:
        p.error("--warmup-steps: must be >= 0")
    if args.cuda_graphs and args.device != "cuda":
        p.error("--cuda-graphs: needs --device cuda")
    if args.max_num_batched_tokens is not None and args.max_num_batched_tokens < args.batch_size:
        p.error(f"--max-num-batched-tokens: must be >= --batch-size ({args.batch_size})")
    return args


# ---- module ranges ---------------------------------------------------------------------

class _RangedCall:
    """The sampler (not a module), its calls and its methods' run inside a
    ``record_function`` range."""

    def __init__(self, name: str, fn):
        self.name, self.fn = name, fn

    def __call__(self, *args, **kwargs):
        with record_function(self.name):
            return self.fn(*args, **kwargs)

    def __getattr__(self, attr: str):
        method = getattr(self.fn, attr)
        return _RangedCall(self.name, method) if callable(method) else method


class ModuleRanges:
    """While entered, every module's forward (and the worker's sampler) runs inside a
    ``record_function`` range named ``MODULE_PREFIX + path``; hooks are removed on exit."""

    def __init__(self, worker):
        self.worker = worker
        self.classes: dict[str, str] = {SAMPLER: type(worker.sampler).__name__}  # aggregated name -> class
        self._handles = []
        self._open: list = []  # ranges entered by pre-hooks, innermost last

    def __enter__(self) -> ModuleRanges:
        model = self.worker.model
        for path, module in model.named_modules():
            name = path or type(module).__name__
            self.classes[aggregate_name(name)] = type(module).__name__
            self._handles.append(module.register_forward_pre_hook(self._pre_hook(MODULE_PREFIX + name)))
            # always_call: the range closes even when forward raises.
            self._handles.append(module.register_forward_hook(self._post_hook, always_call=True))
        self.worker.sampler = _RangedCall(MODULE_PREFIX + SAMPLER, self.worker.sampler)
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if isinstance(self.worker.sampler, _RangedCall):
            self.worker.sampler = self.worker.sampler.fn
        assert not self._open, f"{len(self._open)} module ranges left open"

    def _pre_hook(self, range_name: str):
        def hook(module, args):
            rf = record_function(range_name)
            rf.__enter__()
            self._open.append(rf)
        return hook

    def _post_hook(self, module, args, output):
        self._open.pop().__exit__(None, None, None)


def aggregate_name(name: str) -> str:
    """``model.layers.3.self_attn`` -> ``model.layers.*.self_attn``."""
    return _LAYER_INDEX.sub(".*", name)


# ---- driving the engine ----------------------------------------------------------------

def build_engine(model_path: str, args):
    from spmd.config import EngineConfig
    from spmd.engine import Engine

    # Module hooks do not run inside a CUDA-graph replay; the CPU has no graphs to turn off.
    device_options = dict(enforce_eager=not args.cuda_graphs) if args.device == "cuda" else {}
    config = EngineConfig.from_kwargs(
        model=model_path, backend="inproc", load_format=args.load_format, dtype=args.dtype,
        device=args.device, max_num_seqs=args.batch_size + args.mixed_prompts,
        max_model_len=args.max_model_len,
        max_num_batched_tokens=args.max_num_batched_tokens or args.batch_size * args.input_len,
        num_threads_per_rank=args.num_threads_per_rank, seed=args.seed, skip_tokenizer_init=True,
        async_scheduling=False, **device_options)  # steps profiled one at a time
    return Engine(config, stream_outputs=False)


def add_batch(engine, args, first_id: int, seed: int, count: int | None = None) -> list[str]:
    """``count`` (``--batch-size``) random prompts that decode past every step this program runs."""
    from spmd import SamplingParams

    max_tokens = args.warmup_steps + args.steps + 2
    if args.input_len + max_tokens > engine.max_model_len:
        raise ValueError(f"input + output length: {args.input_len + max_tokens} tokens exceed "
                         f"max_model_len={engine.max_model_len}; lower --input-len or --steps")
    rng = np.random.default_rng(seed)
    params = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=max_tokens, detokenize=False)
    ids = [str(first_id + i) for i in range(args.batch_size if count is None else count)]
    for request_id in ids:
        prompt = rng.integers(0, engine.hf_config.vocab_size, args.input_len).tolist()
        engine.add_request(request_id, {"prompt_token_ids": prompt}, params)
    return ids


def run_prefill(engine, num_requests: int) -> int:
    """Steps until every new request has sampled its first token; returns the step count."""
    target = engine.stats_total["generation_tokens"] + num_requests
    steps = 0
    while engine.stats_total["generation_tokens"] < target:
        with record_function(STEP_RANGE):
            engine.step()
        steps += 1
    return steps


def run_decode(engine, num_steps: int) -> int:
    for _ in range(num_steps):
        with record_function(STEP_RANGE):
            engine.step()
    return num_steps


def profiled(phase: str, worker, device: str, trace_path: str, run) -> tuple[object, ModuleRanges, int]:
    """Runs ``run()`` (which returns its step count) under the profiler and module ranges."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities, record_shapes=True) as prof:
        with ModuleRanges(worker) as ranges:
            num_steps = run()
        if device == "cuda":
            torch.cuda.synchronize()
    os.makedirs(os.path.dirname(os.path.abspath(trace_path)), exist_ok=True)
    prof.export_chrome_trace(trace_path)
    print(f"{phase}: {num_steps} steps profiled; Chrome trace: {trace_path}", file=sys.stderr)
    return prof, ranges, num_steps


# ---- tables from the profile -----------------------------------------------------------

@dataclasses.dataclass
class ModuleRow:
    name: str  # aggregated path, e.g. model.layers.*.mlp; or engine.step
    module_class: str
    parent: str | None
    depth: int
    calls: float  # per step, as are the times
    cpu_us: float
    self_cpu_us: float
    device_us: float
    ops: list[str]  # the module's own ops with input shapes, spmd:: first


@dataclasses.dataclass
class OpRow:
    name: str
    input_shapes: str
    calls: float  # per step, as are the times
    self_cpu_us: float
    cpu_us: float
    self_device_us: float
    device_us: float


def _range_key(event) -> str | None:
    if event.device_type != DeviceType.CPU:
        return None
    if event.name == STEP_RANGE:
        return STEP_RANGE
    if event.name.startswith(MODULE_PREFIX):
        return aggregate_name(event.name[len(MODULE_PREFIX):])
    return None


def module_rows(events, num_steps: int, classes: dict[str, str], on_device: bool) -> list[ModuleRow]:
    """One row per aggregated range, in first-call (so tree) order."""
    rows: dict[str, ModuleRow] = {}
    op_times: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for e in sorted(events, key=lambda e: e.time_range.start):
        key = _range_key(e)
        if key is None:
            continue
        if key not in rows:
            parent = e.cpu_parent
            while parent is not None and _range_key(parent) is None:
                parent = parent.cpu_parent
            parent_key = _range_key(parent) if parent is not None else None
            depth = rows[parent_key].depth + 1 if parent_key in rows else 0
            rows[key] = ModuleRow(key, classes.get(key, ""), parent_key, depth, 0, 0.0, 0.0, 0.0, [])
        row = rows[key]
        row.calls += 1
        row.cpu_us += e.cpu_time_total
        row.self_cpu_us += e.self_cpu_time_total
        row.device_us += e.device_time_total
        if key != STEP_RANGE:
            for child in e.cpu_children:
                if "::" in child.name and _range_key(child) is None:
                    cost = child.device_time_total if on_device else child.cpu_time_total
                    op_times[key][f"{child.name}({format_shapes(child.input_shapes)})"] += cost
    for row in rows.values():
        row.calls /= num_steps
        row.cpu_us /= num_steps
        row.self_cpu_us /= num_steps
        row.device_us /= num_steps
        ranked = [op for op, _ in op_times[row.name].most_common()]
        custom = [op for op in ranked if op.startswith("spmd::")]
        row.ops = custom or ranked[:1]
    return list(rows.values())


def op_rows(prof, num_steps: int, top: int, on_device: bool) -> list[OpRow]:
    """Top ops by self time (device time on a GPU), grouped by input shape, plus every spmd:: op."""
    # Dispatcher ops have namespaced names (aten::mm, spmd::paged_attention); this leaves out
    # our ranges, CUDA runtime calls and the profiler's own bookkeeping.
    averages = [a for a in prof.key_averages(group_by_input_shape=True)
                if a.device_type == DeviceType.CPU and "::" in a.key]
    averages.sort(key=lambda a: a.self_device_time_total if on_device else a.self_cpu_time_total,
                  reverse=True)
    chosen = averages[:top] + [a for a in averages[top:] if a.key.startswith("spmd::")]
    return [OpRow(a.key, format_shapes(a.input_shapes), a.count / num_steps,
                  a.self_cpu_time_total / num_steps, a.cpu_time_total / num_steps,
                  a.self_device_time_total / num_steps, a.device_time_total / num_steps)
            for a in chosen]


def format_shapes(shapes) -> str:
    """``[[4, 32, 128], [], [4]]`` -> ``4x32x128, -, 4`` (``-``: not a tensor, or 0-dim)."""
    def one(shape) -> str:
        if not shape:
            return "-"
        if isinstance(shape[0], (list, tuple)):  # a tensor list
            return "[" + ", ".join(one(s) for s in shape) + "]"
        return "x".join(str(d) for d in shape)
    return ", ".join(one(s) for s in shapes or [])


def nesting_errors(rows: list[ModuleRow]) -> list[str]:
    """Children within their parent: each child's and the children's summed times <= the parent's."""
    by_name = {r.name: r for r in rows}
    children: dict[str, list[ModuleRow]] = collections.defaultdict(list)
    for r in rows:
        if r.parent is not None:
            children[r.parent].append(r)
    errors = []
    for parent_name, kids in children.items():
        parent = by_name[parent_name]
        for field in ("cpu_us", "device_us"):
            total = sum(getattr(k, field) for k in kids)
            # 1e-3 µs: float rounding of the per-step division, not a real overlap
            if total > getattr(parent, field) + 1e-3:
                errors.append(f"{parent_name}: children's {field} {total:.1f} > parent's "
                              f"{getattr(parent, field):.1f}")
    return errors


# ---- report ----------------------------------------------------------------------------

def print_module_table(phase: str, rows: list[ModuleRow], on_device: bool) -> None:
    step = next(r for r in rows if r.name == STEP_RANGE)
    base = step.device_us if on_device else step.cpu_us
    names = ["  " * r.depth + r.name for r in rows]
    width = max(len(n) for n in names)
    cls_width = max(len(r.module_class) for r in rows)
    share = "% CUDA" if on_device else "% CPU"
    header = (f"{'module':<{width}} {'class':<{cls_width}} {'calls':>6} {'CPU µs':>10} {'self CPU':>10} "
              f"{'CUDA µs':>10} {share:>6}  op shapes")
    print(f"\n== {phase}: per module, per step ==")
    print(header)
    print("-" * len(header))
    for name, r in zip(names, rows):
        spent = r.device_us if on_device else r.cpu_us
        cuda = f"{r.device_us:10.1f}" if on_device else f"{'-':>10}"
        print(f"{name:<{width}} {r.module_class:<{cls_width}} {r.calls:>6.4g} {r.cpu_us:>10.1f} "
              f"{r.self_cpu_us:>10.1f} {cuda} {100 * spent / base if base else 0:>6.1f}  {'; '.join(r.ops)}")


def print_op_table(phase: str, ops: list[OpRow], step: ModuleRow, on_device: bool) -> None:
    base = step.device_us if on_device else step.cpu_us
    width = max(len(o.name) for o in ops) + 2
    sort = "self CUDA" if on_device else "self CPU"
    header = (f"{'op':<{width}} {'calls':>6} {'self CPU':>10} {'CPU µs':>10} {'self CUDA':>10} "
              f"{'CUDA µs':>10} {'% ' + sort:>12}  input shapes")
    print(f"\n== {phase}: top ops by {sort} time, per step (* spmd:: custom ops) ==")
    print(header)
    print("-" * len(header))
    for o in ops:
        mark = "* " if o.name.startswith("spmd::") else "  "
        spent = o.self_device_us if on_device else o.self_cpu_us
        cuda = f"{o.self_device_us:10.1f} {o.device_us:10.1f}" if on_device else f"{'-':>10} {'-':>10}"
        print(f"{mark + o.name:<{width}} {o.calls:>6.4g} {o.self_cpu_us:>10.1f} {o.cpu_us:>10.1f} {cuda} "
              f"{100 * spent / base if base else 0:>12.1f}  {o.input_shapes}")


def trace_path(path: str, phase: str, num_phases: int) -> str:
    if num_phases == 1:
        return path
    root, ext = os.path.splitext(path)
    return f"{root}.{phase}{ext or '.json'}"


# ---- main ------------------------------------------------------------------------------

def main(argv=None) -> dict:
    """Profiles the phases; prints the tables and returns the dict printed as the JSON line."""
    args = parse_args(argv)
    from dag.inproc import InProcTransport
    from spmd.config import resolve_model

    model_path = materialize(args.model) if is_preset(args.model) else resolve_model(args.model)
    phases = ("decode", "prefill") if args.phase == "both" else (args.phase,)
    on_device = args.device == "cuda"
    engine = build_engine(model_path, args)
    results = {}
    try:
        assert isinstance(engine.transport, InProcTransport), type(engine.transport)
        worker = engine.transport.worker
        batch = add_batch(engine, args, 0, args.seed)
        run_prefill(engine, len(batch))  # warm-up, outside the profiler
        run_decode(engine, args.warmup_steps)
        for phase in phases:
            if phase == "decode":
                run = lambda: run_decode(engine, args.steps)  # noqa: E731
            elif phase == "mixed":
                # New prompts beside the decoding batch: one step prefills them (as far as
                # --max-num-batched-tokens allows) and decodes the batch.
                add_batch(engine, args, len(batch), args.seed + 1, args.mixed_prompts)
                run = lambda: run_decode(engine, 1)  # noqa: E731
            else:
                # A fresh batch alone: finish the running one, then profile the new prompts' prefill.
                for request_id in batch:
                    engine.abort_request(request_id)
                engine.step()  # frees the finished requests on the rank
                batch = add_batch(engine, args, len(batch), args.seed + 1)
                run = lambda: run_prefill(engine, len(batch))  # noqa: E731
            path = trace_path(args.trace, phase, len(phases))
            prof, ranges, num_steps = profiled(phase, worker, args.device, path, run)
            modules = module_rows(prof.events(), num_steps, ranges.classes, on_device)
            ops = op_rows(prof, num_steps, args.top, on_device)
            errors = nesting_errors(modules)
            for error in errors:
                print(f"warning: {phase}: module times do not nest: {error}", file=sys.stderr)
            step = next(r for r in modules if r.name == STEP_RANGE)
            print_module_table(phase, modules, on_device)
            print_op_table(phase, ops, step, on_device)
            results[phase] = dict(
                steps=num_steps, step_cpu_us=round(step.cpu_us, 1),
                step_device_us=round(step.device_us, 1) if on_device else None,
                trace=path, nesting_ok=not errors,
                modules=[dataclasses.asdict(r) for r in modules], ops=[dataclasses.asdict(o) for o in ops])
    finally:
        engine.shutdown()
    record = dict(
        model=args.model, load_format=args.load_format, device=args.device, dtype=engine.config.dtype,
        batch_size=args.batch_size, input_len=args.input_len, warmup_steps=args.warmup_steps,
        phases=results, command=" ".join(["python -m bench.profile", *(argv or sys.argv[1:])]),
        machine=machine_info())
    print()
    return emit_json(record, args.json_out)


if __name__ == "__main__":
    run_cli(main)
