"""The in-process engine of the offline ``LLM`` and the benchmarks: the input
processor, the engine core and the output processor in one process, on one
thread. Serving splits the same three parts across two processes
(``AsyncEngine``: frontend here, ``EngineCore`` in its own actor)."""

from __future__ import annotations

import time

from spmd.config import EngineConfig
from spmd.engine_core import EngineCore
from spmd.input_processor import InputProcessor
from spmd.lora import LoRARequest
from spmd.output_processor import OutputProcessor
from spmd.outputs import RequestOutput
from spmd.pooling import EmbeddingRequestOutput, PoolingOutputs, PoolingParams
from spmd.sampling_params import SamplingParams


class RequestFailedError(RuntimeError):
    """Requests the engine stopped because their step failed on the ranks; the engine
    itself goes on serving. ``request_ids`` names them."""

    def __init__(self, message: str, request_ids: list[str]):
        super().__init__(message)
        self.request_ids = request_ids


class Engine:
    """``add_request`` / ``step`` / ``abort_request`` over an in-process ``EngineCore``."""

    def __init__(self, config: EngineConfig, stream_outputs: bool = True):
        self.inputs = InputProcessor(config)
        self.config = config = config.with_task(self.inputs.info.task)
        self.tokenizer = self.inputs.tokenizer
        if config.parallel.backend != "inproc":  # the ranks load in their own processes
            self.inputs.prepare_grammar_vocab()
        self.core = EngineCore(config, self.inputs.info)
        self.outputs = OutputProcessor(self.tokenizer, stream=stream_outputs)
        self.pooling_outputs = (PoolingOutputs(self.inputs.info.pooler)
                                if self.inputs.info.pooler is not None else None)
        self._grammar_vocab_sent = False  # the ranks have the tokenizer's vocabulary

    task = property(lambda self: self.core.task)
    # The core's state, for benchmarks and tests.
    hf_config = property(lambda self: self.core.hf_config)
    max_model_len = property(lambda self: self.core.max_model_len)
    scheduler = property(lambda self: self.core.scheduler)
    transport = property(lambda self: self.core.transport)
    rank_config = property(lambda self: self.core.rank_config)
    num_kv_blocks = property(lambda self: self.core.num_kv_blocks)
    warmup_times_s = property(lambda self: self.core.warmup_times_s)
    last_step_stats = property(lambda self: self.core.last_step_stats)
    stats_total = property(lambda self: self.core.stats_total)

    def add_request(self, request_id: str, prompt: str | dict | list[int],
                    params: SamplingParams | None = None, arrival_time: float | None = None,
                    lora_request: LoRARequest | None = None) -> None:
        """Validates and queues a request (``ValueError`` for bad input; nothing is queued
        then). A ``lora_request`` not seen before is registered first, as vLLM does."""
        params = params or SamplingParams()
        text, prompt_ids, request = self.inputs.process(request_id, prompt, params, arrival_time,
                                                        lora_request)
        if lora_request is not None:
            self.add_lora(lora_request)
        if request.guided is not None and not self._grammar_vocab_sent:
            self.core.call_all("set_grammar_vocab", self.inputs.grammar_vocab())
            self._grammar_vocab_sent = True
        self.outputs.add(request_id, text, prompt_ids, params, request.arrival_time)
        try:
            self.core.add_request(request)
        except BaseException:
            self.outputs.abort(request_id)
            raise

    def add_pooling_request(self, request_id: str, prompt: str | dict | list[int],
                            params: PoolingParams | None = None,
                            arrival_time: float | None = None) -> None:
        """Validates and queues a prompt to embed (``ValueError`` for bad input)."""
        params = params or PoolingParams()
        text, prompt_ids, request = self.inputs.process_pooling(request_id, prompt, params,
                                                                arrival_time)
        self.pooling_outputs.add(request_id, text, prompt_ids, params, request.arrival_time)
        try:
            self.core.add_pooling_request(request)
        except BaseException:
            self.pooling_outputs.abort(request_id)
            raise

    def add_lora(self, lora_request: LoRARequest) -> bool:
        """Registers an adapter (checked against the model first); False if known."""
        r = lora_request
        return self.core.add_lora(r.lora_name, r.lora_int_id, r.lora_path)

    def remove_lora(self, lora_int_id: int) -> bool:
        return self.core.remove_lora(lora_int_id)

    def list_loras(self) -> list[LoRARequest]:
        return [LoRARequest(*entry) for entry in self.core.list_loras()]

    def abort_request(self, request_id: str) -> None:
        self.outputs.abort(request_id)
        if self.pooling_outputs is not None:
            self.pooling_outputs.abort(request_id)
        self.core.abort_request(request_id)

    def has_unfinished_requests(self) -> bool:
        return self.core.has_unfinished_requests()

    def step(self) -> list[RequestOutput] | list[EmbeddingRequestOutput]:
        """One step on all ranks; the outputs of the requests that advanced (online: their
        deltas; offline: the finished ones, whole; embeddings: the ones computed)."""
        out = self.core.step()
        if out is None:
            return []
        if out.errors:
            ids = [e.request_id for e in out.errors]
            for request_id in ids:
                self.abort_request(request_id)
            raise RequestFailedError(f"requests {ids}: {out.errors[0].message}", ids)
        if out.pooled:
            return self.pooling_outputs.process(out.pooled)
        t0 = time.perf_counter()
        results, stops = self.outputs.process(out.outputs)
        for request_id, index in stops:  # before the next schedule, as if the core had seen it
            self.core.stop_sequence(request_id, index)
        self.core.last_step_stats["process_s"] += time.perf_counter() - t0  # the core's + ours
        return results

    def park(self) -> None:
        self.core.park()

    def call_all(self, method: str, *args) -> list:
        return self.core.call_all(method, *args)

    def shutdown(self) -> None:
        self.core.shutdown()
