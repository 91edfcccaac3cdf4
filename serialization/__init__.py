"""The engine↔rank wire format (msgspec). Imports nothing of ours."""

from serialization.messages import (
    BlockUpdate,
    ExecuteModelRequest,
    MessageError,
    NewRequest,
    RankCall,
    RankReply,
    ResumedRequest,
    SamplerOutput,
    SamplingOptions,
    decode_output,
    decode_rank_input,
    decode_reply,
    encode,
    pack_f32,
    pack_i32,
    unpack_f32,
    unpack_i32,
)

__all__ = [
    "BlockUpdate", "ExecuteModelRequest", "MessageError", "NewRequest", "RankCall", "RankReply",
    "ResumedRequest", "SamplerOutput", "SamplingOptions", "decode_output", "decode_rank_input", "decode_reply",
    "encode", "pack_f32", "pack_i32", "unpack_f32", "unpack_i32",
]

from serialization.config import RankConfig  # noqa: E402

__all__.append("RankConfig")
