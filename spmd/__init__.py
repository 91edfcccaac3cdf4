"""spmd-serve: driver-free SPMD LLM serving on Ray compiled graphs."""

from spmd.async_engine import AsyncEngine
from spmd.config import EngineConfig
from spmd.engine import RequestFailedError
from spmd.llm import LLM
from spmd.lora import LoRARequest
from spmd.outputs import CompletionOutput, Logprob, RequestOutput
from spmd.pooling import EmbeddingOutput, EmbeddingRequestOutput, PoolingParams
from spmd.sampling_params import SamplingParams
from spmd.structured_outputs import StructuredOutputsParams

__all__ = ["AsyncEngine", "CompletionOutput", "EmbeddingOutput", "EmbeddingRequestOutput",
           "EngineConfig", "LLM", "Logprob", "LoRARequest", "PoolingParams",
           "RequestFailedError", "RequestOutput", "SamplingParams", "StructuredOutputsParams"]
