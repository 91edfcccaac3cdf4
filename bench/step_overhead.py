"""Control-plane cost of one steady decode step, with no model work.

    python -m bench.step_overhead --tp 2 --batch-sizes 1,8,32,128,256 --context 2048

Real rank actors, built through the same transports as the engine
(``dag.make_transport``), run ``bench.null_worker.NullWorker``: it decodes the
message, applies it to the persistent batch, prepares the step's inputs and
returns a real ``SamplerOutput``, but skips the forward pass. For each backend
and batch size B, B requests with ``--context`` tokens of history decode for
``--steps`` steps, sent two ways:

* delta: the engine's ``ExecuteModelRequest`` (ids, token counts, the odd new block);
* full:  every request's whole token history and block table, every step.

Reported per step, median and p99: engine (build + encode the message, apply
the output), round trip (``transport.step`` + decode ``SamplerOutput``), rank
(the rank's own decode-to-return time) and message bytes. A last table runs the
real ``Engine.step`` (scheduler, step encoder, output processor) against an
in-process null rank: the engine-side Python cost per step.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from bench.null_worker import FullRequestState, FullStateStep, NullWorker
from serialization import (
    BlockUpdate,
    ExecuteModelRequest,
    NewRequest,
    RankConfig,
    SamplerOutput,
    SamplingOptions,
    decode_output,
    encode,
    pack_i32,
)

GREEDY = SamplingOptions(temperature=0.0)
VOCAB = 32000


class DecodeState:
    """Engine-side state of B decoding requests, kept the way a scheduler keeps it:
    token histories, progress and block tables, one new block per ``block_size`` tokens."""

    def __init__(self, batch_size: int, context: int, max_len: int, block_size: int,
                 first_seq_id: int, seed: int):
        rng = np.random.default_rng(seed)
        self.block_size = block_size
        self.seq_ids = np.arange(first_seq_id, first_seq_id + batch_size, dtype=np.int32)
        self.tokens = np.zeros((batch_size, max_len + 1), dtype=np.int32)
        self.tokens[:, :context] = rng.integers(0, VOCAB, (batch_size, context), dtype=np.int32)
        self.num_tokens = np.full(batch_size, context, dtype=np.int64)
        per_request = -(-context // block_size)
        self.block_table = np.zeros((batch_size, -(-max_len // block_size)), dtype=np.int32)
        self.block_table[:, :per_request] = np.arange(batch_size * per_request).reshape(batch_size, -1)
        self.num_blocks = np.full(batch_size, per_request, dtype=np.int64)
        self.next_block_id = batch_size * per_request

    def admit_message(self, step_id: int) -> ExecuteModelRequest:
        """Sends the requests once, as if their prompts (all but the last token) were computed."""
        return ExecuteModelRequest(step_id=step_id, new_requests=[
            NewRequest(seq_id=int(s), prompt_token_ids=self.tokens[i, : self.num_tokens[i]].tobytes(),
                       sampling=GREEDY, block_ids=self.block_table[i, : self.num_blocks[i]].tobytes(),
                       num_computed_tokens=int(self.num_tokens[i]) - 1)
            for i, s in enumerate(self.seq_ids)])

    def finish_message(self, step_id: int) -> ExecuteModelRequest:
        return ExecuteModelRequest(step_id=step_id, finished_ids=self.seq_ids.tobytes())

    def delta_message(self, step_id: int) -> ExecuteModelRequest:
        grown = self._grow_blocks()
        return ExecuteModelRequest(
            step_id=step_id, scheduled_seq_ids=self.seq_ids.tobytes(),
            num_scheduled_tokens=np.ones(len(self.seq_ids), dtype=np.int32).tobytes(),
            block_updates=[BlockUpdate(int(self.seq_ids[i]), pack_i32([self.block_table[i, n - 1]]))
                           for i, n in zip(grown.tolist(), self.num_blocks[grown].tolist())])

    def full_message(self, step_id: int) -> FullStateStep:
        self._grow_blocks()
        return FullStateStep(step_id=step_id, requests=[
            FullRequestState(int(s), self.tokens[i, : self.num_tokens[i]].tobytes(),
                             self.block_table[i, : self.num_blocks[i]].tobytes(), GREEDY)
            for i, s in enumerate(self.seq_ids)])

    def append(self, out: SamplerOutput) -> None:
        rows = np.frombuffer(out.seq_ids, dtype="<i4") - self.seq_ids[0]
        self.tokens[rows, self.num_tokens[rows]] = np.frombuffer(out.token_ids, dtype="<i4")
        self.num_tokens[rows] += 1

    def _grow_blocks(self) -> np.ndarray:
        """Rows whose next token (position num_tokens - 1) starts a block get one."""
        grown = np.flatnonzero(-(-self.num_tokens // self.block_size) > self.num_blocks)
        self.block_table[grown, self.num_blocks[grown]] = self.next_block_id + np.arange(len(grown))
        self.next_block_id += len(grown)
        self.num_blocks[grown] += 1
        return grown


def time_steps(transport, state: DecodeState, build, steps: int, warmup: int, step_id: int) -> dict:
    """Runs ``warmup + steps`` steps; returns per-step timings (µs) and message sizes."""
    engine_us, round_trip_us, rank_us, sizes = [], [], [], []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        data = encode(build(step_id + i))
        t1 = time.perf_counter()
        out = decode_output(transport.step(data))
        t2 = time.perf_counter()
        state.append(out)
        t3 = time.perf_counter()
        assert len(out.seq_ids) == 4 * len(state.seq_ids), "a request did not sample"
        if i >= warmup:
            engine_us.append((t1 - t0 + t3 - t2) * 1e6)
            round_trip_us.append((t2 - t1) * 1e6)
            rank_us.append(out.rank_time_s * 1e6)
            sizes.append(len(data))
    step_us = np.add(engine_us, round_trip_us)
    return dict(step_us=_stats(step_us), engine_us=_stats(engine_us),
                round_trip_us=_stats(round_trip_us), rank_us=_stats(rank_us),
                bytes=int(np.median(sizes)))


def _stats(values) -> dict:
    return dict(median=round(float(np.median(values)), 1), p99=round(float(np.percentile(values, 99)), 1))


def measure_backend(backend: str, args, max_len: int) -> list[dict]:
    from dag import make_transport

    tp = 1 if backend == "inproc" else args.tp
    config = RankConfig(model="null", load_format="dummy", tp_size=tp, max_model_len=max_len,
                        block_size=args.block_size, max_num_seqs=max(args.batch_sizes))
    transport = make_transport(backend, NullWorker, config, num_cpus_per_rank=args.num_cpus_per_rank,
                               step_timeout_s=60.0, start_timeout_s=120.0)
    rows = []
    step_id = 1
    try:
        for batch_size in args.batch_sizes:
            row = dict(backend=backend, tp=tp, batch_size=batch_size)
            state = DecodeState(batch_size, args.context, max_len, args.block_size, 1, args.seed)
            transport.step(encode(state.admit_message(step_id)))
            step_id += 1
            row["delta"] = time_steps(transport, state, state.delta_message, args.steps, args.warmup, step_id)
            step_id += args.steps + args.warmup
            transport.step(encode(state.finish_message(step_id)))
            step_id += 1
            if not args.skip_full:
                state = DecodeState(batch_size, args.context, max_len, args.block_size, 1, args.seed)
                row["full"] = time_steps(transport, state, state.full_message, args.steps, args.warmup,
                                         step_id)
                step_id += args.steps + args.warmup
            rows.append(row)
            _print_row(row)
    finally:
        transport.shutdown()
    return rows


def measure_engine(args) -> list[dict]:
    """The real ``Engine.step`` against an in-process null rank: engine-side cost only."""
    from bench.presets import materialize
    from dag.inproc import InProcTransport
    from spmd import SamplingParams
    from spmd.config import EngineConfig
    from spmd.engine import Engine

    rows = []
    budget = max(2048, args.context)
    for batch_size in args.batch_sizes:
        # Requests admitted first decode while later ones prefill (the decodes eat into the
        # token budget, so prefill takes more than B * context / budget steps): room for those.
        max_len = args.context + 2 * -(-batch_size * args.context // budget) + args.warmup + args.steps + 16
        engine = Engine(EngineConfig.from_kwargs(
            model=materialize("tiny", max_position_embeddings=max_len), load_format="dummy",
            backend="inproc", skip_tokenizer_init=True, max_model_len=max_len,
            max_num_seqs=batch_size, block_size=args.block_size, max_num_batched_tokens=budget,
            async_scheduling=False))  # one step's cost, one step at a time
        engine.transport.shutdown()
        engine.core.transport = InProcTransport(NullWorker, engine.rank_config)
        try:
            rng = np.random.default_rng(args.seed)
            params = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=None)
            for i in range(batch_size):
                engine.add_request(str(i), rng.integers(0, 1024, args.context).tolist(), params)
            while engine.scheduler.num_waiting or any(
                    r.num_computed_tokens < r.num_tokens - 1 for r in engine.scheduler.running):
                engine.step()  # prefill
            stats = []
            for i in range(args.warmup + args.steps):
                engine.step()
                if i >= args.warmup:
                    assert engine.last_step_stats["num_seqs"] == batch_size
                    stats.append(engine.last_step_stats)
        finally:
            engine.shutdown()
        us = {k: [s[k] * 1e6 for s in stats] for k in ("schedule_encode_s", "round_trip_s", "process_s")}
        row = dict(batch_size=batch_size,
                   schedule_encode_us=_stats(us["schedule_encode_s"]),
                   round_trip_us=_stats(us["round_trip_s"]), process_us=_stats(us["process_s"]),
                   engine_us=_stats(np.add(us["schedule_encode_s"], us["process_s"])),
                   bytes=int(np.median([s["message_bytes"] for s in stats])))
        rows.append(row)
    return rows


# ---- report -----------------------------------------------------------------------------

_HEADER = (f"{'backend':<7} {'tp':>2} {'batch':>5} | {'delta µs':>8} {'p99':>8} {'engine':>7} "
           f"{'rank':>7} {'bytes':>7} | {'full µs':>8} {'p99':>8} {'engine':>7} {'rank':>7} "
           f"{'bytes':>9} | {'full/delta':>10}")


def _print_header() -> None:
    print(_HEADER)
    print("-" * len(_HEADER), flush=True)


def _print_row(row: dict) -> None:
    d, f = row["delta"], row.get("full")
    line = (f"{row['backend']:<7} {row['tp']:>2} {row['batch_size']:>5} | {d['step_us']['median']:>8.0f} "
            f"{d['step_us']['p99']:>8.0f} {d['engine_us']['median']:>7.0f} {d['rank_us']['median']:>7.0f} "
            f"{d['bytes']:>7} |")
    if f:
        line += (f" {f['step_us']['median']:>8.0f} {f['step_us']['p99']:>8.0f} "
                 f"{f['engine_us']['median']:>7.0f} {f['rank_us']['median']:>7.0f} {f['bytes']:>9} | "
                 f"{f['step_us']['median'] / d['step_us']['median']:>10.1f}")
    print(line, flush=True)


def _print_engine(rows: list[dict]) -> None:
    print("\nreal Engine.step, in-process null rank (µs, median / p99)")
    header = f"{'batch':>5} | {'schedule+encode':>17} | {'process':>17} | {'rank call':>17} | {'bytes':>6}"
    print(header)
    print("-" * len(header))
    for r in rows:
        cells = [f"{r[k]['median']:>7.0f} / {r[k]['p99']:<7.0f}"
                 for k in ("schedule_encode_us", "process_us", "round_trip_us")]
        print(f"{r['batch_size']:>5} | {' | '.join(cells)} | {r['bytes']:>6}")


def plot(rows: list[dict], path: str, context: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for backend in dict.fromkeys(r["backend"] for r in rows):
        mine = [r for r in rows if r["backend"] == backend]
        sizes = [r["batch_size"] for r in mine]
        line, = ax.plot(sizes, [r["delta"]["step_us"]["median"] for r in mine], "o-", label=f"{backend} delta")
        if "full" in mine[0]:
            ax.plot(sizes, [r["full"]["step_us"]["median"] for r in mine], "s--", color=line.get_color(),
                    label=f"{backend} full re-send")
    ax.set_xscale("log", base=2)
    sizes = sorted({r["batch_size"] for r in rows})
    ax.set_xticks(sizes, [str(b) for b in sizes])
    ax.set_yscale("log")
    ax.set_xlabel("batch size (decoding requests)")
    ax.set_ylabel("µs per step (median)")
    ax.set_title(f"Control-plane cost of one decode step, {context} tokens of context, no model")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- main -------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.step_overhead", description=__doc__.split("\n\n")[0])
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--batch-sizes", default="1,8,32,128,256")
    p.add_argument("--context", type=int, default=2048, help="tokens of history per request")
    p.add_argument("--backends", default="dag,ray,inproc", help="comma list; inproc always runs tp=1")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--num-cpus-per-rank", type=float, default=0.5, help="Ray logical CPUs per rank actor")
    p.add_argument("--skip-full", action="store_true", help="measure the delta messages only")
    p.add_argument("--skip-engine", action="store_true", help="skip the real Engine.step table")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot", default=None, help="PNG of µs per step vs batch size")
    p.add_argument("--json-out", default=None, help="also write the JSON line to this file")
    args = p.parse_args(argv)
    try:
        args.batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    except ValueError:
        p.error(f"--batch-sizes: expected a comma list of ints, got {args.batch_sizes!r}")
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    for b in args.backends:
        if b not in ("dag", "ray", "inproc"):
            p.error(f"--backends: unknown backend {b!r}; choose from dag, ray, inproc")
    if not args.batch_sizes or min(args.batch_sizes) < 1:
        p.error("--batch-sizes: every size must be >= 1")
    for name in ("tp", "context", "steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name}: must be >= 1")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    from bench.throughput import emit_json, machine_info

    max_len = args.context + args.warmup + args.steps + args.block_size
    import ray

    ray_was_up = ray.is_initialized()
    if any(b != "inproc" for b in args.backends) and not ray_was_up:
        ray.init(num_cpus=8, include_dashboard=False, log_to_driver=True, logging_level="WARNING")
    rows, engine_rows = [], []
    try:
        _print_header()
        for backend in args.backends:
            rows += measure_backend(backend, args, max_len)
        if not args.skip_engine:
            engine_rows = measure_engine(args)
            _print_engine(engine_rows)
    finally:
        if not ray_was_up and ray.is_initialized():
            ray.shutdown()
    if args.plot:
        plot(rows, args.plot, args.context)
        print(f"plot: {args.plot}")
    record = dict(
        tp=args.tp, context=args.context, steps=args.steps, warmup=args.warmup,
        batch_sizes=args.batch_sizes, backends=args.backends, block_size=args.block_size,
        results=rows, engine=engine_rows,
        command=" ".join(["python -m bench.step_overhead", *(argv or sys.argv[1:])]),
        machine=machine_info())
    return emit_json(record, args.json_out)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(130)
