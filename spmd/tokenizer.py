"""Tokenizer loading (transformers): Hugging Face directories and GGUF files; tokenizer
threads for the async engine."""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import os
import threading

from workers.structured import load_tokenizer as _load


def load_tokenizer(model: str):
    try:
        return _load(model)
    except (OSError, ValueError) as e:
        raise ValueError(f"tokenizer: cannot load one from {model} ({e}); pass "
                         "skip_tokenizer_init=True to serve token-id prompts") from None


class TokenizerThreads:
    """Tokenization off the event loop: a few threads, each with its own copy of the
    tokenizer. The tokenizers' batch call runs in Rust without the GIL, so requests
    tokenize in parallel while the loop serves others; own copies because a call that
    truncates reconfigures its tokenizer, which another thread may be using."""

    def __init__(self, tokenizer, num_threads: int | None = None):
        self.tokenizer = tokenizer
        self.num_threads = num_threads or max(1, min(4, (os.cpu_count() or 1) // 2))
        self._local = threading.local()
        self._pool = concurrent.futures.ThreadPoolExecutor(
            self.num_threads, thread_name_prefix="spmd-tokenize")

    def _own(self):
        tok = getattr(self._local, "tokenizer", None)
        if tok is None:
            tok = self._local.tokenizer = copy.deepcopy(self.tokenizer)
        return tok

    async def run(self, fn, *args):
        """``fn(tokenizer, *args)`` in one of the threads, with that thread's tokenizer."""
        return await asyncio.get_running_loop().run_in_executor(
            self._pool, lambda: fn(self._own(), *args))

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
