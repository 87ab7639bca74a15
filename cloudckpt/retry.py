"""Which failures are worth retrying, and one tenacity policy per logical operation with a wall-clock budget.

The cloud clients already retry single HTTP requests (botocore: 3 attempts in "standard" mode, gcsfs: 6,
google-cloud-storage: a 120 s deadline), so ours is coarse: whole operations (upload and verify one file, one index
compare-and-swap), a few attempts at most within ``budget`` seconds. Permanent failures (access denied, missing
credentials, no such bucket) are turned into :class:`~cloudckpt.errors.AccessError` at once, naming the URL.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable
from typing import TypeVar

import tenacity

from .errors import AccessError, CloudCkptError, IntegrityError

log = logging.getLogger(__name__)
T = TypeVar("T")

_ACCESS_CODES = {
    "AccessDenied", "AllAccessDisabled", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken",
    "AccountProblem", "InvalidObjectState", "403", "401", "Forbidden", "Unauthorized",
}
_MISSING_BUCKET_CODES = {"NoSuchBucket", "InvalidBucketName", "404"}
_TRANSIENT_CODES = {
    "SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed", "InternalError",
    "ServiceUnavailable", "503", "500", "502", "504", "429", "ExpiredToken", "RequestExpired", "TooManyRequests",
}


def _error_code(exc: BaseException) -> str | None:
    resp = getattr(exc, "response", None)
    if isinstance(resp, dict):
        return str(resp.get("Error", {}).get("Code") or resp.get("ResponseMetadata", {}).get("HTTPStatusCode") or "")
    code = getattr(exc, "code", None)
    return str(code) if code is not None else None


_LOCAL_PERMANENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}
_WRAPPERS = {"S3UploadFailedError", "S3TransferFailedError"}  # boto3 hides the ClientError in __context__


def _unwrap(exc: BaseException) -> BaseException:
    """The client error under boto3's transfer wrappers (which carry no error code of their own)."""
    while type(exc).__name__ in _WRAPPERS and (exc.__cause__ or exc.__context__) is not None:
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return exc


def permanent_error(exc: BaseException, url: str) -> CloudCkptError | None:
    """Return the typed permanent error ``exc`` stands for (access, credentials, missing bucket), or None."""
    exc = _unwrap(exc)
    name = type(exc).__name__
    module = type(exc).__module__
    if isinstance(exc, CloudCkptError):
        return None
    if name in ("NoCredentialsError", "PartialCredentialsError", "DefaultCredentialsError", "CredentialRetrievalError"):
        return AccessError(f"{url}: no usable credentials ({name}: {exc}); "
                           "set AWS_* / GOOGLE_APPLICATION_CREDENTIALS or pass storage options")
    if name in ("NoRegionError", "ProfileNotFound", "InvalidConfigError"):
        return AccessError(f"{url}: client configuration is incomplete ({name}: {exc})")
    if name == "RefreshError" and module.startswith("google"):
        return AccessError(f"{url}: credentials could not be refreshed ({exc})")
    code = _error_code(exc)
    if code in _ACCESS_CODES or isinstance(exc, PermissionError) or name in ("Forbidden", "Unauthorized"):
        return AccessError(
            f"{url}: access denied ({code or name}: {exc}); the credentials lack permission for this run")
    if code in _MISSING_BUCKET_CODES and "bucket" in str(exc).lower():
        return AccessError(f"{url}: no such bucket ({exc})")
    return None


def is_transient(exc: BaseException) -> bool:
    """True for failures a retry may fix: 5xx, throttling, resets, timeouts, a checksum mismatch after upload."""
    exc = _unwrap(exc)
    if isinstance(exc, CloudCkptError) or isinstance(exc, (PermissionError, FileNotFoundError, NotADirectoryError)):
        return False
    if isinstance(exc, OSError) and exc.errno in _LOCAL_PERMANENT_ERRNOS:
        return False  # a full or read-only local disk: retrying only delays the error
    code = _error_code(exc)
    if code in _TRANSIENT_CODES:
        return True
    name = type(exc).__name__
    if name in ("ServiceUnavailable", "TooManyRequests", "InternalServerError", "GatewayTimeout", "BadGateway",
                "DataCorruption", "InvalidResponse", "ConnectionError", "ReadTimeout", "ConnectTimeout",
                "EndpointConnectionError", "ConnectionClosedError", "ReadTimeoutError", "ResponseStreamingError",
                "IncompleteReadError", "ChunkedEncodingError", "ClientPayloadError", "ServerDisconnectedError",
                "RetryError", "HttpError", "HTTPClientError", "ProtocolError"):
        return True
    return isinstance(exc, (ConnectionError, TimeoutError, OSError))


def transient_or_mismatch(exc: BaseException) -> bool:
    """For uploads: a checksum or size mismatch found after the upload is worth another upload."""
    return isinstance(exc, IntegrityError) or is_transient(exc)


def run(fn: Callable[[], T], *, url: str, what: str, budget: float, attempts: int = 4,
        retry_on: Callable[[BaseException], bool] = is_transient, wait: tenacity.wait.wait_base | None = None,
        log_level: int = logging.WARNING) -> T:
    """Call ``fn`` until it succeeds, a permanent error occurs, ``attempts`` are spent or ``budget`` seconds pass.

    Permanent errors become typed cloudckpt errors; when retries run out the last error is re-raised as is
    (the caller wraps it in a :class:`~cloudckpt.errors.TransferError` with context). ``what`` names the operation
    in the retry log lines.
    """

    def check(exc: BaseException) -> bool:
        return permanent_error(exc, url) is None and retry_on(exc)

    retrying = tenacity.Retrying(
        stop=tenacity.stop_after_attempt(attempts) | tenacity.stop_after_delay(budget),
        wait=wait or tenacity.wait_exponential_jitter(initial=0.2, max=5.0),
        retry=tenacity.retry_if_exception(check),
        before_sleep=lambda state: log.log(log_level, "%s at %s: attempt %d failed (%s); retrying", what, url,
                                           state.attempt_number, state.outcome.exception() if state.outcome else "?"),
        reraise=True,
    )
    try:
        return retrying(fn)
    except BaseException as exc:
        typed = permanent_error(exc, url)
        if typed is not None:
            raise typed from exc
        raise
