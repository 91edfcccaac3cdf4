"""The rank's count of steps whose logits held a NaN or an infinity (``nonfinite_steps``)."""

import pytest
import torch

from workers.worker import any_nonfinite


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf"), None])
def test_any_nonfinite_agrees_with_isfinite_wherever_the_bad_value_sits(dtype, bad):
    gen = torch.Generator().manual_seed(0)
    for row, col in [(0, 0), (3, 1234), (6, 4999)]:
        logits = (torch.randn(7, 5000, generator=gen) * 30).to(dtype)
        if bad is not None:
            logits[row, col] = bad
        got = any_nonfinite(logits)
        assert got.dtype == torch.bool and got.dim() == 0
        assert bool(got) == (not bool(torch.isfinite(logits).all())) == (bad is not None)
