"""The engine process: schedules, encodes each step's delta, pushes it to every
rank at once and turns rank 0's sampled tokens into outputs. It holds no model."""

from __future__ import annotations

import logging
import os
import random
import time

import numpy as np
from tqdm.auto import tqdm

import ray

from dag import Transport, make_transport
from serialization import (
    RankCall,
    SamplingOptions,
    decode_output,
    decode_reply,
    encode,
)
from spmd.config import EngineConfig, resolve_model
from spmd.output_processor import OutputProcessor
from spmd.outputs import RequestOutput
from spmd.request import Request
from spmd.sampling_params import SamplingParams
from spmd.scheduler import Scheduler
from spmd.static_scheduler import StaticBatchScheduler
from spmd.step_encoder import to_message
from workers import worker_class
from workers.model_loader import load_hf_config, validate_tp
from workers.models import get_model_class

logger = logging.getLogger(__name__)


class Engine:
    """Synchronous core shared by ``LLM`` (offline) and ``AsyncEngine`` (online)."""

    def __init__(self, config: EngineConfig, stream_outputs: bool = True):
        self.config = config
        model_path = resolve_model(config.model.model)
        self.hf_config = load_hf_config(model_path)
        get_model_class(self.hf_config)  # unknown architecture: ValueError before any actor starts
        validate_tp(self.hf_config, config.parallel.tensor_parallel_size)
        self.max_model_len = _max_model_len(self.hf_config, config.model.max_model_len)
        config.check_warmup_shapes_fit(self.max_model_len)
        self.tokenizer = None
        if not config.model.skip_tokenizer_init:
            from spmd.tokenizer import load_tokenizer

            self.tokenizer = load_tokenizer(config.model.tokenizer or model_path)
        self.eos_token_ids = _eos_ids(self.hf_config, self.tokenizer)
        self.rank_config = config.rank_config(self.max_model_len)
        if config.parallel.backend != "inproc":
            _ensure_ray(config)
        self.transport: Transport = make_transport(
            config.parallel.backend, worker_class(config.device.device), self.rank_config,
            num_cpus_per_rank=config.parallel.num_cpus_per_rank,
            step_timeout_s=config.parallel.step_timeout_s,
            start_timeout_s=config.parallel.start_timeout_s)
        try:
            self.num_kv_blocks = min(self.call_all("determine_num_kv_blocks"))
            self.call_all("initialize_cache", self.num_kv_blocks)
            self.warmup_times_s = self._warm_up()
        except BaseException:
            self.transport.shutdown()
            raise
        if config.device.warmup_shapes:
            self.scheduler = StaticBatchScheduler(warmup_shapes=config.device.warmup_shapes,
                                                  max_model_len=self.max_model_len)
        else:
            self.scheduler = Scheduler(
                num_blocks=self.num_kv_blocks, block_size=config.cache.block_size,
                max_num_seqs=config.scheduler.max_num_seqs,
                max_num_batched_tokens=config.scheduler.max_num_batched_tokens,
                max_model_len=self.max_model_len,
                enable_prefix_caching=config.cache.enable_prefix_caching)
        self.outputs = OutputProcessor(self.tokenizer, stream=stream_outputs)
        self._rng = random.Random(config.model.seed)
        self._next_seq_id = 0
        self._step_id = 0
        self.last_step_stats: dict = {}
        self._last_rank_step = (0.0, 0)
        self.stats_total = dict(steps=0, preemptions=0, prompt_tokens=0, generation_tokens=0)
        self._closed = False

    # ---- requests -----------------------------------------------------------------

    def add_request(self, request_id: str, prompt: str | dict | list[int],
                    params: SamplingParams | None = None, arrival_time: float | None = None) -> None:
        """Validates and queues a request (``ValueError`` for bad input; nothing is queued then)."""
        params = params or SamplingParams()
        text, prompt_ids = self._tokenize(prompt)
        if not prompt_ids:
            raise ValueError("prompt: must contain at least 1 token")
        if len(prompt_ids) >= self.max_model_len:
            raise ValueError(f"prompt: {len(prompt_ids)} tokens; the limit is max_model_len - 1 = "
                             f"{self.max_model_len - 1} (max_model_len={self.max_model_len})")
        vocab = self.hf_config.vocab_size
        if max(prompt_ids) >= vocab or min(prompt_ids) < 0:
            raise ValueError(f"prompt_token_ids: ids must be in [0, {vocab}) (vocab_size)")
        if params.logprobs is not None and params.logprobs > vocab:
            raise ValueError(f"logprobs: {params.logprobs} exceeds vocab_size={vocab}")
        if self.outputs.has(request_id):
            raise ValueError(f"request_id: {request_id!r} is already running")
        budget = self.max_model_len - len(prompt_ids)
        max_tokens = budget if params.max_tokens is None else min(params.max_tokens, budget)
        stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            stop_ids |= self.eos_token_ids
        children = []
        for i in range(params.n):
            seed = params.seed + i if params.seed is not None else self._rng.getrandbits(63)
            children.append(Request(
                request_id if params.n == 1 else f"{request_id}#{i}", self._new_seq_id(),
                prompt_ids, max_tokens, stop_ids, params.min_tokens,
                sampling=_options(params, seed), arrival_time=arrival_time))
        self.outputs.add(request_id, text, prompt_ids, params, children)
        try:
            for child in children:
                self.scheduler.add_request(child)
        except BaseException:  # e.g. static batching: fits no warm-up shape
            self.abort_request(request_id)
            raise

    def abort_request(self, request_id: str) -> None:
        for child in self.outputs.abort(request_id):
            self.scheduler.abort_request(child.request_id)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    # ---- the step -----------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Schedules, runs one step on all ranks, and returns the outputs of every
        request that advanced (cumulative text and tokens)."""
        t0 = time.perf_counter()
        sched = self.scheduler.schedule()
        if not sched.scheduled and not sched.finished_ids and not sched.preempted_ids:
            return []
        data = encode(to_message(sched))
        t_send = time.perf_counter()
        expected_s = self._expected_step_s(sched.total_num_scheduled_tokens)
        out = decode_output(self.transport.step(data, expected_s))
        t_back = time.perf_counter()
        self._last_rank_step = (out.rank_time_s, sched.total_num_scheduled_tokens)
        seq_ids = np.frombuffer(out.seq_ids, dtype="<i4").tolist()
        tokens = np.frombuffer(out.token_ids, dtype="<i4").tolist()
        updated = self.scheduler.update_from_output(sched, dict(zip(seq_ids, tokens)))
        results = self.outputs.process(updated, out, self.scheduler)
        t1 = time.perf_counter()
        totals = self.stats_total
        totals["steps"] += 1
        totals["preemptions"] += len(sched.preempted_ids)
        totals["generation_tokens"] += len(seq_ids)
        totals["prompt_tokens"] += sched.total_num_scheduled_tokens - len(seq_ids)
        self.last_step_stats = dict(
            num_tokens=sched.total_num_scheduled_tokens, num_seqs=len(sched.scheduled),
            message_bytes=len(data), schedule_encode_s=t_send - t0, round_trip_s=t_back - t_send,
            rank_time_s=out.rank_time_s, model_time_s=out.model_time_s, process_s=t1 - t_back)
        return results

    def _expected_step_s(self, num_tokens: int) -> float:
        """A cautious guess of the step's duration: the last step's rank-measured time
        (so a late wake-up never feeds back into the guess), scaled down, never up,
        by the token count, since step time grows sublinearly with tokens. Sleeping
        through it matters on small hosts: the graph channel's wait spins a core."""
        last_s, last_tokens = self._last_rank_step
        if last_s < 2e-3 or last_tokens == 0:
            return 0.0
        return 0.97 * last_s * min(1.0, num_tokens / last_tokens)

    def _warm_up(self) -> dict[str, float]:
        """Runs every rank's warm-up units (compiled shapes) before serving, so that
        nothing compiles while serving; returns each unit's wall time."""
        times: dict[str, float] = {}
        num_steps = self.call_all("num_warmup_steps")[0]
        for index in tqdm(range(num_steps), desc="Warming up shapes", unit="shape",
                          disable=num_steps == 0):
            t0 = time.perf_counter()
            label = self.call_all("warm_up", index)[0]
            times[label] = time.perf_counter() - t0
            logger.info("warm-up %s: %.1f s", label, times[label])
        return times

    def park(self) -> None:
        """Nothing to run: the ranks sleep (instead of spinning on their channel)
        until the next step or call."""
        self.transport.park()

    # ---- rank-state calls (broadcast to every rank) -----------------------------------

    def call_all(self, method: str, *args) -> list:
        replies = self.transport.call_all(encode(RankCall(method, list(args))))
        return [decode_reply(r).value for r in replies]

    def shutdown(self) -> None:
        if not self._closed:
            self._closed = True
            self.transport.shutdown()

    # ---- helpers ------------------------------------------------------------------

    def _tokenize(self, prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), [int(t) for t in prompt["prompt_token_ids"]]
            prompt = prompt.get("prompt")
        if isinstance(prompt, (list, tuple)):
            return None, [int(t) for t in prompt]
        if not isinstance(prompt, str):
            raise ValueError("prompt: must be a string, a list of token ids or "
                             "{'prompt_token_ids': [...]}")
        if self.tokenizer is None:
            raise ValueError("prompt: a text prompt needs a tokenizer (skip_tokenizer_init=True "
                             "serves {'prompt_token_ids': [...]} only)")
        return prompt, self.tokenizer.encode(prompt)

    def _new_seq_id(self) -> int:
        self._next_seq_id = (self._next_seq_id + 1) % (2**31 - 1)
        return self._next_seq_id


def _options(params: SamplingParams, seed: int) -> SamplingOptions:
    return SamplingOptions(
        temperature=params.temperature, top_p=params.top_p, top_k=params.top_k, min_p=params.min_p,
        seed=seed, presence_penalty=params.presence_penalty,
        frequency_penalty=params.frequency_penalty, repetition_penalty=params.repetition_penalty,
        logprobs=-1 if params.logprobs is None else params.logprobs)


def _max_model_len(hf_config, requested: int | None) -> int:
    limit = getattr(hf_config, "max_position_embeddings", None) or 2048
    if requested is None:
        return limit
    if requested > limit:
        raise ValueError(f"max_model_len: {requested} exceeds the model's "
                         f"max_position_embeddings={limit}")
    return requested


def _eos_ids(hf_config, tokenizer) -> set[int]:
    ids = getattr(hf_config, "eos_token_id", None)
    out = set(ids if isinstance(ids, (list, tuple)) else [ids] if ids is not None else [])
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        out.add(tokenizer.eos_token_id)
    return out


def _ensure_ray(config: EngineConfig) -> None:
    """Attaches to a running cluster (``ray start``, ``ray job submit``) when there
    is one, else starts a local one sized for the ranks."""
    if ray.is_initialized():
        return
    address = config.parallel.ray_address
    if address is None and (os.environ.get("RAY_ADDRESS") or _local_cluster_running()):
        address = "auto"
    kwargs = dict(include_dashboard=False, log_to_driver=True, configure_logging=True,
                  logging_level=logging.WARNING)
    if address:
        ray.init(address=address, **kwargs)
    else:
        need = config.parallel.tensor_parallel_size * config.parallel.num_cpus_per_rank + 1
        ray.init(num_cpus=max(os.cpu_count() or 1, int(need + 0.999)), **kwargs)


def _local_cluster_running() -> bool:
    try:
        from ray._private.services import find_gcs_addresses

        return bool(find_gcs_addresses())
    except Exception:
        return False
