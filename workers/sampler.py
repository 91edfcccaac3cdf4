"""Token sampling for one step: penalties, temperature, top-k/top-p/min-p, seeded draws, log-probs.

Semantics follow vLLM. Every random choice is drawn from the request's own
generator, one fixed-size draw per sampled token, so a row's token depends only
on its logits, its options, its history and its generator: identically seeded
ranks agree, and a request samples the same tokens alone or in any batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from serialization.messages import SamplingOptions
from workers.structured import apply_bitmask

_GREEDY_TEMPERATURE = 1e-5  # below this a row is greedy, as in vLLM
_TINY = torch.finfo(torch.float32).tiny


@dataclass
class SamplingRow:
    """One request's row in this step."""

    options: SamplingOptions
    generator: torch.Generator | None  # None only for greedy rows
    prompt_token_ids: np.ndarray  # int32
    output_token_ids: list[int]  # tokens generated so far (for penalties)


@dataclass
class SampleResult:
    """Sampled tokens and, when any row asked, log-probs from the raw logits.

    Log-prob rows of requests that did not ask hold arbitrary values."""

    token_ids: torch.Tensor  # int64 [B]
    sampled_logprobs: torch.Tensor | None  # float32 [B]
    top_ids: torch.Tensor | None  # int64 [B, k], k = max log-probs asked in the batch
    top_logprobs: torch.Tensor | None  # float32 [B, k], descending

    def cpu(self) -> SampleResult:
        """The same result with every tensor on the CPU (one copy each)."""
        def move(t):
            return None if t is None else t.cpu()

        return SampleResult(move(self.token_ids), move(self.sampled_logprobs),
                            move(self.top_ids), move(self.top_logprobs))


def is_greedy(options: SamplingOptions) -> bool:
    return options.temperature < _GREEDY_TEMPERATURE


def uses_penalties(options: SamplingOptions) -> bool:
    return (
        options.repetition_penalty != 1.0
        or options.frequency_penalty != 0.0
        or options.presence_penalty != 0.0
    )


def uses_filters(options: SamplingOptions) -> bool:
    return options.top_k > 0 or options.top_p < 1.0 or options.min_p > 0.0


class Sampler:
    """Samples one token per row of ``logits`` (float32 ``[B, V]``, full vocabulary)."""

    def greedy(self, logits: torch.Tensor,
               bitmask: tuple[torch.Tensor, list[int]] | None = None) -> SampleResult:
        """What ``__call__`` returns when every row is greedy with no penalties and no
        log-probs, without the per-row records."""
        if bitmask is not None:
            apply_bitmask(logits, *bitmask)
        return SampleResult(logits.argmax(dim=-1), None, None, None)

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow],
                 bitmask: tuple[torch.Tensor, list[int]] | None = None) -> SampleResult:
        """``bitmask``: ``(int32 [B, ceil(V / 32)] allowed-token bits, the constrained rows)``
        (structured outputs), applied first; log-probs stay those of the raw logits, as vLLM
        reports them."""
        assert logits.dim() == 2 and logits.shape[0] == len(rows), (logits.shape, len(rows))
        options = [row.options for row in rows]
        greedy = [is_greedy(o) for o in options]
        penalized = [i for i, o in enumerate(options) if uses_penalties(o)]
        max_logprobs = max((o.logprobs for o in options), default=-1)
        raw_logits = logits
        if bitmask is not None:
            logits = logits.clone() if max_logprobs >= 0 else logits
            apply_bitmask(logits, *bitmask)
        if all(greedy) and not penalized and max_logprobs < 0:
            return SampleResult(logits.argmax(dim=-1), None, None, None)

        if penalized:
            logits = apply_penalties(logits, [rows[i] for i in penalized], penalized)
        token_ids = logits.argmax(dim=-1)
        random_rows = [i for i, g in enumerate(greedy) if not g]
        if random_rows:
            index = torch.tensor(random_rows, device=logits.device)
            token_ids[index] = sample_random(logits[index], [rows[i] for i in random_rows])

        if max_logprobs < 0:
            return SampleResult(token_ids, None, None, None)
        logprobs = raw_logits.log_softmax(dim=-1, dtype=torch.float32)
        sampled_logprobs = logprobs.gather(-1, token_ids.unsqueeze(-1)).squeeze(-1)
        top_logprobs, top_ids = logprobs.topk(max_logprobs, dim=-1)
        return SampleResult(token_ids, sampled_logprobs, top_ids, top_logprobs)


def apply_penalties(
    logits: torch.Tensor, rows: list[SamplingRow], row_indices: list[int]
) -> torch.Tensor:
    """Returns a copy of ``logits`` with repetition, frequency and presence penalties
    applied to ``row_indices`` (``rows`` are those rows, in the same order)."""
    device, vocab_size = logits.device, logits.shape[-1]
    index = torch.tensor(row_indices, device=device)
    selected = logits[index]
    output_counts = _token_counts([r.output_token_ids for r in rows], vocab_size, device)
    in_output = output_counts > 0

    repetition = _column([r.options.repetition_penalty for r in rows], device)
    if (repetition != 1.0).any():
        seen = in_output | (_token_counts([r.prompt_token_ids for r in rows], vocab_size, device) > 0)
        penalized = torch.where(selected > 0, selected / repetition, selected * repetition)
        selected = torch.where(seen, penalized, selected)

    frequency = _column([r.options.frequency_penalty for r in rows], device)
    presence = _column([r.options.presence_penalty for r in rows], device)
    selected = selected - frequency * output_counts - presence * in_output
    return logits.index_copy(0, index, selected)


def sample_random(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Draws one token per row from softmax(logits / temperature) after top-k, top-p and
    min-p, with an exponential race on each row's own generator (one draw of ``V``)."""
    device = logits.device
    logits = logits / _column([r.options.temperature for r in rows], device)
    if any(uses_filters(r.options) for r in rows):
        logits = apply_top_k_top_p_min_p(
            logits,
            torch.tensor([r.options.top_k for r in rows], device=device),
            torch.tensor([r.options.top_p for r in rows], device=device),
            torch.tensor([r.options.min_p for r in rows], device=device),
        )
    probs = logits.softmax(dim=-1)
    # argmax(p / E) with E ~ Exponential(1) picks token i with probability p_i.
    race = torch.stack([_exponential(logits.shape[-1], r.generator) for r in rows])
    return probs.div_(race.to(device).clamp_(min=_TINY)).argmax(dim=-1)


def apply_top_k_top_p_min_p(
    logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor
) -> torch.Tensor:
    """Returns ``logits`` with dropped tokens set to -inf, in the order top-k (0: off),
    top-p (1.0: off), min-p (0.0: off). The most likely token is always kept."""
    vocab_size = logits.shape[-1]
    # A stable sort makes top_k=1 keep exactly torch.argmax's choice on ties.
    sorted_logits, sorted_ids = logits.sort(dim=-1, descending=True, stable=True)
    position = torch.arange(vocab_size, device=logits.device)
    k = torch.where(top_k > 0, top_k, vocab_size).unsqueeze(-1)
    drop = position >= k
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    # Keep the smallest prefix reaching top_p; rows with top_p = 1 are exempt because
    # the rounded cumulative sum can reach 1.0 before the tail.
    mass_before = probs.cumsum(dim=-1) - probs
    drop |= (mass_before >= top_p.unsqueeze(-1)) & (top_p < 1.0).unsqueeze(-1)
    # p_i / p_max does not change under renormalization, so min-p may use these probs.
    drop |= probs < min_p.unsqueeze(-1) * probs[:, :1]
    drop[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, sorted_ids, sorted_logits)


def _exponential(size: int, generator: torch.Generator | None) -> torch.Tensor:
    assert generator is not None, "a random row needs a generator"
    return torch.empty(size, device=generator.device).exponential_(generator=generator)


def _column(values: list[float], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device).unsqueeze(-1)


def _token_counts(token_ids: list, vocab_size: int, device: torch.device) -> torch.Tensor:
    """``[len(token_ids), vocab_size]`` occurrence counts, one row per token list."""
    lengths = [len(ids) for ids in token_ids]
    flat = np.concatenate([np.asarray(ids, dtype=np.int64) for ids in token_ids])
    assert flat.size == 0 or (flat.min() >= 0 and flat.max() < vocab_size), "token id out of vocabulary"
    rows = np.repeat(np.arange(len(token_ids), dtype=np.int64), lengths)
    keys = torch.from_numpy(rows * vocab_size + flat).to(device)
    counts = torch.bincount(keys, minlength=len(token_ids) * vocab_size)
    return counts.view(len(token_ids), vocab_size).to(torch.float32)
