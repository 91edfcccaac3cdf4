"""The GPU rank: one CUDA device per rank, NCCL for tensor parallelism, Triton kernels
behind the ``spmd`` ops, KV cache sized from free memory, CUDA graphs for decode.

Ray gives each rank actor one GPU (``num_gpus=1``), so the rank always sees it as
``cuda:0``. Decode steps whose batch fits the graph ladder replay a captured graph
(inputs padded to the next captured size: padding rows have ``seq_len == 0`` and KV
slot -1, so they read and write nothing); prefill, mixed and larger batches run eagerly.
With LoRA on, each size is captured twice: without adapters (base-only batches pay
nothing) and with the LoRA ops reading a token → slot map from fixed buffers, so one
graph serves any mix of adapters.
"""

from __future__ import annotations

import datetime
import logging
import os

import numpy as np
import torch
import torch.distributed as dist

from workers.attention import AttentionMetadata
from workers.input_batch import StepInputs
from workers.layers.lora import LoRAMapping
from workers.sampler import SampleResult
from workers.worker import Worker

logger = logging.getLogger(__name__)

# NVLink multicast (NVLS) can take a shared host's GPUs out of service: always off.
_SAFE_NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                  "NVSHMEM_DISABLE_NVLS": "1"}
_GRAPH_MEMORY_RESERVE = 512 << 20  # CUDA-graph pool and allocator slack, kept out of the KV cache


def graph_batch_sizes(max_batch_size: int) -> list[int]:
    """The decode batch sizes captured as CUDA graphs: 1, 2, 4, 8, then every 16 up to
    ``max_batch_size`` (included). A batch runs in the smallest size that holds it."""
    if max_batch_size <= 0:
        return []
    sizes = {s for s in (1, 2, 4, 8) if s <= max_batch_size}
    sizes.update(range(16, max_batch_size + 1, 16))
    sizes.add(max_batch_size)
    return sorted(sizes)


class GPUMixin:
    """Device part of a CUDA rank."""

    def init_device(self) -> None:
        os.environ.update(_SAFE_NCCL_ENV)
        if not torch.cuda.is_available():
            raise RuntimeError(
                f"device='cuda': rank {self.tp_rank} sees no CUDA device "
                f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})")
        self.device = torch.device("cuda", 0)
        self.init_thread()
        import workers.triton_ops  # noqa: F401  (registers the CUDA kernels of the spmd ops)
        import workers.triton_varlen  # noqa: F401  (and of spmd::varlen_attention)
        import workers.triton_moe  # noqa: F401  (and of spmd::fused_moe)

        cfg = self.config
        if cfg.tp_size > 1:
            dist.init_process_group(
                "nccl", init_method=cfg.dist_init_method, rank=self.tp_rank,
                world_size=cfg.tp_size, device_id=self.device,
                timeout=datetime.timedelta(seconds=cfg.dist_timeout_s))
            # Creates the communicator now, so the first step (or a graph capture) does not.
            dist.all_reduce(torch.zeros(1, device=self.device))
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.lora_graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        if self.config.max_loras:
            import workers.triton_lora  # noqa: F401  (CUDA kernels of the LoRA ops)

    def init_thread(self) -> None:
        # The current CUDA device and OpenMP's thread count are per thread.
        torch.cuda.set_device(self.device)
        if self.config.num_threads > 0:
            torch.set_num_threads(self.config.num_threads)

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        # From pinned memory, without a sync: a blocking copy from pageable memory waits for
        # the stream, i.e. for the step still running. The caching host allocator keeps the
        # pinned block until the copy has run.
        return torch.from_numpy(array).pin_memory().to(self.device, non_blocking=True)

    def _read_back(self, result: SampleResult) -> tuple[SampleResult, torch.cuda.Event]:
        def copy(t: torch.Tensor | None) -> torch.Tensor | None:
            if t is None:
                return None
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            return host.copy_(t, non_blocking=True)

        host = SampleResult(copy(result.token_ids), copy(result.sampled_logprobs),
                            copy(result.top_ids), copy(result.top_logprobs))
        done = torch.cuda.Event()
        done.record()
        return host, done

    # ---- memory -----------------------------------------------------------------------

    @torch.inference_mode()
    def determine_num_kv_blocks(self) -> int:
        """Blocks that fit in ``gpu_memory_utilization`` of the card once weights and the
        activations of the largest step (measured by a profiling forward pass) are counted."""
        cfg = self.config
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info()
        used_before = total - free  # weights, CUDA context, anything else on the card
        torch.cuda.reset_peak_memory_stats()
        allocated_before = torch.cuda.memory_allocated()
        scratch_bytes = self._profile_run()
        torch.cuda.synchronize()
        activation_peak = torch.cuda.max_memory_allocated() - allocated_before - scratch_bytes
        torch.cuda.empty_cache()
        budget = int(total * cfg.gpu_memory_utilization) - used_before - activation_peak \
            - _GRAPH_MEMORY_RESERVE
        block_bytes = self.kv_block_bytes()
        num_blocks = budget // block_bytes
        logger.info("rank %d: %.2f GiB total, %.2f GiB in use, %.2f GiB activation peak; "
                    "KV cache %d blocks (%.2f GiB)", self.tp_rank, total / 2**30,
                    used_before / 2**30, activation_peak / 2**30, num_blocks,
                    num_blocks * block_bytes / 2**30)
        if num_blocks < 1:
            raise ValueError(
                f"gpu_memory_utilization={cfg.gpu_memory_utilization}: no room for a KV cache "
                f"({total / 2**30:.1f} GiB card, {used_before / 2**30:.1f} GiB in use, "
                f"{activation_peak / 2**30:.2f} GiB activations); raise it or lower "
                "max_num_batched_tokens")
        useful = cfg.max_num_seqs * -(-cfg.max_model_len // cfg.block_size) + 1
        return int(min(num_blocks, useful))

    def _profile_run(self) -> int:
        """One forward pass of the largest step (``max_num_batched_tokens`` prompt tokens in
        as few sequences as ``max_model_len`` allows, logits for ``max_num_seqs`` rows) over
        a scratch cache of the serving cache's dtype; returns the scratch cache's bytes. (The
        serving dtype, so that the first real step of this size finds its kernels loaded: with
        FP8 KV and a bf16 scratch cache here, that step took 1.1 s on the H200 against 0.22 s
        with bf16 KV; not re-measured since.)"""
        cfg = self.config
        num_tokens = cfg.max_num_batched_tokens
        num_seqs = -(-num_tokens // cfg.max_model_len)
        lens = [num_tokens // num_seqs + (i < num_tokens % num_seqs) for i in range(num_seqs)]
        hidden = self._scratch_prefill([np.zeros(n, dtype=np.int64) for n in lens])
        logits = self.model.compute_logits(hidden[:min(cfg.max_num_seqs, num_tokens)])
        # The sampler's largest temporaries (top-k/top-p sort) scale with the logits.
        logits.sort(dim=-1)
        del hidden, logits
        return sum(-(-n // cfg.block_size) for n in lens) * self.kv_block_bytes()

    def initialize_cache(self, num_blocks: int) -> int:
        super().initialize_cache(num_blocks)
        if self.lora is not None:
            import workers.triton_lora as triton_lora

            n = triton_lora.warm_up([layer.lora for layer in self.lora.layers.values()],
                                    self.config.max_num_batched_tokens)
            logger.info("rank %d: compiled %d LoRA kernel variants", self.tp_rank, n)
        self._compile_eager_kernels()
        self._capture_graphs()
        return num_blocks

    @torch.inference_mode()
    def _compile_eager_kernels(self) -> None:
        """Runs the eager (prefill and mixed) path's Triton kernels once per variant they
        specialize into (token counts divisible by 16 or not, a decode row beside a
        prefill), over a scratch cache, so that the first requests do not compile them
        (on the H200, dag's mixed steps had taken 25% more model time than inproc's, which
        ran second and found the kernels compiled; with this, bf16 runs' first step is 0.22 s)."""
        if self.config.task == "embed":
            return
        vocab = min(1000, self.model.config.vocab_size)
        for lens in ((32,), (17, 1)):
            self._scratch_prefill([np.arange(n) % vocab for n in lens])
        self._compile_grammar_mask()
        torch.cuda.synchronize(self.device)

    def _compile_grammar_mask(self) -> None:
        """xgrammar's mask kernel (Triton on CUDA) compiles on first use, inside the first
        constrained step (which on the H200 took 0.52 s longer than an unconstrained one):
        it is run here on scratch logits, once per variant it specializes into (1, a few
        or a multiple of 16 rows; all rows or listed ones)."""
        try:
            import xgrammar  # noqa: F401
        except ImportError:  # structured outputs are then refused by the frontend
            return
        from workers.structured import apply_bitmask

        vocab = self.model.config.vocab_size
        logits = torch.zeros(17, vocab, dtype=torch.float32, device=self.device)
        mask = torch.full((17, -(-vocab // 32)), -1, dtype=torch.int32)
        for rows in (1, 2, 16):
            apply_bitmask(logits[:rows], mask[:rows])
            apply_bitmask(logits, mask, list(range(rows)))

    # ---- prefill-only (task="embed") -----------------------------------------------------

    def num_warmup_steps(self) -> int:
        return 1 if self.config.task == "embed" else super().num_warmup_steps()

    def warm_up(self, index: int) -> str:
        """Embed: one batch per batch-size bucket of the varlen attention kernel, so that
        none compiles while serving (~1 s each on first use)."""
        if self.config.task != "embed" or index != 0:
            return super().warm_up(index)
        import workers.triton_varlen as triton_varlen

        sizes = triton_varlen.seqs_buckets(self.config.max_num_seqs)
        for n in sizes:
            self._run_encoder(np.ones(n, dtype=np.int32), np.zeros(n, dtype=np.int32))
        return f"varlen attention for batches of up to {sizes[-1]} sequences ({len(sizes)} kernels)"

    # ---- CUDA graphs --------------------------------------------------------------------

    @torch.inference_mode()
    def _capture_graphs(self) -> None:
        cfg = self.config
        self.graphs, self.lora_graphs = {}, {}
        sizes = [] if cfg.enforce_eager else graph_batch_sizes(
            min(cfg.cuda_graph_max_batch_size, cfg.max_num_seqs))
        if not sizes:
            return
        dev, max_bs = self.device, sizes[-1]
        self._max_blocks = -(-cfg.max_model_len // cfg.block_size)
        # Static inputs: one int64 and one int32 buffer, each filled by one host-to-device copy
        # (the int64 one's fourth row: overlapped steps' input_src, read outside the graph).
        self._host64 = torch.zeros(4 * max_bs, dtype=torch.int64, pin_memory=True)
        self._host32 = torch.zeros(max_bs * (1 + self._max_blocks), dtype=torch.int32,
                                   pin_memory=True)
        self._dev64 = torch.zeros_like(self._host64, device=dev)
        self._dev32 = torch.zeros_like(self._host32, device=dev)
        ids, positions, slots, _ = self._dev64.view(4, max_bs)
        # Set once the last step's host-to-device copies have run: the pinned buffers are
        # refilled only then (with overlapped steps the device may not have reached them).
        self._inputs_copied = torch.cuda.Event()
        seq_lens = self._dev32[:max_bs]
        tables = self._dev32[max_bs:].view(max_bs, self._max_blocks)
        # A graph reads its inputs at fixed addresses: every input tensor must outlive it
        # (a freed one is recycled by the allocator and the replay reads garbage).
        self._starts = starts = torch.arange(max_bs + 1, dtype=torch.int32, device=dev)
        slots.fill_(-1)
        lora_maps: dict[int, LoRAMapping | None] = {bs: None for bs in sizes}
        if self.lora is not None:
            # token slots, tokens sorted by slot, segment starts: one copy per LoRA step
            num_lora = 2 * max_bs + cfg.max_loras + 1
            self._host_lora = torch.zeros(num_lora, dtype=torch.int32, pin_memory=True)
            self._dev_lora = torch.zeros_like(self._host_lora, device=dev)
            token_slots, sorted_idx = self._dev_lora[:2 * max_bs].view(2, max_bs)
            seg_starts = self._dev_lora[2 * max_bs:]
            lora_maps = {bs: LoRAMapping(token_slots[:bs], sorted_idx[:bs], seg_starts)
                         for bs in sizes}
        pool = torch.cuda.graph_pool_handle()
        for with_lora in ((False, True) if self.lora is not None else (False,)):
            for bs in reversed(sizes):  # largest first: smaller graphs reuse its pool
                meta = AttentionMetadata(query_start_loc=starts[:bs + 1], seq_lens=seq_lens[:bs],
                                         block_tables=tables[:bs], slot_mapping=slots[:bs],
                                         max_query_len=1, max_seq_len=cfg.max_model_len)
                lora = lora_maps[bs] if with_lora else None

                def run(bs=bs, meta=meta, lora=lora):
                    hidden = self.model(ids[:bs], positions[:bs], meta, self.kv_caches, lora)
                    return self.model.compute_logits(hidden)

                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    run()  # warm-up outside the graph (allocator, Triton compilation)
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    logits = run()
                (self.lora_graphs if with_lora else self.graphs)[bs] = (graph, logits)
        torch.cuda.synchronize()
        self._graph_sizes = np.array(sizes)
        logger.info("rank %d: captured %d CUDA graphs (batch 1..%d)", self.tp_rank, len(sizes),
                    max_bs)

    def _compute_logits(self, inputs: StepInputs) -> torch.Tensor:
        n = len(inputs.rows)
        if (not self.graphs or len(inputs.input_ids) != n or len(inputs.logits_indices) != n
                or n > self._graph_sizes[-1]):
            return super()._compute_logits(inputs)
        # Pure decode step that fits a graph: pad to the captured size and replay.
        bs = int(self._graph_sizes[np.searchsorted(self._graph_sizes, n)])
        max_bs = int(self._graph_sizes[-1])
        self._inputs_copied.synchronize()
        host64 = self._host64.numpy().reshape(4, max_bs)
        host64[0, :n] = inputs.input_ids
        host64[1, :n] = inputs.positions
        host64[2, :n] = inputs.slot_mapping
        host64[:2, n:bs] = 0
        host64[2, n:bs] = -1
        if inputs.input_src is not None:
            host64[3, :n] = inputs.input_src
        host32 = self._host32.numpy()
        host32[:n] = inputs.seq_lens
        host32[n:bs] = 0
        tables = host32[max_bs:].reshape(max_bs, self._max_blocks)
        width = inputs.block_tables.shape[1]
        tables[:n, :width] = inputs.block_tables
        self._dev64.copy_(self._host64, non_blocking=True)
        rows32 = max_bs + bs * self._max_blocks  # only the rows this graph reads
        self._dev32[:rows32].copy_(self._host32[:rows32], non_blocking=True)
        graph, logits = self.graphs[bs]
        token_slots = self._token_slots(inputs)
        if token_slots is not None:
            graph, logits = self.lora_graphs[bs]
            self._fill_lora_inputs(token_slots, bs, max_bs)
        self._inputs_copied.record()
        if inputs.input_src is not None:
            ids, _, _, src = self._dev64.view(4, max_bs)
            self._take_pending_tokens(ids[:n], src[:n])
        graph.replay()
        return logits[:n]

    def _fill_lora_inputs(self, token_slots: np.ndarray, bs: int, max_bs: int) -> None:
        from workers.lora_ops import lora_metadata

        padded = np.full(bs, -1, np.int32)
        padded[:len(token_slots)] = token_slots
        sorted_idx, seg_starts = lora_metadata(padded, self.config.max_loras)
        host = self._host_lora.numpy()
        host[:bs] = padded
        host[max_bs:max_bs + bs] = sorted_idx
        host[2 * max_bs:] = seg_starts
        self._dev_lora.copy_(self._host_lora, non_blocking=True)


class GPUWorker(GPUMixin, Worker):
    """A rank on one CUDA GPU."""
