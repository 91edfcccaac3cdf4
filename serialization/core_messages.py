"""Wire format between the serving frontend and the engine core (msgspec).

The frontend (tokenizer, detokenizer, HTTP streams) sends requests, aborts and
rank-state calls; the engine core answers with ONE message per step holding, for
every sequence that advanced, only its new token ids (plus log-probs when asked
and the finish reason). Token histories never travel back: the frontend keeps
each stream's text and tokens itself. Between steps the core sends heartbeats,
so the frontend can tell a busy core from a dead one without asking.
"""

from __future__ import annotations

from typing import Any

import msgspec

from serialization.messages import GuidedSpec, MessageError, SamplingOptions


class EngineCoreRequest(msgspec.Struct, frozen=True, array_like=True, gc=False, tag="add"):
    """A validated, tokenized request: the core schedules ``n`` sequences for it."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingOptions  # ``seed`` ignored: see ``seed`` below
    n: int = 1
    seed: int | None = None  # sequence i samples with seed + i; None: the core draws one each
    max_tokens: int = 16  # already clamped to the context left
    min_tokens: int = 0
    stop_token_ids: list[int] = []  # EOS included unless ignore_eos
    arrival_time: float = 0.0
    lora_id: int = 0  # a registered adapter's lora_int_id; 0: the base model
    guided: GuidedSpec | None = None  # structured output (validated by the frontend)


class PoolingRequest(msgspec.Struct, frozen=True, array_like=True, gc=False, tag="pool"):
    """A validated, tokenized prompt of a prefill-only model: run once, pooled."""

    request_id: str
    prompt_token_ids: list[int]
    arrival_time: float = 0.0


class AbortRequests(msgspec.Struct, frozen=True, array_like=True, gc=False, tag="abort"):
    """Requests the client left (every sequence of each)."""

    request_ids: list[str]


class StopSequences(msgspec.Struct, frozen=True, array_like=True, gc=False, tag="stop"):
    """Sequences the frontend saw reach a stop string: finished as stopped."""

    request_ids: list[str]
    indices: list[int]


class UtilityCall(msgspec.Struct, frozen=True, array_like=True, gc=False, tag="call"):
    """A call the core runs between steps: ``call_all`` (broadcast to every rank), ``stats``."""

    call_id: int
    method: str
    args: list[Any] = []


class Shutdown(msgspec.Struct, frozen=True, array_like=True, gc=False, tag="shutdown"):
    pass


CoreInput = EngineCoreRequest | PoolingRequest | AbortRequests | StopSequences | UtilityCall | Shutdown


class TokenLogprobs(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """Log-probs of one sampled token: its own and the top-n (best first)."""

    sampled: float
    top_ids: list[int] = []
    top_logprobs: list[float] = []


class SeqDelta(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """What one sequence gained this step."""

    request_id: str
    index: int  # which of the request's n sequences
    new_token_ids: list[int]
    finish_reason: str | None = None  # stop | length, when the core finished it this step
    stop_token: int | None = None  # the stop token id that finished it
    num_cached_tokens: int = 0  # prefix-cache hit at its first schedule
    logprobs: list[TokenLogprobs] | None = None  # one per new token, when asked
    arrival_step: int = -1  # with the first token: the core's step count when it took the request


class PooledOutput(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """A pooling request's result: the pooled hidden state, before ``dimensions`` and
    ``normalize`` (the frontend applies them)."""

    request_id: str
    embedding: bytes  # float32
    num_prompt_tokens: int = 0


class RequestError(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """A request the core refused or failed; ``status`` is an HTTP status (400: bad input)."""

    request_id: str
    message: str
    status: int = 400


class CoreStats(msgspec.Struct, frozen=True, array_like=True, gc=False):
    num_running: int = 0
    num_waiting: int = 0
    kv_usage: float = 0.0
    num_kv_blocks: int = 0
    num_free_blocks: int = 0
    num_steps: int = 0
    num_preemptions: int = 0
    step_running_s: float = 0.0  # how long the step in flight has run; 0: between steps
    num_failed_steps: int = 0  # steps that raised on the ranks (their requests failed)


class StepOutputs(msgspec.Struct, frozen=True, array_like=True, gc=False, tag="step"):
    """One engine step's outputs, for every sequence that advanced."""

    step_id: int
    outputs: list[SeqDelta] = []
    errors: list[RequestError] = []
    stats: CoreStats | None = None
    timestamp: float = 0.0  # time.time() when the step's outputs were ready
    pooled: list[PooledOutput] = []  # prefill-only models: the requests finished this step


class Heartbeat(msgspec.Struct, frozen=True, array_like=True, gc=False, tag="beat"):
    """Sent every ``heartbeat_interval_s``, busy or idle: the core process is alive."""

    timestamp: float
    stats: CoreStats


class UtilityResult(msgspec.Struct, frozen=True, array_like=True, gc=False, tag="result"):
    """A call's return value, or its ``error`` message with ``error_type``, the class the
    caller re-raises it as: ``ValueError`` (bad input), ``LoRAInUseError``, or None (any
    other failure: a ``RuntimeError`` naming the original type)."""

    call_id: int
    value: Any = None
    error: str | None = None
    error_type: str | None = None


class CoreDead(msgspec.Struct, frozen=True, array_like=True, gc=False, tag="dead"):
    """The core stopped serving (a rank died or hung, or shutdown): the last message."""

    reason: str


CoreOutput = StepOutputs | Heartbeat | UtilityResult | CoreDead

_encoder = msgspec.msgpack.Encoder()
_input_decoder = msgspec.msgpack.Decoder(CoreInput)
_output_decoder = msgspec.msgpack.Decoder(CoreOutput)


def encode_core(msg: msgspec.Struct) -> bytes:
    return _encoder.encode(msg)


def decode_core_input(data: bytes) -> CoreInput:
    try:
        return _input_decoder.decode(data)
    except (msgspec.ValidationError, msgspec.DecodeError) as e:
        raise MessageError(f"invalid engine-core input: {e}") from None


def decode_core_output(data: bytes) -> CoreOutput:
    try:
        return _output_decoder.decode(data)
    except (msgspec.ValidationError, msgspec.DecodeError) as e:
        raise MessageError(f"invalid engine-core output: {e}") from None
