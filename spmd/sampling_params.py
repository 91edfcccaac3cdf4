"""User-facing sampling parameters, shaped like vLLM's and validated on entry."""

from __future__ import annotations

from dataclasses import dataclass, field

_GREEDY_EPS = 1e-5


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

    MAX_LOGPROBS = 20

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        _require(isinstance(self.n, int) and self.n >= 1, "n", f"must be an int >= 1, got {self.n!r}")
        _require(self.temperature >= 0, "temperature", f"must be >= 0, got {self.temperature}")
        _require(0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p}")
        _require(isinstance(self.top_k, int) and self.top_k >= 0, "top_k",
                 f"must be -1, 0 (off) or a positive int, got {self.top_k!r}")
        _require(0 <= self.min_p <= 1, "min_p", f"must be in [0, 1], got {self.min_p}")
        _require(-2 <= self.presence_penalty <= 2, "presence_penalty",
                 f"must be in [-2, 2], got {self.presence_penalty}")
        _require(-2 <= self.frequency_penalty <= 2, "frequency_penalty",
                 f"must be in [-2, 2], got {self.frequency_penalty}")
        _require(0 < self.repetition_penalty <= 2, "repetition_penalty",
                 f"must be in (0, 2], got {self.repetition_penalty}")
        _require(self.max_tokens is None or (isinstance(self.max_tokens, int) and self.max_tokens >= 1),
                 "max_tokens", f"must be an int >= 1, got {self.max_tokens!r}")
        _require(self.min_tokens >= 0 and (self.max_tokens is None or self.min_tokens <= self.max_tokens),
                 "min_tokens", f"must be in [0, max_tokens], got {self.min_tokens}")
        _require(self.logprobs is None or 0 <= self.logprobs <= self.MAX_LOGPROBS, "logprobs",
                 f"must be in [0, {self.MAX_LOGPROBS}], got {self.logprobs}")
        _require(self.seed is None or 0 <= self.seed < 2**63, "seed", "must be in [0, 2**63)")
        _require(all(isinstance(s, str) and s for s in self.stop), "stop",
                 "must be non-empty strings")
        _require(all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids), "stop_token_ids",
                 "must be non-negative ints")

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS


def _require(ok: bool, name: str, limit: str) -> None:
    if not ok:
        raise ValueError(f"{name}: {limit}")
