"""A rank's grammar state with SmolLM2's real tokenizer, no engine: masks allow exactly the
constraint's next tokens, advance with accepted tokens, end on the request's end tokens,
and the two ways of applying a mask agree."""

import numpy as np
import pytest
import torch

from serialization import GuidedSpec
from spmd.structured_outputs import StructuredOutputsParams, guided_spec
from workers import structured
from workers.structured import RankGrammars, apply_bitmask, pack_vocab


@pytest.fixture(scope="module")
def grammars(smollm2_tokenizer):
    return RankGrammars("", len(smollm2_tokenizer), vocab=pack_vocab(smollm2_tokenizer,
                                                                     len(smollm2_tokenizer)))


def _allowed(mask_row: torch.Tensor, vocab: int) -> set[int]:
    bits = ((mask_row.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1).flatten()
    return set(torch.nonzero(bits[:vocab]).flatten().tolist())


def test_a_choice_masks_advances_and_ends_on_the_end_tokens(grammars, smollm2_tokenizer):
    tok, vocab = smollm2_tokenizer, len(smollm2_tokenizer)
    end = [tok.eos_token_id]
    grammars.add(7, guided_spec(StructuredOutputsParams(choice=["yes", "no"]), end))
    mask, rows = grammars.bitmask([3, 7])  # seq 3 is not constrained
    assert mask.shape == (2, -(-vocab // 32)) and (mask[0] == -1).all() and rows == [1]
    first = _allowed(mask[1], vocab)
    yes, no = tok.encode("yes"), tok.encode("no")
    assert {yes[0], no[0]} <= first and tok.eos_token_id not in first
    assert all(tok.decode([t]) in ("y", "ye", "yes", "n", "no") for t in first)
    grammars.accept([3, 7], np.array([5, yes[0]]))
    for t in yes[1:]:
        grammars.accept([7], np.array([t]))
    assert _allowed(grammars.bitmask([7])[0][0], vocab) == set(end)
    grammars.accept([7], np.array(end))  # the grammar ends; a step already scheduled
    assert _allowed(grammars.bitmask([7])[0][0], vocab) == set(end)  # samples an end token
    grammars.drop(7)
    assert grammars.bitmask([7]) is None and len(grammars) == 0


def test_a_bad_spec_fails_the_step_that_needs_its_mask(grammars):
    grammars.add(9, GuidedSpec("regex", "(unclosed", [2]))
    with pytest.raises(RuntimeError, match="Regex"):
        grammars.bitmask([9])
    grammars.drop(9)


def test_compiled_constraints_are_kept_up_to_a_bound(grammars, monkeypatch):
    monkeypatch.setattr(structured, "MAX_CACHED_GRAMMARS", 3)
    for i in range(6):
        grammars.add(100 + i, GuidedSpec("regex", f"a{{{i + 1}}}", [2]))
        grammars.bitmask([100 + i])
    assert len(grammars._compiled) == 3 and len(grammars) == 6  # live ones keep theirs
    for i in range(6):
        grammars.drop(100 + i)


@pytest.mark.parametrize("rows", [None, [0, 2]])
def test_the_portable_mask_path_equals_xgrammar_s(rows):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 100, generator=gen)
    mask = torch.randint(-2**31, 2**31 - 1, (3, 4), dtype=torch.int32, generator=gen)
    fast = logits.clone()
    apply_bitmask(fast, mask, rows)  # float32 on the CPU: xgrammar's kernel
    portable = logits.double()
    apply_bitmask(portable, mask, rows)  # any other dtype or device: tensor ops
    assert torch.equal(torch.isinf(fast), torch.isinf(portable))
    assert torch.equal(fast[~torch.isinf(fast)], portable[~torch.isinf(portable)].float())
    assert 0 < torch.isinf(fast).sum() < fast.numel()
    if rows is not None:  # a row left out keeps every logit
        assert torch.equal(fast[1], logits[1]) and torch.equal(portable[1], logits[1].double())
