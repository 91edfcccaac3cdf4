"""The TPU rank: continuous batching and paged KV, padded so that XLA never recompiles.

XLA compiles one program per input shape. The continuous scheduler's steps vary
in token and request count, so each step is padded up to a bucket: the token
count to a power of two (at least ``_MIN_TOKENS``), the request count to a power
of two (at least ``_MIN_SEQS``), each capped by its configured maximum
(``max_num_batched_tokens``, ``max_num_seqs``); block tables to the full
``max_model_len``. Every bucket pair is compiled at start-up.
``device="tpu-emulated"`` runs this same mixin on the CPU, with
``torch.compile(dynamic=False)`` (``compile_backend``) standing in for XLA.
With LoRA on, every bucket is compiled with the adapters in it: each token's slot is
one more fixed-shape input (-1: base), the slots' weights are buffers updated in place,
and LoRA runs as lanes (``lora_ops.lora_lanes``), so no mix of adapters ever compiles anything.
"""

from __future__ import annotations

import datetime
import importlib.util
import itertools

import numpy as np
import torch
import torch.distributed as dist

from workers.attention import AttentionMetadata
from workers.compilation import CountingBackend, allow_recompiles
from workers.cpu_worker import CPUMixin
from workers.input_batch import StepInputs
from workers.layers.lora import LoRAMapping
from workers.sampler import SampleResult
from workers.worker import Worker

_MIN_TOKENS = 16
_MIN_SEQS = 8


def buckets(minimum: int, maximum: int) -> list[int]:
    """Powers of two from ``minimum`` (capped at ``maximum``), then ``maximum`` itself."""
    out, size = [], min(minimum, maximum)
    while size < maximum:
        out.append(size)
        size *= 2
    return out + [maximum]


def _padded_forward(model, input_ids, positions, query_start_loc, seq_lens, block_tables,
                    slot_mapping, logits_indices, kv_caches, max_seq_len: int, lane_mask=None):
    """One padded step: ``[T_pad]`` tokens of ``S_pad`` requests → logits ``[S_pad, vocab]``;
    ``lane_mask [T_pad, max_loras]``: each token's LoRA slot, one-hot (a base token's row
    is zero), when LoRA is on."""
    meta = AttentionMetadata(query_start_loc=query_start_loc, seq_lens=seq_lens,
                             block_tables=block_tables, slot_mapping=slot_mapping,
                             max_query_len=input_ids.shape[0], max_seq_len=max_seq_len)
    lora = None if lane_mask is None else LoRAMapping(None, lane_mask=lane_mask)
    hidden = model(input_ids, positions, meta, kv_caches, lora)
    return model.compute_logits(hidden[logits_indices])


class TPUMixin(CPUMixin):
    """Device part of a TPU rank (``tpu``: torch_xla; ``tpu-emulated``: the CPU)."""

    lora_lanes = True

    def init_device(self) -> None:
        cfg = self.config
        if cfg.device == "tpu":
            backend = self._init_xla()
        else:
            super().init_device()
            backend = cfg.compile_backend
        self.compile_counter = CountingBackend(backend)
        self.token_buckets = buckets(_MIN_TOKENS, cfg.max_num_batched_tokens)
        self.seq_buckets = buckets(_MIN_SEQS, cfg.max_num_seqs)
        self.init_thread()
        self._forward = torch.compile(_padded_forward, backend=self.compile_counter, dynamic=False)
        self._max_blocks = -(-cfg.max_model_len // cfg.block_size)

    def init_thread(self) -> None:
        super().init_thread()
        # TorchDynamo's limits are per thread: a compiled graph's loop thread compiling the
        # 9th bucket would otherwise run it eagerly, silently.
        if hasattr(self, "token_buckets"):
            allow_recompiles(len(self.token_buckets) * len(self.seq_buckets))

    def _init_xla(self) -> str:
        cfg = self.config
        if importlib.util.find_spec("torch_xla") is None:
            raise RuntimeError("device='tpu' needs torch_xla, which is not installed here "
                               "(pip install torch_xla); device='tpu-emulated' runs this path on the CPU")
        import torch_xla.core.xla_model as xm

        self.device = xm.xla_device()
        if cfg.tp_size > 1:
            import torch_xla.distributed.xla_backend  # noqa: F401  registers the "xla" group

            dist.init_process_group("xla", init_method=cfg.dist_init_method, rank=self.tp_rank,
                                    world_size=cfg.tp_size,
                                    timeout=datetime.timedelta(seconds=cfg.dist_timeout_s))
        return "openxla"

    # ---- warm-up ----------------------------------------------------------------------

    def num_warmup_steps(self) -> int:
        return len(self.token_buckets) * len(self.seq_buckets)

    def warm_up(self, index: int) -> str:
        """Compiles and runs bucket pair ``index`` once (padding only: no KV is written)."""
        num_tokens, num_seqs = list(itertools.product(self.token_buckets, self.seq_buckets))[index]
        none = np.zeros(0, np.int64)
        self._run(none, none, np.zeros(1, np.int32), none, np.zeros((0, 1), np.int32), none, none,
                  num_tokens, num_seqs, np.zeros(0, np.int32))
        return f"num_tokens={num_tokens},num_seqs={num_seqs}"

    def num_compiled_graphs(self) -> int:
        return self.compile_counter.num_graphs

    # ---- one step ---------------------------------------------------------------------

    @torch.inference_mode()
    def _run_model(self, inputs: StepInputs) -> SampleResult:
        num_tokens, num_seqs = len(inputs.input_ids), len(inputs.rows)
        token_bucket = next(b for b in self.token_buckets if b >= num_tokens)
        seq_bucket = next(b for b in self.seq_buckets if b >= num_seqs)
        token_slots = self._token_slots(inputs)
        logits = self._run(inputs.input_ids, inputs.positions, inputs.query_start_loc,
                           inputs.seq_lens, inputs.block_tables, inputs.slot_mapping,
                           inputs.logits_indices, token_bucket, seq_bucket,
                           np.zeros(0, np.int32) if token_slots is None else token_slots)
        if len(inputs.logits_indices) == 0:
            return SampleResult(torch.empty(0, dtype=torch.int64), None, None, None)
        logits = logits[: len(inputs.logits_indices)].float().cpu()
        return self._sample(logits, inputs)

    @torch.inference_mode()
    def _run(self, input_ids, positions, query_start_loc, seq_lens, block_tables, slot_mapping,
             logits_indices, token_bucket: int, seq_bucket: int,
             token_slots: np.ndarray) -> torch.Tensor:
        """Pads one step to (token_bucket, seq_bucket) and runs its compiled graph.
        Padding tokens write no KV (slot -1); padding requests have no queries; tokens
        past ``token_slots`` use no adapter."""
        num_tokens, num_seqs = len(input_ids), len(seq_lens)
        ids = np.zeros(token_bucket, np.int64)
        ids[:num_tokens] = input_ids
        pos = np.zeros(token_bucket, np.int64)
        pos[:num_tokens] = positions
        slots = np.full(token_bucket, -1, np.int64)
        slots[:num_tokens] = slot_mapping
        qsl = np.full(seq_bucket + 1, query_start_loc[-1], np.int32)
        qsl[: num_seqs + 1] = query_start_loc
        lens = np.zeros(seq_bucket, np.int32)
        lens[:num_seqs] = seq_lens
        tables = np.zeros((seq_bucket, self._max_blocks), np.int32)
        tables[:num_seqs, : block_tables.shape[1]] = block_tables
        sample = np.zeros(seq_bucket, np.int64)
        sample[: len(logits_indices)] = logits_indices
        dev = self.device
        lane_mask = None
        if self.lora is not None:
            mask = np.zeros((token_bucket, self.config.max_loras), np.float32)
            lora_rows = np.flatnonzero(token_slots >= 0)
            mask[lora_rows, token_slots[lora_rows]] = 1.0
            lane_mask = torch.from_numpy(mask).to(dev, self.dtype)
        return self._forward(
            self.model, *(torch.from_numpy(a).to(dev) for a in (ids, pos, qsl, lens, tables,
                                                                  slots, sample)),
            self.kv_caches, self.config.max_model_len, lane_mask)


class TPUWorker(TPUMixin, Worker):
    """A rank on a TPU (or, with ``device="tpu-emulated"``, the same path on the CPU)."""
