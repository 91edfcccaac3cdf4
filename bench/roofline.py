"""The floor of an offline throughput run, counted (METHOD.md: count first, then measure).

    python -m bench.roofline --model llama2-70b --tp 4 --gpu h200 --num-prompts 512 \\
        --input-len 256 --output-len 256

For a dense decoder (a preset or a model directory; its parameters are counted on the
``meta`` device), ``num_prompts`` requests of ``input_len`` prompt and ``output_len``
output tokens, at tensor-parallel size ``tp``:

- **Prefill** is matmul-bound: 2 FLOP per parameter per prompt token (+ causal attention),
  split over the ranks, at the GPU's bf16 matmul rate.
- **Decode** runs in waves of as many requests as the KV cache holds (and
  ``max_num_seqs`` allows); each step takes the longer of reading the rank's weights plus
  every running request's KV at HBM bandwidth, and its matmuls at the bf16 rate.
- **All-reduce**: two per layer per step (after attention and after the MLP) of
  tokens × hidden bf16 values, ring-style (2(tp-1)/tp of the bytes over the link) plus a
  fixed latency each; none of it overlapped with compute (it is not, in this engine).

The rates are the ones measured on these machines (bench/GPU_NOTES.md, REFERENCE.md),
not the data-sheet peaks, so the floor is what a perfect engine would reach here.
Nothing is run: it prints a JSON line (seconds per phase, total tok/s at the floor).
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class GPU:
    name: str
    hbm_gb: float  # usable device memory
    hbm_tbps: float  # measured device-copy bandwidth (read + write counted)
    bf16_tflops: float  # measured dense bf16 matmul rate
    link_gbps: float  # all-reduce bus bandwidth between the GPUs of one host (NCCL busbw)
    collective_us: float  # fixed cost of one small all-reduce


GPUS = {
    "h100": GPU("H100 80GB HBM3", 79.0, 3.0, 790.0, 360.0, 8.0),
    "h200": GPU("H200 141GB HBM3e", 139.0, 4.3, 790.0, 360.0, 8.0),
}


@dataclass
class Shape:
    params: int  # every parameter (embedding and head included)
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int


def shape_of(model: str) -> Shape:
    """Counts a preset's (or a model directory's) parameters on the ``meta`` device."""
    import torch
    import transformers

    from bench.presets import is_preset, materialize
    from workers.model_loader import load_hf_config

    config = load_hf_config(materialize(model) if is_preset(model) else model)
    if getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None):
        raise ValueError("model: a mixture of experts reads only its routed experts; this "
                         "count is for dense models")
    with torch.device("meta"):
        net = transformers.AutoModelForCausalLM.from_config(config)
    params = sum(p.numel() for p in net.parameters())
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return Shape(params, config.num_hidden_layers, config.hidden_size, heads,
                 getattr(config, "num_key_value_heads", heads), head_dim, config.vocab_size)


def floor(shape: Shape, gpu: GPU, tp: int, num_prompts: int, input_len: int, output_len: int,
          max_num_seqs: int = 512, kv_bytes: int = 2, memory_utilization: float = 0.9,
          activation_gb: float = 4.0) -> dict:
    """The counted floor of one run (a dict: seconds per phase, tok/s, the counts used)."""
    weight_bytes = 2 * shape.params / tp  # bf16, every matrix split over the ranks
    kv_heads_per_rank = max(1, shape.kv_heads // tp)  # replicated when tp > kv heads
    kv_per_token = 2 * shape.layers * kv_heads_per_rank * shape.head_dim * kv_bytes
    free = gpu.hbm_gb * 1e9 * memory_utilization - weight_bytes - activation_gb * 1e9
    if free <= 0:
        raise ValueError(f"tp: {shape.params / 1e9:.1f}B parameters do not fit {tp} x "
                         f"{gpu.name} at memory utilization {memory_utilization}")
    seq_len = input_len + output_len
    concurrent = max(1, min(max_num_seqs, num_prompts, int(free // (kv_per_token * seq_len))))
    waves = math.ceil(num_prompts / concurrent)
    tflops = gpu.bf16_tflops * 1e12
    bw = gpu.hbm_tbps * 1e12

    def all_reduce_s(tokens: int, calls: int) -> float:
        if tp == 1:
            return 0.0
        volume = 2 * (tp - 1) / tp * tokens * shape.hidden * 2
        return calls * (gpu.collective_us * 1e-6 + volume / (gpu.link_gbps * 1e9))

    # Prefill: every prompt token once (its first output token comes with it).
    attn_flops = 2 * 2 * shape.layers * shape.heads * shape.head_dim * input_len ** 2 / 2
    prefill_s = num_prompts * (2 * shape.params * input_len + attn_flops) / tp / tflops
    prefill_comm_s = all_reduce_s(num_prompts * input_len, 2 * shape.layers)

    decode_s = decode_comm_s = 0.0
    kv_read = 0.0
    left = num_prompts
    for _ in range(waves):
        batch = min(concurrent, left)
        left -= batch
        for step in range(1, output_len):  # output token `step` reads a context of input_len + step
            ctx = input_len + step
            kv = batch * ctx * kv_per_token
            kv_read += kv
            mem = (weight_bytes + kv) / bw
            compute = batch * (2 * shape.params + 4 * shape.layers * shape.heads
                               * shape.head_dim * ctx) / tp / tflops
            decode_s += max(mem, compute)
            decode_comm_s += all_reduce_s(batch, 2 * shape.layers)
    total_s = prefill_s + prefill_comm_s + decode_s + decode_comm_s
    tokens = num_prompts * (input_len + output_len)
    return dict(gpu=gpu.name, tp=tp, params_b=round(shape.params / 1e9, 3),
                weight_gb_per_rank=round(weight_bytes / 1e9, 2),
                kv_kib_per_token_per_rank=round(kv_per_token / 1024, 1),
                concurrent=concurrent, waves=waves, decode_steps=waves * (output_len - 1),
                kv_read_tb_per_rank=round(kv_read / 1e12, 2),
                prefill_s=round(prefill_s, 3), prefill_all_reduce_s=round(prefill_comm_s, 3),
                decode_s=round(decode_s, 3), decode_all_reduce_s=round(decode_comm_s, 3),
                floor_s=round(total_s, 3), floor_total_tok_s=round(tokens / total_s, 1),
                floor_decode_step_ms=round(1e3 * (decode_s + decode_comm_s)
                                           / max(1, waves * (output_len - 1)), 2))


def floor_requests(shape: Shape, gpu: GPU, tp: int, input_lens: list[int],
                   output_lens: list[int], max_num_seqs: int = 512, kv_bytes: int = 2,
                   memory_utilization: float = 0.9, activation_gb: float = 4.0) -> dict:
    """The counted floor of a run whose requests differ in length (nano-vllm's workload).

    Requests are admitted in order, continuously, while ``max_num_seqs`` and the KV cache
    (each admitted request holding its whole input + output) allow; every step each running
    request decodes one token and takes the longer of its reads (the rank's weights plus the
    running requests' KV) and its matmuls, as ``floor`` counts a step."""
    if len(input_lens) != len(output_lens) or not input_lens:
        raise ValueError("input_lens, output_lens: one length each per request, at least one")
    weight_bytes = 2 * shape.params / tp
    kv_per_token = 2 * shape.layers * max(1, shape.kv_heads // tp) * shape.head_dim * kv_bytes
    free = gpu.hbm_gb * 1e9 * memory_utilization - weight_bytes - activation_gb * 1e9
    capacity = int(free // kv_per_token) if free > 0 else 0
    if capacity < max(i + o for i, o in zip(input_lens, output_lens)):
        raise ValueError(f"tp: the longest request does not fit {tp} x {gpu.name}'s KV cache")
    tflops, bw = gpu.bf16_tflops * 1e12, gpu.hbm_tbps * 1e12
    attn = 2 * 2 * shape.layers * shape.heads * shape.head_dim  # FLOP per (query, key) pair
    prefill_s = sum(2 * shape.params * n + attn * n * n / 2 for n in input_lens) / tp / tflops
    waiting = list(range(len(input_lens)))[::-1]
    running: dict[int, int] = {}  # request -> context length now
    left: dict[int, int] = {}  # request -> decode steps still to run
    held = steps = peak = 0
    decode_s = kv_read = 0.0
    while waiting or running:
        while waiting and len(running) < max_num_seqs:
            r = waiting[-1]
            need = input_lens[r] + output_lens[r]
            if held + need > capacity and running:
                break
            waiting.pop()
            held += need
            # the first output token comes from the prefill; decoding it attends to input + 1
            running[r], left[r] = input_lens[r] + 1, output_lens[r] - 1
        for r in [r for r, k in left.items() if k <= 0]:
            held -= input_lens[r] + output_lens[r]
            del running[r], left[r]
        if not running:
            continue
        ctx = sum(running.values())
        kv = ctx * kv_per_token
        kv_read += kv
        mem = (weight_bytes + kv) / bw
        compute = (len(running) * 2 * shape.params + attn * ctx) / tp / tflops
        decode_s += max(mem, compute)
        steps += 1
        peak = max(peak, len(running))
        for r in running:
            running[r] += 1
            left[r] -= 1
    tokens = sum(input_lens) + sum(output_lens)
    out = sum(output_lens)
    total_s = prefill_s + decode_s
    return dict(gpu=gpu.name, tp=tp, params_b=round(shape.params / 1e9, 3),
                weight_gb_per_rank=round(weight_bytes / 1e9, 2),
                kv_kib_per_token_per_rank=round(kv_per_token / 1024, 1),
                concurrent=peak, decode_steps=steps, kv_read_tb_per_rank=round(kv_read / 1e12, 2),
                kv_read_gb_per_rank=round(kv_read / 1e9, 3),
                prefill_s=round(prefill_s, 3), decode_s=round(decode_s, 3),
                floor_s=round(total_s, 3), floor_total_tok_s=round(tokens / total_s, 1),
                floor_output_tok_s=round(out / total_s, 1),
                floor_decode_step_ms=round(1e3 * decode_s / max(1, steps), 2))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench.roofline", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llama2-7b", help="a preset or a model directory")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--gpu", default="h200", choices=sorted(GPUS))
    p.add_argument("--num-prompts", type=int, default=512)
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--max-num-seqs", type=int, default=512)
    p.add_argument("--kv-cache-dtype", default="auto", choices=("auto", "fp8"))
    p.add_argument("--nano-vllm", action="store_true",
                   help="the lengths of nano-vllm's workload (bench.throughput --nano-vllm: "
                        "in and out uniform in 100..1024, seeded) instead of --input-len/--output-len")
    p.add_argument("--seed", type=int, default=0, help="with --nano-vllm: the workload's seed")
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    for name in ("tp", "num_prompts", "input_len", "output_len", "max_num_seqs"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}: must be >= 1")
    try:
        shape = shape_of(args.model)
        kv_bytes = 1 if args.kv_cache_dtype == "fp8" else 2
        if args.nano_vllm:
            from bench.throughput import make_workload

            work = make_workload(argparse.Namespace(num_prompts=args.num_prompts, seed=args.seed,
                                                    nano_vllm=True), shape.vocab)
            row = floor_requests(shape, GPUS[args.gpu], args.tp, [len(q) for q in work.prompts],
                                 work.output_lens, args.max_num_seqs, kv_bytes)
        else:
            row = floor(shape, GPUS[args.gpu], args.tp, args.num_prompts, args.input_len,
                        args.output_len, args.max_num_seqs, kv_bytes)
    except ValueError as e:
        p.exit(2, f"error: {e}\n")
    lens = dict(nano_vllm=True, seed=args.seed) if args.nano_vllm else dict(
        input_len=args.input_len, output_len=args.output_len)
    row = dict(model=args.model, kv_cache_dtype=args.kv_cache_dtype,
               num_prompts=args.num_prompts, **lens, **row, shape=asdict(shape), rates=asdict(GPUS[args.gpu]))
    from bench.throughput import emit_json

    return emit_json(row, args.json_out)


if __name__ == "__main__":
    main(sys.argv[1:])
