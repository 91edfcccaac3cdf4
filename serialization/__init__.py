"""The engine↔rank wire format (msgspec). Imports nothing of ours."""

from serialization.config import RankConfig
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
    "RankConfig",
    "BlockUpdate", "ExecuteModelRequest", "MessageError", "NewRequest", "RankCall", "RankReply",
    "ResumedRequest", "SamplerOutput", "SamplingOptions", "decode_output", "decode_rank_input", "decode_reply",
    "encode", "pack_f32", "pack_i32", "unpack_f32", "unpack_i32",
]
