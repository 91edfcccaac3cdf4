"""Wire format between the engine and the ranks: msgspec Structs, delta-encoded.

A step message carries only what a rank cannot know by itself: requests it has
never seen (with their prompts), KV blocks newly appended to running requests,
requests resumed after preemption, how many tokens each scheduled request runs,
and which requests finished or were preempted. Token histories never travel
again: every rank appends the tokens it sampled itself.

Integer arrays travel as raw little-endian bytes (``int32``), so a decode step
of N requests costs about 8 bytes per request plus a fixed header.
"""

from __future__ import annotations

from typing import Any

import msgspec
import numpy as np

_I32 = np.dtype("<i4")
_F32 = np.dtype("<f4")


def pack_i32(values) -> bytes:
    """Packs a sequence of ints (or an int array) as raw little-endian int32."""
    return np.asarray(values, dtype=_I32).tobytes()


def unpack_i32(data: bytes) -> np.ndarray:
    """The inverse of ``pack_i32`` (a read-only view, no copy)."""
    return np.frombuffer(data, dtype=_I32)


def pack_f32(values) -> bytes:
    return np.asarray(values, dtype=_F32).tobytes()


def unpack_f32(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype=_F32)


class SamplingOptions(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """What a rank needs to sample a request's next token (stopping is the engine's job)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k
    min_p: float = 0.0
    seed: int = 0  # always set: the engine draws one for unseeded requests, so all ranks agree
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: int = -1  # top-n log-probs to return; -1: none


class GuidedSpec(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """A structured-output constraint, as text: every rank compiles it against its own
    tokenizer (cached) and masks the request's logits with it before sampling, so all
    ranks sample the same token. It travels once, with the new request."""

    kind: str  # json (a JSON schema) | json_object | regex | grammar (EBNF) | structural_tag
    spec: str = ""  # the schema, regex, grammar or structural tag (JSON); "" for json_object
    end_token_ids: list[int] = []  # the tokens that may end the output (the request's stops)


class NewRequest(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """A request the ranks have never seen: the only place a prompt travels."""

    seq_id: int
    prompt_token_ids: bytes  # int32
    sampling: SamplingOptions
    block_ids: bytes  # int32, the request's whole block table so far
    num_computed_tokens: int = 0  # > 0 on a prefix-cache hit
    lora_id: int = 0  # its adapter (0: the base model); ranks find its slot themselves
    guided: GuidedSpec | None = None  # structured output: its tokens obey this constraint


class BlockUpdate(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """Blocks appended to a running request's table this step."""

    seq_id: int
    new_block_ids: bytes  # int32


class ResumedRequest(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """A request preempted earlier and scheduled again: ranks still hold its tokens,
    but it restarts from ``num_computed_tokens`` with a fresh block table."""

    seq_id: int
    block_ids: bytes  # int32, the whole new table
    num_computed_tokens: int = 0


class LoRASlot(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """Device slot ``slot`` takes adapter ``lora_id`` (already loaded by ``load_lora``)
    before this step runs."""

    slot: int
    lora_id: int


class ExecuteModelRequest(msgspec.Struct, frozen=True, array_like=True, gc=False, tag="step"):
    """One engine step, sent identically to every rank.

    Scheduled requests run, in order, ``scheduled_seq_ids[i]`` for
    ``num_scheduled_tokens[i]`` tokens starting at that request's
    ``num_computed_tokens`` (which every rank tracks). A request that reaches the
    end of its known tokens samples one; a partial prefill chunk samples none.
    Finished and preempted ids are applied before anything else. Under static
    batching (warm-up shapes), a step that starts a batch names its shape by index
    into ``RankConfig.warmup_shapes``; every other step leaves it at -1.
    """

    step_id: int
    scheduled_seq_ids: bytes = b""  # int32
    num_scheduled_tokens: bytes = b""  # int32, parallel to scheduled_seq_ids
    new_requests: list[NewRequest] = []
    block_updates: list[BlockUpdate] = []
    resumed: list[ResumedRequest] = []
    finished_ids: bytes = b""  # int32
    preempted_ids: bytes = b""  # int32
    shape_index: int = -1
    lora_slots: list[LoRASlot] = []  # only in steps that change which adapter a slot holds


class EncodeBatch(msgspec.Struct, frozen=True, array_like=True, gc=False, tag="encode"):
    """One step of a prefill-only model (embeddings): whole prompts, run once and pooled.
    Ranks keep nothing between these steps, so each carries its prompts in full: that is
    the whole delta. Sequence i is ``token_ids[sum(seq_lens[:i]) : sum(seq_lens[:i+1])]``."""

    step_id: int
    seq_ids: bytes = b""  # int32
    seq_lens: bytes = b""  # int32, parallel to seq_ids
    token_ids: bytes = b""  # int32, the prompts concatenated in order


class PoolerOutput(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """What rank 0 returns for an ``EncodeBatch``: one pooled hidden state per sequence
    (not normalized: the frontend applies ``dimensions`` and ``normalize``)."""

    step_id: int
    seq_ids: bytes = b""  # int32
    embeddings: bytes = b""  # float32, row-major [len(seq_ids), hidden_size]
    hidden_size: int = 0
    model_time_s: float = 0.0
    rank_time_s: float = 0.0


class SamplerOutput(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """What rank 0 returns for one step: one sampled token per request that sampled,
    in step order. Log-prob arrays are present only when a request asked for them:
    ``logprob_seq_ids`` names those rows, ``sampled_logprobs`` holds the chosen
    token's log-prob, and ``top_ids``/``top_logprobs`` are ``[rows, num_top]``."""

    step_id: int
    seq_ids: bytes = b""  # int32
    token_ids: bytes = b""  # int32
    logprob_seq_ids: bytes = b""  # int32
    sampled_logprobs: bytes = b""  # float32
    num_top: int = 0
    top_ids: bytes = b""  # int32, row-major [rows, num_top]
    top_logprobs: bytes = b""  # float32, row-major [rows, num_top]
    model_time_s: float = 0.0  # rank-side forward + sample time
    rank_time_s: float = 0.0  # rank-side decode-to-return time
    # Rank-side, from the previous step's tokens reaching the host to this step's forward
    # starting: host work the device waits through (0 for a rank's first step).
    idle_s: float = 0.0


class RankCall(msgspec.Struct, frozen=True, array_like=True, gc=False, tag="call"):
    """A rank-state operation broadcast to every rank through the same transport
    (health check, KV-cache set-up, profiler, ...): not part of a step.
    Every rank answers with ``RankReply``."""

    method: str
    args: list[Any] = []  # scalars, strings, int lists, raw bytes


class RankReply(msgspec.Struct, frozen=True, array_like=True, gc=False):
    tp_rank: int
    value: Any = None  # a scalar, a string or raw bytes (e.g. float32 logits)


_step_encoder = msgspec.msgpack.Encoder()
_rank_input_decoder = msgspec.msgpack.Decoder(ExecuteModelRequest | EncodeBatch | RankCall)
_output_decoder = msgspec.msgpack.Decoder(SamplerOutput)
_pooler_output_decoder = msgspec.msgpack.Decoder(PoolerOutput)
_reply_decoder = msgspec.msgpack.Decoder(RankReply)


class MessageError(ValueError):
    """A message that does not decode or violates its schema."""


def encode(msg: msgspec.Struct) -> bytes:
    return _step_encoder.encode(msg)


def decode_rank_input(data: bytes) -> ExecuteModelRequest | EncodeBatch | RankCall:
    """What a rank receives: a step (generate or encode), or a broadcast call."""
    try:
        return _rank_input_decoder.decode(data)
    except msgspec.ValidationError as e:
        raise MessageError(f"invalid rank message: {e}") from None
    except msgspec.DecodeError as e:
        raise MessageError(f"undecodable rank message: {e}") from None


def decode_reply(data: bytes) -> RankReply:
    try:
        return _reply_decoder.decode(data)
    except (msgspec.ValidationError, msgspec.DecodeError) as e:
        raise MessageError(f"invalid RankReply: {e}") from None


def decode_output(data: bytes) -> SamplerOutput:
    try:
        return _output_decoder.decode(data)
    except msgspec.ValidationError as e:
        raise MessageError(f"invalid SamplerOutput: {e}") from None
    except msgspec.DecodeError as e:
        raise MessageError(f"undecodable SamplerOutput: {e}") from None


def decode_pooler_output(data: bytes) -> PoolerOutput:
    try:
        return _pooler_output_decoder.decode(data)
    except (msgspec.ValidationError, msgspec.DecodeError) as e:
        raise MessageError(f"invalid PoolerOutput: {e}") from None
