"""The exit drain: whatever ends the process, the saves already made get a bounded wait to commit, and one line says
how that went.

The background writer and uploader are daemon threads (an upload that hangs must never keep a process alive), and
neither Keras (``fit`` skips ``on_train_end`` when it ends by an exception) nor a script that dies on an exception,
``KeyboardInterrupt`` or ``sys.exit`` waits for them. So each open writer of checkpoints (a Keras callback's ``fit``,
a :class:`~cloudckpt.torch.CheckpointManager`, the HF callback) registers here while it is open; at interpreter exit
(when the main thread ends, before ``atexit`` handlers and while the daemon threads and transfer pools still run)
every one still registered runs its ``drain_at_exit()``: wait, up to its
deadline, for what is queued, then log one line naming what committed, or which saves did not. A normal end (or
``close()``) unregisters first, so nothing runs twice. ``os._exit`` (the preemption path that already waited) and
SIGKILL skip it, as they skip everything.

Example:
    >>> class Job:
    ...     def drain_at_exit(self):
    ...         print("drained")
    >>> job = Job()
    >>> register(job)
    >>> unregister(job)
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
from collections.abc import Callable
from typing import Protocol

from .uploader import Uploader

log = logging.getLogger(__name__)


class Drainable(Protocol):
    def drain_at_exit(self) -> None: ...


_open: dict[int, Drainable] = {}  # held strongly: a manager the script dropped still drains
_lock = threading.Lock()
_installed = False


def register(owner: Drainable) -> None:
    """Drain ``owner`` at interpreter exit unless :func:`unregister` is called first."""
    global _installed
    with _lock:
        _open[id(owner)] = owner
        if not _installed:
            _install()
            _installed = True


def _install() -> None:
    # threading's exit hooks run when the main thread ends, before atexit's and in reverse order of registration:
    # registered now (after concurrent.futures registered its own at import), this runs while the transfer pools
    # still take work — from atexit, every upload would fail with "cannot schedule new futures after shutdown"
    hook = getattr(threading, "_register_atexit", None)
    if hook is not None:
        hook(_drain_all)
    else:  # pragma: no cover - Python without it
        atexit.register(_drain_all)


def unregister(owner: Drainable) -> None:
    with _lock:
        _open.pop(id(owner), None)


def _drain_all() -> None:
    with _lock:
        owners = list(_open.values())
        _open.clear()
    for owner in owners:
        try:
            owner.drain_at_exit()
        except BaseException as exc:  # a second Ctrl-C during the wait: give up on this one, say so
            log.error("cloudckpt: stopped waiting for the checkpoints to commit (%s: %s)", type(exc).__name__, exc)


def settle(uploader: Uploader, *, deadline: float, why: str, before: Callable[[float], list[str]] | None = None,
           ) -> bool:
    """Wait up to ``deadline`` seconds for what ``uploader`` holds to commit and log the outcome in one line (plus
    one line first when there is something to wait for). ``before(seconds)`` runs first within the same deadline
    (the Keras writer's flush) and returns the labels of saves it could not finish. Returns whether everything
    saved is committed."""
    t0 = time.monotonic()
    pending = uploader.uncommitted()
    if pending or before is not None:
        log.warning("cloudckpt: %s: waiting up to %gs for the checkpoints saved so far to commit to %s", why,
                    deadline, uploader.store.url)
    unwritten = before(deadline) if before is not None else []
    uploader.flush(max(0.0, deadline - (time.monotonic() - t0)))
    left = [f"{name} (not written)" for name in unwritten] + [str(f) if f.error else f"{f.label} (still uploading)"
                                                              for f in uploader.uncommitted()]
    if left:
        log.error("cloudckpt: NOT committed to %s after %.1fs: %s", uploader.store.url, time.monotonic() - t0,
                  "; ".join(left))
        return False
    last = uploader.committed[-1].id if uploader.committed else None
    log.warning("cloudckpt: every checkpoint saved is committed to %s (latest %s, %.1fs)", uploader.store.url, last,
                time.monotonic() - t0)
    return True
