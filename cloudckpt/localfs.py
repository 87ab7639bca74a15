"""Local files published whole: a file written under a temporary name is given the mode a plain ``open`` would
have given it (mkstemp makes 0600; Keras' own ModelCheckpoint files follow the umask, 0644 usually), flushed to disk,
renamed over its final name, and the rename itself flushed (the folder's fsync), so after a crash or power loss the
name holds either the old file or the whole new one.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

_umask_lock = threading.Lock()


def umask() -> int:
    """The process's umask, read without changing it where Linux says it (``/proc/self/status``)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    with _umask_lock:  # elsewhere: set and restore (process-wide, so under a lock and for the shortest time)
        old = os.umask(0o022)
        os.umask(old)
        return old


def fsync_dir(path: str | Path) -> None:
    """Flush a folder's entries (a rename into it) to disk; a no-op where folders can't be opened (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(tmp: str | Path, path: str | Path, *, durable: bool = True) -> None:
    """Rename the finished temporary file ``tmp`` over ``path`` (same file system), with the umask's mode; with
    ``durable`` the file's bytes are flushed before the rename and the folder's entry after it."""
    os.chmod(tmp, 0o666 & ~umask())
    if durable:
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    os.replace(tmp, path)
    if durable:
        fsync_dir(os.path.dirname(os.path.abspath(path)))
