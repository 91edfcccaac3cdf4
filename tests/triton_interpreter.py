"""Runs a test module's Triton checks in one child process under ``TRITON_INTERPRET=1``.

The interpreter is chosen when ``@triton.jit`` decorates a function (triton's own
``tl.sum`` & co. included), so it must be set before anything in the process imports
triton — torch may already have in the test process. The child imports the test module
by path and runs the checks it is sent, one JSON line each way.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_SERVER = textwrap.dedent("""
    import importlib.util, json, sys, traceback
    import triton.runtime.interpreter as interpreter

    def _patch_lang_tensor(tensor, scope, _patch=interpreter._patch_lang_tensor):
        _patch(tensor, scope)
        # Scalars are 1-element arrays in the interpreter, and numpy >= 2.4 refuses int() of
        # those, which breaks loops with tensor bounds (range(start, seq_len, BLOCK)).
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    interpreter._patch_lang_tensor = _patch_lang_tensor
    spec = importlib.util.spec_from_file_location("_triton_interpreter_checks", sys.argv[1])
    checks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(checks)
    for line in sys.stdin:
        name, args = json.loads(line)
        try:
            getattr(checks, name)(*args)
            reply = "ok"
        except BaseException:
            reply = traceback.format_exc()
        print(json.dumps(reply), flush=True)
""")


class Interpreter:
    def __init__(self, checks_file: str):
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        self.proc = subprocess.Popen([sys.executable, "-c", _SERVER, checks_file], cwd=_ROOT,
                                     env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)

    def run(self, check: str, *args):
        self.proc.stdin.write(json.dumps([check, args]) + "\n")
        self.proc.stdin.flush()
        reply = self.proc.stdout.readline()
        assert reply, "the interpreter process died"
        reply = json.loads(reply)
        assert reply == "ok", reply

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def interpreter_fixture(checks_file: str):
    """A module-scoped ``interpreter`` fixture running ``checks_file``'s functions."""

    @pytest.fixture(scope="module")
    def interpreter():
        server = Interpreter(checks_file)
        yield server
        server.close()

    return interpreter
