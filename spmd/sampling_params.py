"""User-facing sampling parameters, shaped like vLLM's and validated on entry."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from spmd.structured_outputs import StructuredOutputsParams

_GREEDY_EPS = 1e-5
_INT32_MAX = 2**31 - 1


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    max_tokens: int | None = 16  # None: up to max_model_len
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # top-n log-probs per generated token
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    detokenize: bool = True
    # Constrained decoding (JSON schema, regex, choice, grammar); a dict of its fields works too.
    structured_outputs: StructuredOutputsParams | None = None

    def __post_init__(self):
        """Type and range checks that hold for every engine; per-engine limits (``n``,
        log-probs, stop strings, the context) are the input processor's."""
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        self.structured_outputs = StructuredOutputsParams.coerce(self.structured_outputs)
        _require(_is_int(self.n) and self.n >= 1, "n", f"must be an int >= 1, got {self.n!r}")
        for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty",
                     "repetition_penalty"):
            value = getattr(self, name)
            _require(_is_number(value) and math.isfinite(value), name,
                     f"must be a finite number, got {value!r}")
        _require(self.temperature >= 0, "temperature", f"must be >= 0, got {self.temperature}")
        _require(0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p}")
        _require(_is_int(self.top_k) and 0 <= self.top_k <= _INT32_MAX, "top_k",
                 f"must be -1, 0 (off) or a positive int up to {_INT32_MAX}, got {self.top_k!r}")
        _require(0 <= self.min_p <= 1, "min_p", f"must be in [0, 1], got {self.min_p}")
        _require(-2 <= self.presence_penalty <= 2, "presence_penalty",
                 f"must be in [-2, 2], got {self.presence_penalty}")
        _require(-2 <= self.frequency_penalty <= 2, "frequency_penalty",
                 f"must be in [-2, 2], got {self.frequency_penalty}")
        _require(0 < self.repetition_penalty <= 2, "repetition_penalty",
                 f"must be in (0, 2], got {self.repetition_penalty}")
        _require(self.max_tokens is None or (_is_int(self.max_tokens) and self.max_tokens >= 1),
                 "max_tokens", f"must be an int >= 1, got {self.max_tokens!r}")
        _require(_is_int(self.min_tokens) and self.min_tokens >= 0
                 and (self.max_tokens is None or self.min_tokens <= self.max_tokens),
                 "min_tokens", f"must be an int in [0, max_tokens], got {self.min_tokens!r}")
        _require(self.logprobs is None or (_is_int(self.logprobs) and self.logprobs >= 0),
                 "logprobs", f"must be an int >= 0, got {self.logprobs!r}")
        _require(self.seed is None or (_is_int(self.seed) and 0 <= self.seed < 2**63), "seed",
                 f"must be an int in [0, 2**63), got {self.seed!r}")
        _require(all(isinstance(s, str) and s for s in self.stop), "stop",
                 "must be non-empty strings")
        for s in self.stop:
            _require(_valid_unicode(s), "stop", "must be valid Unicode (no lone surrogates)")
        _require(all(_is_int(t) and 0 <= t <= _INT32_MAX for t in self.stop_token_ids),
                 "stop_token_ids", f"must be ints in [0, {_INT32_MAX}]")
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens",
                     "detokenize"):
            _require(isinstance(getattr(self, name), bool), name, "must be a bool")

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _valid_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _require(ok: bool, name: str, limit: str) -> None:
    if not ok:
        raise ValueError(f"{name}: {limit}")
