"""The CPU rank: gloo for tensor parallelism, KV cache sized from a memory budget."""

from __future__ import annotations

import datetime

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
