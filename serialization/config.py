"""What a rank is built from: sent once, when the rank actor starts."""

from __future__ import annotations

import msgspec


class RankConfig(msgspec.Struct, frozen=True, kw_only=True):
    """Everything a rank needs to load its shard and size its KV cache.

    ``model`` is a Hugging Face directory, a ``.gguf`` file, or (with
    ``load_format="dummy"``) anything ``workers.model_loader.load_hf_config``
    understands. Built by ``spmd.EngineConfig.rank_config()``.
    """

    model: str
    hf_config: bytes = b""  # the engine's HF config as JSON (ranks then skip transformers)
    tokenizer: str = ""  # structured outputs compile against it ("": the model's own)
    load_format: str = "auto"  # auto | safetensors | gguf | dummy
    dtype: str = "float32"  # float32 | bfloat16 | float16
    tp_size: int = 1
    max_model_len: int = 2048
    block_size: int = 16
    kv_cache_dtype: str = "auto"  # auto (the model's dtype) | fp8 (e4m3 with per-token scales)
    kv_cache_memory_bytes: int = 0  # CPU: KV budget per rank; 0: a default from free memory
    gpu_memory_utilization: float = 0.9
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    device: str = "cpu"
    warmup_shapes: list[tuple[int, int, int]] = []  # spyre: (prompt_len, max_new_tokens, batch_size)
    compile_backend: str = "inductor"  # spyre, tpu-emulated: the torch.compile backend
    seed: int = 0  # dummy weights
    dist_init_method: str = ""  # tcp://127.0.0.1:PORT for tp > 1
    dist_timeout_s: float = 120.0  # a collective that waits longer fails instead of hanging
    num_threads: int = 0  # torch intra-op threads per rank; 0: leave as is
    enforce_eager: bool = False  # GPU: no CUDA graphs
    cuda_graph_max_batch_size: int = 512  # GPU: largest decode batch captured in a graph
    # Launch step n+1 before reading back step n's tokens (decode rows take them from the
    # device); every step call then answers with the step before it (see Worker._step_overlapped)
    overlap_steps: bool = False
    max_loras: int = 0  # LoRA device slots; 0: LoRA off
    max_lora_rank: int = 16
    task: str = "generate"  # generate | embed (prefill only: no KV cache, pooled outputs)
    causal: bool = True  # embed with a decoder: False attends both ways (enable_bidirectional)
    pooling: str = "mean"  # embed: mean | cls | last, over each sequence's final hidden states
