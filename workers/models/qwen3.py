"""Qwen3 (dense): a Llama-family decoder whose queries and keys are RMS-normalised per
head before RoPE."""

from __future__ import annotations

from workers.models.llama import LlamaForCausalLM


class Qwen3ForCausalLM(LlamaForCausalLM):
    """Qwen3: queries and keys RMS-normalised per head before RoPE; no q/k/v bias unless
    the config says so."""

    qk_norm = True

    @staticmethod
    def window(cfg) -> int | None:
        return getattr(cfg, "sliding_window", None) if getattr(cfg, "use_sliding_window", False) else None
