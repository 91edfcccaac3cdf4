"""The CPU rank: gloo for tensor parallelism, KV cache sized from a memory budget."""

from __future__ import annotations

import datetime
import time

import numpy as np
import psutil
import torch
import torch.distributed as dist

from workers.worker import Worker

_DEFAULT_KV_FRACTION = 0.25  # of available memory, split across the ranks of this host
_MAX_DEFAULT_KV_BYTES = 4 << 30


class CPUMixin:
    """Device part of a CPU rank."""

    device = torch.device("cpu")

    def init_device(self) -> None:
        cfg = self.config
        self.init_thread()
        if cfg.tp_size > 1:
            dist.init_process_group(
                "gloo", init_method=cfg.dist_init_method, rank=self.tp_rank,
                world_size=cfg.tp_size, timeout=datetime.timedelta(seconds=cfg.dist_timeout_s))

    def init_thread(self) -> None:
        # OpenMP's thread count is per calling thread (and Ray exports OMP_NUM_THREADS=1
        # to actors with fractional CPUs): set it in every thread that runs the model.
        if self.config.num_threads > 0:
            torch.set_num_threads(self.config.num_threads)

    @torch.inference_mode()
    def prefill_seconds(self, num_tokens: int) -> float:
        """Timed: the engine sleeps through most of a step rather than spin on the graph
        channel beside the rank's threads; with no guess for the first step (a 2,048-token
        prefill), that step took 1.2 s longer than in process (2-core host)."""
        # Prompts as long as the model attends over (a sliding window is not implemented).
        max_len = min(self.config.max_model_len,
                      getattr(self.model, "sliding_window", None) or num_tokens)
        lens = [max_len] * (num_tokens // max_len) + [num_tokens % max_len] * bool(num_tokens % max_len)
        vocab = min(1000, self.model.config.vocab_size)
        t0 = time.perf_counter()
        self._scratch_prefill([np.arange(n) % vocab for n in lens])
        return time.perf_counter() - t0

    def determine_num_kv_blocks(self) -> int:
        cfg = self.config
        budget = cfg.kv_cache_memory_bytes or min(
            _MAX_DEFAULT_KV_BYTES,
            int(psutil.virtual_memory().available * _DEFAULT_KV_FRACTION / cfg.tp_size))
        # More blocks than max_num_seqs full-length requests can use is wasted memory.
        useful = cfg.max_num_seqs * -(-cfg.max_model_len // cfg.block_size) + 1
        return max(1, min(useful, budget // self.kv_block_bytes()))


class CPUWorker(CPUMixin, Worker):
    """A rank on the CPU."""
