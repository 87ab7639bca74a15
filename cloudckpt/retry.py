"""Which failures are worth retrying, and one tenacity policy per logical operation with a wall-clock budget.

The cloud clients already retry single HTTP requests (botocore: 3 attempts in "standard" mode, gcsfs: 6,
google-cloud-storage: a 120 s deadline), so ours is coarse: whole operations (upload and verify one file, one index
compare-and-swap), a few attempts at most within ``budget`` seconds.

Backends translate their clients' errors at their boundary (:meth:`~cloudckpt.backends.base.Backend.translate`), so
what reaches this module is typed: a cloudckpt error (:class:`~cloudckpt.errors.StoreError` says whether it is
transient) or a built-in one. :func:`run` turns what is left once retries are spent into one
:class:`~cloudckpt.errors.TransferError`.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable
from typing import TypeVar

import tenacity

from .errors import AccessError, CloudCkptError, IntegrityError, StoreError, TransferError

log = logging.getLogger(__name__)
T = TypeVar("T")

#: a full or read-only local disk, a file too large: retrying only delays the error
_LOCAL_PERMANENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}


def is_transient(exc: BaseException) -> bool:
    """True for failures a retry may fix: a StoreError the backend found transient, and OS errors (resets, timeouts)
    other than a missing file, denied access or a full or read-only disk."""
    if isinstance(exc, StoreError):
        return exc.transient
    if isinstance(exc, CloudCkptError) or isinstance(exc, (PermissionError, FileNotFoundError, NotADirectoryError)):
        return False
    if isinstance(exc, OSError) and exc.errno in _LOCAL_PERMANENT_ERRNOS:
        return False
    return isinstance(exc, OSError)


def transient_or_mismatch(exc: BaseException) -> bool:
    """For uploads: a checksum or size mismatch found after the upload is worth another upload."""
    return isinstance(exc, IntegrityError) or is_transient(exc)


def _outcome(exc: BaseException, url: str, what: str) -> BaseException | None:
    """The error to raise for ``exc`` once retrying stopped, or None to raise ``exc`` as it is: a cloudckpt error, a
    missing object (FileNotFoundError: the caller knows what that means), or a programming error."""
    if isinstance(exc, PermissionError) and not isinstance(exc, CloudCkptError):
        return AccessError(f"{url}: access denied ({exc}); the credentials lack permission for this run")
    if isinstance(exc, StoreError) or (isinstance(exc, OSError) and not isinstance(exc, (CloudCkptError,
                                                                                           FileNotFoundError))):
        return TransferError(f"{url}: {what} failed: {exc}")
    return None


def run(fn: Callable[[], T], *, url: str, what: str, budget: float, attempts: int = 4,
        retry_on: Callable[[BaseException], bool] = is_transient, wait: tenacity.wait.wait_base | None = None,
        log_level: int = logging.WARNING) -> T:
    """Call ``fn`` until it succeeds, a permanent error occurs, ``attempts`` are spent or ``budget`` seconds pass.

    ``what`` names the operation in the retry log lines and in the error.

    Raises:
        TransferError: the store failed (a StoreError, or an OSError such as a reset or timeout), from that error.
        AccessError: a PermissionError (never retried).
        FileNotFoundError: as raised by ``fn``: the backend contract's missing object, for the caller to interpret.
        CloudCkptError: as raised by ``fn`` (access, integrity, a lost index race after the last attempt...).
    """

    retrying = tenacity.Retrying(
        stop=tenacity.stop_after_attempt(attempts) | tenacity.stop_after_delay(budget),
        wait=wait or tenacity.wait_exponential_jitter(initial=0.2, max=5.0),
        retry=tenacity.retry_if_exception(retry_on),
        before_sleep=lambda state: log.log(log_level, "%s at %s: attempt %d failed (%s); retrying", what, url,
                                           state.attempt_number, state.outcome.exception() if state.outcome else "?"),
        reraise=True,
    )
    try:
        return retrying(fn)
    except Exception as exc:
        typed = _outcome(exc, url, what)
        if typed is not None:
            raise typed from exc
        raise
