"""The wire formats (msgspec): engine↔rank and frontend↔engine core. Imports nothing of ours."""

from serialization.config import RankConfig
from serialization.core_messages import (
    AbortRequests,
    CoreDead,
    CoreInput,
    CoreOutput,
    CoreStats,
    EngineCoreRequest,
    Heartbeat,
    RequestError,
    SeqDelta,
    Shutdown,
    StepOutputs,
    StopSequences,
    TokenLogprobs,
    UtilityCall,
    UtilityResult,
    decode_core_input,
    decode_core_output,
    encode_core,
)
from serialization.messages import (
    BlockUpdate,
    ExecuteModelRequest,
    LoRASlot,
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
    "AbortRequests", "CoreDead", "CoreInput", "CoreOutput", "CoreStats", "EngineCoreRequest",
    "Heartbeat", "RequestError", "SeqDelta", "Shutdown", "StepOutputs", "StopSequences",
    "TokenLogprobs", "UtilityCall", "UtilityResult", "decode_core_input", "decode_core_output",
    "encode_core",
    "BlockUpdate", "ExecuteModelRequest", "LoRASlot", "MessageError", "NewRequest", "RankCall", "RankReply",
    "ResumedRequest", "SamplerOutput", "SamplingOptions", "decode_output", "decode_rank_input", "decode_reply",
    "encode", "pack_f32", "pack_i32", "unpack_f32", "unpack_i32",
]
