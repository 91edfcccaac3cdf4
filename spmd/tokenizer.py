"""Tokenizer loading (transformers): Hugging Face directories and GGUF files."""

from __future__ import annotations

from transformers import AutoTokenizer

from workers.model_loader import resolve_model_path


def load_tokenizer(model: str):
    folder, gguf_file = resolve_model_path(model)
    try:
        if gguf_file:
            return AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as e:
        raise ValueError(f"tokenizer: cannot load one from {model} ({e}); pass "
                         "skip_tokenizer_init=True to serve token-id prompts") from None
