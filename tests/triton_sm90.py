"""Compiles Triton kernels for a Hopper GPU (sm_90) without one: Triton ships ptxas, so a
test can check that every kernel lowers to a cubin within sm_90's shared memory.

``compile_for_sm90(body)`` runs ``body`` in a child process (without ``TRITON_INTERPRET``)
after a prelude that defines ``build(kernel, dtype, constexprs, num_warps=4, num_stages=3,
ptrs=None, floats=())``: pointer arguments are ``*dtype`` unless ``ptrs`` names their type,
scalars are ``i32`` unless named in ``floats``; pointers and strides are specialised as
16-divisible, as the launchers see them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_PRELUDE = textwrap.dedent("""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    SMEM_LIMIT = 232448  # bytes of shared memory per block on sm_90

    def build(kernel, dtype, constexprs, num_warps=4, num_stages=3, ptrs=None, floats=()):
        sig, attrs = {}, {}
        for i, name in enumerate(kernel.arg_names):
            if name in constexprs:
                sig[name] = "constexpr"
            elif name.endswith("_ptr"):
                sig[name] = "*" + (ptrs or {}).get(name, dtype)
            else:
                sig[name] = "fp32" if name in floats else "i32"
            if name.endswith("_ptr") or "stride" in name:
                attrs[(i,)] = [["tt.divisibility", 16]]
        compiled = triton.compile(ASTSource(kernel, sig, constexprs, attrs),
                                  target=GPUTarget("cuda", 90, 32),
                                  options={"num_warps": num_warps, "num_stages": num_stages})
        assert compiled.metadata.shared <= SMEM_LIMIT, (kernel, constexprs,
                                                        compiled.metadata.shared)
""")


def compile_for_sm90(body: str) -> None:
    """Runs the prelude and ``body`` (dedented) in a child process; fails with its stderr."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = _PRELUDE + textwrap.dedent(body)
    result = subprocess.run([sys.executable, "-c", script], cwd=_ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
