"""A wait for rank 0's steps that sleeps in the kernel instead of spinning.

A compiled graph's ``ray.get`` spins on its shared-memory channel while it waits. When
the engine shares the ranks' cores that spin costs them a core: on a 2-core host a
scratch prefill ran 2.6x slower beside it (7.0 s against 2.7 s), and results came back
~1.1 s late at the end of 2,048-token steps the engine spun through. So rank 0 writes a
byte into a named pipe after each call it finishes, and the engine blocks in ``select``
on the pipe's other end until the byte of the step it waits for is there; the channel
read that follows finds the output already written. The pipe works where rank 0 and the
engine share a node (a FIFO is a node-local file); elsewhere the spin costs the ranks
nothing and the transport keeps it.
"""

from __future__ import annotations

import os
import select
import tempfile
import time
import uuid
from typing import Callable


def pipe_dir() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


class DonePipe:
    """The engine's (read) end. ``open_writer(path)`` runs on rank 0 and must open the
    write end before this returns; the name is unlinked at once after (nothing to leak)."""

    def __init__(self, open_writer: Callable[[str], None]):
        path = os.path.join(pipe_dir(), f"spmd-done-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        os.mkfifo(path, 0o600)
        try:
            # Non-blocking: opening a FIFO's read end would otherwise wait for a writer.
            self._fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
            try:
                open_writer(path)
            except BaseException:
                os.close(self._fd)
                raise
        finally:
            os.unlink(path)
        self._seen = 0  # bytes read: calls rank 0 finished
        self._taken = 0  # calls waited for

    def wait(self, timeout_s: float, failed: Callable[[], bool]) -> None:
        """Returns once rank 0 has finished the next call not yet waited for, or when
        ``timeout_s`` passes, rank 0's process is gone (end of file) or ``failed()``
        (asked once a second) says a rank's loop ended: the channel read that follows
        then raises the failure."""
        deadline = time.monotonic() + timeout_s
        self._taken += 1
        while self._seen < self._taken and self._fd is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            ready, _, _ = select.select([self._fd], [], [], min(left, 1.0))
            if not ready:
                if failed():
                    return
                continue
            try:
                data = os.read(self._fd, 4096)
            except BlockingIOError:
                continue
            if not data:  # every writer closed: rank 0 is gone
                self.close()
                return
            self._seen += len(data)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class DoneWriter:
    """Rank 0's (write) end: one byte per finished call."""

    def __init__(self, path: str):
        self._fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)

    def done(self) -> None:
        try:
            os.write(self._fd, b"\x01")
        except (BlockingIOError, BrokenPipeError):
            # A full pipe (64 KiB of unread bytes) still wakes the reader; a broken one
            # means the engine is gone and nobody waits.
            pass
