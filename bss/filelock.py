"""One exclusive advisory file lock (``flock``) for every lock in the project.

The kernel releases a ``flock`` when its process ends, however it ends, so a lock left by a
killed process never blocks the next one. Where ``fcntl`` is missing (not POSIX) locking is a
no-op: :func:`acquire` returns an open handle that locks nothing.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - not Linux/macOS
    fcntl = None


def acquire(path: str | Path, timeout: float | None = None):
    """Open ``path`` (made if missing, parents too) and lock it exclusively.

    ``timeout``: None waits as long as it takes, 0 tries once, otherwise seconds to keep trying.
    Returns the open handle (close it to release), or None when the lock was not had in time.
    """
    from bss.data.io import check_folder_path

    path = Path(path)
    check_folder_path(path.parent)  # a file in the way is one error naming it, not a FileExistsError
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+")
    if fcntl is None:
        return handle
    if timeout is None:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        return handle
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            return handle
        except OSError:
            if time.monotonic() >= deadline:
                handle.close()
                return None
            time.sleep(0.05)


@contextlib.contextmanager
def held(path: str | Path, timeout: float | None = None):
    """``with held(path):`` the lock for the block; yields the handle, or None on a timeout."""
    handle = acquire(path, timeout)
    try:
        yield handle
    finally:
        if handle is not None:
            handle.close()
