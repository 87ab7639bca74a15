"""One exception hierarchy for cloudckpt.

Every error raised on purpose by cloudckpt derives from :class:`CloudCkptError`, and where a built-in exception
fits, also from that built-in, so callers can test either (`except FileNotFoundError` catches a missing checkpoint).
Each class carries the CLI exit code it maps to; the CLI turns exceptions into exit codes in one place.

Exit codes (documented in the README):
    0 ok, 1 other error, 2 usage, 3 nothing matches, 4 integrity failure, 5 access or configuration error,
    6 fenced (a newer writer took over the run); the CLI also exits 130 when interrupted (Ctrl-C) and 143 on SIGTERM
    (:mod:`cloudckpt.cancel`).
"""

from __future__ import annotations


class CloudCkptError(Exception):
    """Base of every cloudckpt error."""

    exit_code = 1


class CheckpointNotFoundError(CloudCkptError, FileNotFoundError):
    """No run at the URL, or no checkpoint matches the selector."""

    exit_code = 3


class IntegrityError(CloudCkptError, ValueError):
    """Bytes or metadata are not what the index promises: checksum or size mismatch, invalid or tampered index."""

    exit_code = 4


class UnsafePathError(IntegrityError):
    """A manifest names a path that would escape the target directory (absolute, `..`, a link)."""


class AccessError(CloudCkptError, PermissionError):
    """Access denied, missing or expired credentials, no such bucket: retrying will not help."""

    exit_code = 5


class ConfigurationError(CloudCkptError, ValueError):
    """A bad URL, option or argument: retrying will not help."""

    exit_code = 5


class SourceChangedError(ConfigurationError):
    """A local file changed while it was being pushed (and kept changing on every retry): push a finished checkpoint."""


class ResumeMismatchError(ConfigurationError):
    """The model being trained does not match the checkpoint its run would resume from (other variables or shapes):
    resume with the model that saved it, or start over (``resume=False`` or a new remote)."""


class StaleWriterError(CloudCkptError, RuntimeError):
    """This writer was superseded by a newer one on the same run (fenced); it must stop writing."""

    exit_code = 6


class TransferError(CloudCkptError, OSError):
    """An upload, download, listing or index update failed (after its retry budget was spent, where retrying could
    help); ``__cause__`` says why. :func:`cloudckpt.retry.run` raises it, once, for every logical operation."""

    exit_code = 1


class StoreError(CloudCkptError, OSError):
    """One store request failed: a backend's translation of its client's error (``__cause__``) at its boundary.

    ``transient``: another attempt may succeed (a 5xx, throttling, a reset or timeout, a body the server found
    corrupted). :func:`cloudckpt.retry.run` retries the transient ones and raises TransferError from what is left.
    """

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


class IndexConflictError(CloudCkptError):
    """Internal: a conditional index write lost a race. The commit loop re-reads the index and tries again."""


class CheckpointCondemnedError(CloudCkptError):
    """``gc`` condemned this push's uncommitted checkpoint before it was committed (its objects may be gone): the
    index refuses it. A push uploads again under a new id and raises this only when that keeps happening."""

    exit_code = 1


class CheckpointWriteError(CloudCkptError, OSError):
    """Writing a checkpoint's local file in the background failed (``__cause__`` says why). Raised on the training
    thread at the next batch or epoch boundary, or at the end of training."""

    exit_code = 1


class CommitFailedError(TransferError):
    """Saves that were reported as made but are not committed to the store (their upload failed, or their
    background write did): ``failures`` names each (epoch, step, cause). Raised by ``close()`` / the end of training
    when a save is still uncommitted after its last retry, and at the next save point with
    ``on_upload_error="raise"``. ``__cause__`` is the first failure's error."""

    def __init__(self, message: str, failures: tuple[SaveFailure, ...] = ()) -> None:
        super().__init__(message)
        self.failures = failures


class SaveFailure:
    """One save that is not committed: what it was (``epoch``, ``step``, a ``label`` to print) and why (``error``)."""

    __slots__ = ("epoch", "step", "label", "error")

    def __init__(self, epoch: int | None, step: int | None, label: str, error: BaseException | None) -> None:
        self.epoch, self.step, self.label, self.error = epoch, step, label, error

    def __repr__(self) -> str:
        return f"SaveFailure({self.label!r}, {self.error!r})"

    def __str__(self) -> str:
        return f"{self.label}: {self.error}" if self.error is not None else f"{self.label}: not committed"


def commit_failed(failures: list[SaveFailure] | tuple[SaveFailure, ...], where: str) -> CommitFailedError:
    """A :class:`CommitFailedError` naming every failure, chained to the first one's cause."""
    names = "; ".join(str(f) for f in failures)
    err = CommitFailedError(f"{len(failures)} save(s) not committed to {where}: {names}", tuple(failures))
    err.__cause__ = next((f.error for f in failures if f.error is not None), None)
    return err
