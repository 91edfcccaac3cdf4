"""What transformers converts out of a GGUF file (its config, its tokenizer), kept on disk.

transformers reads a GGUF's config or tokenizer by parsing the whole file's metadata with
``gguf.GGUFReader``, which builds a numpy view per token and merge: 4-9 s for SmolLM2's
file on a 2-core host, paid by every process that needs it (the frontend twice, each rank
once) at every start. The converted result is small (a ``config.json``, a tokenizer
folder), so it is saved once and read back in milliseconds.

The cache lives in ``$SPMD_CACHE_DIR/gguf`` (default ``~/.cache/spmd/gguf``;
``SPMD_CACHE_DIR=off`` turns it off), one folder per GGUF file keyed by its real path,
size, modification time and the transformers version. Each entry is written into a
private temporary folder and renamed into place, so processes converting the same file at
once never see half an entry; a cache that cannot be written is skipped, never an error.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from typing import Callable, TypeVar

T = TypeVar("T")
FORMAT = 1  # bump when what an entry holds changes


def cache_root() -> str | None:
    """The GGUF cache's folder, or None when ``SPMD_CACHE_DIR=off``."""
    base = os.environ.get("SPMD_CACHE_DIR", "").strip()
    if base.lower() in ("off", "0", "none"):
        return None
    return os.path.join(base or os.path.join(os.path.expanduser("~"), ".cache", "spmd"), "gguf")


def entry_dir(gguf_path: str, kind: str) -> str | None:
    """The folder for ``kind`` ("config", "tokenizer") of this exact file, or None."""
    import transformers

    root = cache_root()
    if root is None:
        return None
    real = os.path.realpath(gguf_path)
    st = os.stat(real)
    key = hashlib.sha256(f"{real}\0{st.st_size}\0{st.st_mtime_ns}\0{transformers.__version__}"
                         f"\0{FORMAT}".encode()).hexdigest()[:24]
    return os.path.join(root, f"{os.path.basename(real)}-{key}", kind)


def cached(gguf_path: str, kind: str, convert: Callable[[], T], save: Callable[[T, str], None],
           load: Callable[[str], T]) -> T:
    """``load(entry)`` if this file's ``kind`` entry exists; else ``convert()``, saved with
    ``save(value, folder)`` for next time (best effort), and returned."""
    entry = entry_dir(gguf_path, kind)
    if entry is not None and os.path.isdir(entry):
        try:
            return load(entry)
        except (OSError, ValueError):  # a damaged entry: convert again and replace it
            shutil.rmtree(entry, ignore_errors=True)
    value = convert()
    if entry is not None:
        _store(entry, lambda folder: save(value, folder))
    return value


def _store(entry: str, write: Callable[[str], None]) -> None:
    parent = os.path.dirname(entry)
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
    except OSError:
        return
    try:
        write(tmp)
        os.rename(tmp, entry)  # atomic; fails if another process got there first
    except OSError:
        pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
