"""Sampler semantics: greedy, penalties, filters, seeded draws, batch invariance, log-probs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from serialization.messages import SamplingOptions
from workers.sampler import (
    SamplingRow,
    Sampler,
    apply_penalties,
    apply_top_k_top_p_min_p,
)

VOCAB = 64


def make_row(seed: int = 0, prompt=(1, 2, 3), output=(), **options) -> SamplingRow:
    opts = SamplingOptions(seed=seed, **options)
    return SamplingRow(
        options=opts,
        generator=torch.Generator().manual_seed(seed),
        prompt_token_ids=np.asarray(prompt, dtype=np.int32),
        output_token_ids=list(output),
    )


def random_logits(batch: int, vocab: int = VOCAB, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_equals_argmax_and_consumes_no_randomness():
    logits = random_logits(8)
    rows = [make_row(seed=i, temperature=0.0) for i in range(8)]
    states = [r.generator.get_state() for r in rows]
    result = Sampler()(logits, rows)
    assert torch.equal(result.token_ids, logits.argmax(dim=-1))
    assert result.token_ids.dtype == torch.int64
    assert result.sampled_logprobs is None and result.top_ids is None and result.top_logprobs is None
    assert all(torch.equal(s, r.generator.get_state()) for s, r in zip(states, rows))
    # Greedy rows on the slow path (logprobs asked) draw nothing either.
    rows = [make_row(seed=i, temperature=0.0, logprobs=2) for i in range(8)]
    states = [r.generator.get_state() for r in rows]
    assert torch.equal(Sampler()(logits, rows).token_ids, logits.argmax(dim=-1))
    assert all(torch.equal(s, r.generator.get_state()) for s, r in zip(states, rows))


def test_greedy_row_may_have_no_generator():
    row = make_row(temperature=0.0, logprobs=0)
    row.generator = None
    logits = random_logits(1)
    assert Sampler()(logits, [row]).token_ids.item() == logits.argmax().item()


def test_greedy_ties_pick_lowest_index():
    logits = torch.tensor([[0.0, 5.0, 5.0, 1.0]])
    assert Sampler()(logits, [make_row(temperature=0.0)]).token_ids.item() == 1


def test_empty_batch():
    result = Sampler()(torch.empty(0, VOCAB), [])
    assert result.token_ids.shape == (0,)


LOGITS = [2.0, -1.0, 0.5, 1.0, -2.0]
PROMPT = [0, 4]
OUTPUT = [1, 2, 2]


def _penalized(**options) -> list[float]:
    row = make_row(prompt=PROMPT, output=OUTPUT, temperature=0.0, **options)
    logits = torch.tensor([LOGITS, LOGITS])
    out = apply_penalties(logits, [row], [1])
    assert out[0].tolist() == LOGITS, "rows without penalties are untouched"
    assert logits[1].tolist() == LOGITS, "the input is not modified"
    return out[1].tolist()


def test_repetition_penalty_over_prompt_and_output():
    # Seen: 0, 4 (prompt), 1, 2 (output). Positive logits divided, negative multiplied.
    assert _penalized(repetition_penalty=2.0) == pytest.approx([1.0, -2.0, 0.25, 1.0, -4.0])


def test_frequency_penalty_counts_output_only():
    assert _penalized(frequency_penalty=0.5) == pytest.approx([2.0, -1.5, -0.5, 1.0, -2.0])


def test_presence_penalty_output_only():
    assert _penalized(presence_penalty=0.3) == pytest.approx([2.0, -1.3, 0.2, 1.0, -2.0])


def test_penalties_combine():
    got = _penalized(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.3)
    assert got == pytest.approx([1.0, -2.0 - 0.5 - 0.3, 0.25 - 1.0 - 0.3, 1.0, -4.0])


def test_penalty_changes_greedy_choice():
    logits = torch.tensor([[3.0, 2.9, 0.0]])
    plain = make_row(prompt=[2], output=[0, 0], temperature=0.0)
    penalized = make_row(prompt=[2], output=[0, 0], temperature=0.0, frequency_penalty=0.1)
    assert Sampler()(logits, [plain]).token_ids.item() == 0
    assert Sampler()(logits, [penalized]).token_ids.item() == 1


@pytest.mark.parametrize("temperature", [0.3, 1.0, 5.0, 100.0])
def test_top_k_one_equals_greedy(temperature):
    logits = random_logits(16, seed=1)
    rows = [make_row(seed=i, temperature=temperature, top_k=1) for i in range(16)]
    assert torch.equal(Sampler()(logits, rows).token_ids, logits.argmax(dim=-1))


def test_top_k_one_on_ties_matches_argmax():
    logits = torch.tensor([[0.0, 5.0, 5.0, 1.0]] * 8)
    rows = [make_row(seed=i, temperature=1.0, top_k=1) for i in range(8)]
    assert Sampler()(logits, rows).token_ids.tolist() == [1] * 8


def test_tiny_top_p_keeps_only_argmax():
    logits = random_logits(16, seed=2)
    rows = [make_row(seed=i, temperature=2.0, top_p=1e-6) for i in range(16)]
    assert torch.equal(Sampler()(logits, rows).token_ids, logits.argmax(dim=-1))


def test_top_p_keeps_smallest_prefix_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    filtered = apply_top_k_top_p_min_p(
        probs.log(), torch.tensor([0]), torch.tensor([0.7]), torch.tensor([0.0])
    )
    assert torch.isfinite(filtered).tolist() == [[True, True, False, False]]


def test_min_p_masks():
    probs = torch.tensor([[0.05, 0.5, 0.3, 0.15]])
    filtered = apply_top_k_top_p_min_p(
        probs.log(), torch.tensor([0]), torch.tensor([1.0]), torch.tensor([0.5])
    )
    # Threshold 0.5 * 0.5 = 0.25: keeps 0.5 and 0.3.
    assert torch.isfinite(filtered).tolist() == [[False, True, True, False]]
    kept = filtered[0, 1:3]
    assert torch.equal(kept, probs.log()[0, 1:3]), "kept logits are unchanged"
    rows = [make_row(seed=s, temperature=1.0, min_p=0.5) for s in range(50)]
    tokens = Sampler()(probs.log().expand(50, -1), rows).token_ids
    assert set(tokens.tolist()) == {1, 2}


def test_filters_off_leave_logits_unchanged():
    logits = random_logits(4)
    off = apply_top_k_top_p_min_p(logits, torch.zeros(4, dtype=torch.long), torch.ones(4), torch.zeros(4))
    assert torch.equal(off, logits)


def _generate(row: SamplingRow, steps: int = 20) -> list[int]:
    sampler = Sampler()
    tokens = []
    for step in range(steps):
        logits = random_logits(1, vocab=1000, seed=step) * 0.1  # near-flat: draws matter
        token = sampler(logits, [row]).token_ids.item()
        row.output_token_ids.append(token)
        tokens.append(token)
    return tokens


def test_seeded_reproducibility():
    options = dict(temperature=0.8, top_p=0.95, repetition_penalty=1.1)
    first = _generate(make_row(seed=7, **options))
    again = _generate(make_row(seed=7, **options))
    other = _generate(make_row(seed=8, **options))
    assert first == again
    assert first != other


def _mixed_rows(seed: int) -> list[SamplingRow]:
    """A batch covering every path: greedy, random, filters, penalties, log-probs."""
    kinds = [
        dict(temperature=0.0),
        dict(temperature=1.0),
        dict(temperature=0.7, top_k=5),
        dict(temperature=1.3, top_p=0.8),
        dict(temperature=1.0, min_p=0.1),
        dict(temperature=0.0, repetition_penalty=1.5),
        dict(temperature=0.9, frequency_penalty=0.5, presence_penalty=0.2),
        dict(temperature=1.0, logprobs=3),
        dict(temperature=0.0, logprobs=0),
        dict(temperature=2.0, top_k=10, top_p=0.9, min_p=0.05, repetition_penalty=1.2),
    ]
    rng = np.random.default_rng(seed)
    return [
        make_row(
            seed=seed * 100 + i,
            prompt=rng.integers(0, VOCAB, 6),
            output=rng.integers(0, VOCAB, 4).tolist(),
            **kinds[i % len(kinds)],
        )
        for i in range(17)
    ]


def test_batch_invariance():
    batch = _mixed_rows(seed=3)
    alone = _mixed_rows(seed=3)
    sampler = Sampler()
    for step in range(5):
        logits = random_logits(len(batch), seed=100 + step)
        batched = sampler(logits, batch).token_ids
        for i, row in enumerate(alone):
            single = sampler(logits[i : i + 1].clone(), [row]).token_ids
            assert single.item() == batched[i].item(), f"row {i} step {step}"
            row.output_token_ids.append(single.item())
            batch[i].output_token_ids.append(single.item())


def test_batch_order_does_not_matter():
    rows = _mixed_rows(seed=4)
    reversed_rows = _mixed_rows(seed=4)[::-1]
    logits = random_logits(len(rows), seed=5)
    forward = Sampler()(logits, rows).token_ids
    backward = Sampler()(logits.flip(0), reversed_rows).token_ids
    assert torch.equal(forward, backward.flip(0))


def test_distribution_matches_softmax():
    logits = torch.tensor([[0.0, 1.0, 2.0, 0.5]])
    expected = logits.softmax(dim=-1)[0].numpy() * 4000
    row = make_row(seed=11, temperature=1.0)
    sampler = Sampler()
    counts = np.bincount([sampler(logits, [row]).token_ids.item() for _ in range(4000)], minlength=4)
    chi_square = float(((counts - expected) ** 2 / expected).sum())
    assert chi_square < 16.27, (counts, expected)  # 3 degrees of freedom, p = 0.001


def test_distribution_respects_temperature():
    logits = torch.tensor([[0.0, 1.0]]).expand(4000, -1)
    rows = [make_row(seed=s, temperature=0.5) for s in range(4000)]
    share = Sampler()(logits, rows).token_ids.float().mean().item()
    assert share == pytest.approx(torch.tensor([0.0, 2.0]).softmax(0)[1].item(), abs=0.03)


def test_logprobs_from_raw_logits():
    logits = random_logits(4, seed=6)
    rows = [
        make_row(seed=0, temperature=0.7, logprobs=5, repetition_penalty=1.3, output=[3, 4]),
        make_row(seed=1, temperature=0.0, logprobs=0, presence_penalty=1.0, output=[7]),
        make_row(seed=2, temperature=1.5, top_k=3),
        make_row(seed=3, temperature=0.0, logprobs=2),
    ]
    result = Sampler()(logits, rows)
    expected = logits.log_softmax(dim=-1)
    assert result.top_ids.shape == (4, 5) and result.top_ids.dtype == torch.int64
    assert result.top_logprobs.dtype == torch.float32
    torch.testing.assert_close(result.sampled_logprobs, expected.gather(-1, result.token_ids[:, None])[:, 0])
    torch.testing.assert_close(result.top_logprobs, expected.gather(-1, result.top_ids))
    assert (result.top_logprobs[:, :-1] >= result.top_logprobs[:, 1:]).all()
    assert torch.equal(result.top_ids[:, 0], logits.argmax(dim=-1))


def test_logprobs_zero_returns_sampled_only():
    result = Sampler()(random_logits(2), [make_row(temperature=0.0, logprobs=0), make_row()])
    assert result.sampled_logprobs.shape == (2,)
    assert result.top_ids.shape == (2, 0) and result.top_logprobs.shape == (2, 0)


def test_no_logprobs_when_none_asked():
    result = Sampler()(random_logits(2), [make_row(temperature=1.0, top_p=0.5), make_row(temperature=0.0)])
    assert result.sampled_logprobs is None and result.top_ids is None and result.top_logprobs is None


def test_input_logits_not_modified():
    logits = random_logits(len(_mixed_rows(seed=9)), seed=9)
    before = logits.clone()
    Sampler()(logits, _mixed_rows(seed=9))
    assert torch.equal(logits, before)


@settings(max_examples=200, deadline=None)
@given(
    logits=st.lists(st.floats(-20, 20, width=32), min_size=2, max_size=24),
    temperature=st.floats(0.05, 5.0),
    top_k=st.integers(0, 30),
    top_p=st.floats(0.01, 1.0),
    min_p=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**32 - 1),
)
def test_sampled_token_survives_filters(logits, temperature, top_k, top_p, min_p, seed):
    row = make_row(seed=seed, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    raw = torch.tensor([logits])
    token = Sampler()(raw, [row]).token_ids.item()

    scaled = raw[0] / temperature
    filtered = apply_top_k_top_p_min_p(
        scaled[None], torch.tensor([top_k]), torch.tensor([top_p]), torch.tensor([min_p])
    )[0]
    assert filtered.softmax(dim=-1)[token] > 0
    # Independent checks of each rule, loose only where float rounding decides.
    assert top_k == 0 or int((scaled > scaled[token]).sum()) < top_k
    top = scaled.topk(top_k).values[-1] if 0 < top_k < len(logits) else -math.inf
    probs = scaled.masked_fill(scaled < top, -math.inf).softmax(dim=-1)
    assert float(probs[probs > probs[token]].sum()) < top_p + 1e-5
    assert float(probs[token]) >= min_p * float(probs.max()) * (1 - 1e-5)
