"""LoRA adapters: the request naming one (a stand-in; the engine's own version replaces it)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LoRARequest:
    """An adapter: ``lora_int_id >= 1`` identifies it in the engine (0 is the base model)."""

    lora_name: str
    lora_int_id: int
    lora_path: str


class LoRAInUseError(ValueError):
    """The adapter cannot be removed: unfinished requests use it."""
