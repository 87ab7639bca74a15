"""Interrupting transfers promptly: Ctrl-C (SIGINT) or SIGTERM stops every transfer in flight within about a second,
and what the interrupted operation kept is said in one line.

A batch of transfers (:func:`cloudckpt.transfer._run_all`) runs each one under a :class:`Token` of its own (a
``contextvars`` value the pool's thread sees). When the thread waiting for the batch is interrupted
(``KeyboardInterrupt``, which the CLI's SIGTERM handler raises too), the token is set, transfers not started are
cancelled, and each one in flight stops at its next block: every backend reports bytes block by block (256 KiB to
8 MiB) through the progress callback, which calls :func:`check` and raises :class:`TransferCancelled`. A read stuck
in the network for longer than :data:`GRACE` is abandoned (its thread is left to the client's read timeout; the CLI
exits without waiting for it).

What an interrupted operation leaves is recorded with :func:`keep` (``restore`` keeps a partial pull that the next
pull resumes; ``push`` leaves its objects for ``gc``) and printed by the CLI as one line.
"""

from __future__ import annotations

import contextvars
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

from .errors import CloudCkptError

#: seconds an interrupted batch waits for its transfers in flight to stop at their next block
GRACE = 1.0
EXIT_SIGINT = 130  # 128 + SIGINT, what a shell reports for a process Ctrl-C stopped
EXIT_SIGTERM = 143  # 128 + SIGTERM


class TransferCancelled(CloudCkptError):
    """A transfer stopped because the operation it belongs to was interrupted (Ctrl-C, SIGTERM)."""

    exit_code = EXIT_SIGINT


class Terminated(KeyboardInterrupt):
    """Raised in the main thread by the CLI's SIGTERM handler: an interruption like Ctrl-C, that exits 143."""


class Token:
    """Set once the batch of transfers it belongs to is interrupted."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()


log = logging.getLogger(__name__)
_TOKEN: contextvars.ContextVar[Token | None] = contextvars.ContextVar("cloudckpt_cancel_token", default=None)
_kept: list[str] = []
_kept_lock = threading.Lock()
_printed_by_cli = False  # set by the CLI, which prints what was kept in its one line; a library logs it


def bind(token: Token) -> contextvars.Context:
    """A copy of the current context in which :func:`check` looks at ``token`` (run a pool's task in it)."""
    ctx = contextvars.copy_context()
    ctx.run(_TOKEN.set, token)
    return ctx


def check() -> None:
    """Raise TransferCancelled when the transfer running in this context was interrupted."""
    token = _TOKEN.get()
    if token is not None and token.cancelled:
        raise TransferCancelled("transfer cancelled: the operation was interrupted")


def keep(line: str) -> None:
    """Record what an interrupted operation kept (printed by the CLI, logged by the library)."""
    with _kept_lock:
        _kept.append(line)
    if not _printed_by_cli:
        log.warning("%s", line)


def kept() -> list[str]:
    """The lines recorded by :func:`keep` so far, and forget them."""
    with _kept_lock:
        lines, _kept[:] = list(_kept), []
    return lines


def exit_code(exc: BaseException) -> int:
    """130 for Ctrl-C, 143 for SIGTERM (:class:`Terminated`, also when click wrapped it in its Abort)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, Terminated):
            return EXIT_SIGTERM
        seen = seen.__cause__ or seen.__context__
    return EXIT_SIGINT


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise Terminated()


@contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """Within the block (main thread only), SIGTERM raises :class:`Terminated` in the main thread like Ctrl-C
    raises KeyboardInterrupt; the previous handler is restored after."""
    global _printed_by_cli
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    _printed_by_cli = True
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        _printed_by_cli = False


@contextmanager
def default_sigterm_stops_transfers() -> Iterator[None]:
    """Around a library pull or push in the main thread of a process that leaves SIGTERM at its default (die at
    once, e.g. a training script restoring before its preemption handler is installed): SIGTERM stops the transfers
    like Ctrl-C, what they kept is logged (:func:`keep`), then the process dies of SIGTERM as it would have. A
    handler someone installed (the CLI's, Lightning's, a :class:`~cloudckpt.preemption.PreemptionWatch`) is left
    alone."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL):
        yield
        return
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    except Terminated:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGTERM)
        raise
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def exit_now_if_stuck(code: int) -> None:
    """After an interruption: if a transfer thread is still stuck in a read (abandoned after :data:`GRACE`), end the
    process now with ``code`` instead of waiting for the client's read timeout at interpreter exit."""
    stuck = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon and t.is_alive()]
    if stuck:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
