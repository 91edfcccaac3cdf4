"""``torch.compile`` for static-shape devices, with a count of every graph compiled.

Devices that compile ahead of time (Spyre, TPU/XLA) must never compile while
serving; the count is how a test proves it: every graph that TorchDynamo hands
to the backend (a first compilation or a recompilation) goes through
``CountingBackend`` once.
"""

from __future__ import annotations

import importlib.util

import torch

# Backends that run on the CPU, and the package that registers each device backend.
CPU_BACKENDS = ("inductor", "eager", "aot_eager")
DEVICE_BACKEND_PACKAGES = {"sendnn": "torch_sendnn"}


def require_backend(name: str) -> None:
    """Imports the package that provides a device backend; a clear error if it is missing."""
    if name in CPU_BACKENDS:
        return
    package = DEVICE_BACKEND_PACKAGES.get(name)
    if package is None:
        raise ValueError(f"compile_backend: unknown backend {name!r}; known: "
                         f"{', '.join(CPU_BACKENDS + tuple(DEVICE_BACKEND_PACKAGES))}")
    if importlib.util.find_spec(package) is None:
        raise RuntimeError(f"compile_backend={name!r} needs the {package} package, which is not "
                           f"installed here; use compile_backend='inductor' or 'eager' on the CPU")
    importlib.import_module(package)  # registers the backend with TorchDynamo


class CountingBackend:
    """A TorchDynamo backend that compiles with ``name`` and counts graphs."""

    def __init__(self, name: str):
        require_backend(name)
        self.name = name
        self.num_graphs = 0
        self._backend = torch._dynamo.lookup_backend(name)

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        self.num_graphs += 1
        return self._backend(gm, example_inputs)


def allow_recompiles(num_variants: int) -> None:
    """TorchDynamo stops compiling a function after ``recompile_limit`` variants and
    silently runs it eagerly; static shapes need one variant per shape. The limits are
    per thread: call it in every thread that compiles (``init_thread``)."""
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, num_variants + 8)
    config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, num_variants + 64)
