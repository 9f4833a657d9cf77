"""Inter-process locks on files (POSIX ``flock``).

A lock taken with :func:`exclusive_lock` is held by an open file description, so the kernel drops it the moment
its holder exits or is killed: there is no stale lock to clean up after a crash, and a waiting process goes on as
soon as the holder is gone. The lock file records the holder (``host pid=N since=...``) so that a waiting process
can say whom it waits for. The lock file itself is never deleted (deleting it while another process waits on it
would let two processes hold "the" lock at once).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time
from pathlib import Path
from typing import Callable, Iterator, Optional


def lock_owner(path: Path) -> str:
    """The holder line written into a lock file ('' when unreadable)."""
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""


@contextlib.contextmanager
def exclusive_lock(path: Path, on_wait: Optional[Callable[[str], None]] = None) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if missing) for the ``with`` block; blocks until it is free.

    Args:
        path: the lock file.
        on_wait: called once with the current holder's description when the lock is busy (e.g. to log it).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait(lock_owner(path) or "another process")
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{socket.gethostname()} pid={os.getpid()} since={time.strftime('%Y-%m-%dT%H:%M:%S')}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock
