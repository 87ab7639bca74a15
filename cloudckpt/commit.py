"""The index's compare-and-swap loop and writer fencing.

Every change to a run's index goes through :meth:`IndexKeeper.update`: read the index and its version token, apply
a pure change, write it back only if the token still holds; on a lost race read again and re-apply. A writer that
has claimed the run (:meth:`IndexKeeper.claim`) carries a lease; once a newer writer claims the run, every update
of the older one raises :class:`~cloudckpt.errors.StaleWriterError` instead of writing.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Callable

import tenacity

from . import retry
from .backends import Backend
from .backends.base import UNCHANGED
from .errors import CheckpointNotFoundError, CloudCkptError, IndexConflictError, StaleWriterError, TransferError
from .manifest import Index, WriterLease, dump, parse_index, utcnow

log = logging.getLogger(__name__)


def new_writer_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class IndexKeeper:
    """Reads and conditionally updates one run's index."""

    def __init__(self, backend: Backend, *, budget: float = 120.0, writer_id: str | None = None) -> None:
        self.backend = backend
        self.budget = budget
        self.writer_id = writer_id or new_writer_id()
        self.lease: WriterLease | None = None
        self.conflicts = 0  # lost races, for tests and logs
        self._cached: tuple[object, Index] | None = None  # (token, index) last read or written by us

    def _fetch(self) -> tuple[Index | None, object]:
        cached = self._cached
        known = cached[0] if cached else None
        data, token = retry.run(lambda: self.backend.read_index(known), url=self.backend.url, what="read index",
                                budget=self.budget)
        if data is None:
            return None, None
        if data is UNCHANGED and cached is not None:
            return cached[1], token  # still the index we parsed or wrote last: no download, no parse
        index = parse_index(data)
        self._cached = (token, index)
        return index, token

    def read(self) -> tuple[Index, object]:
        """The current index (an empty one if the run has none yet) and its token."""
        index, token = self._fetch()
        return (index if index is not None else Index()), token

    def read_existing(self) -> Index:
        """The current index; CheckpointNotFoundError if there is no run at the URL."""
        index, _ = self._fetch()
        if index is None:
            raise CheckpointNotFoundError(f"no cloudckpt run at {self.backend.url} (no index.json there)")
        return index

    def _check_fence(self, index: Index) -> None:
        if self.lease is None or index.writer is None:
            return
        if index.writer.generation != self.lease.generation or index.writer.id != self.lease.id:
            raise StaleWriterError(
                f"{self.backend.url}: this writer ({self.lease.id}, generation {self.lease.generation}) was superseded by "
                f"{index.writer.id} (generation {index.writer.generation}) since {index.writer.since.isoformat()}; "
                "it stops writing to this run"
            )

    def update(self, change: Callable[[Index], Index | None], *, what: str = "update index") -> Index:
        """Apply ``change`` (pure: Index -> new Index, or None for no change) with compare-and-swap; return the result."""

        def attempt() -> Index:
            index, token = self.read()
            self._check_fence(index)
            new = change(index)
            if new is None:
                return index
            self.backend.ensure_conditional_writes(self.budget)  # once per backend: refuse a store without CAS
            try:
                new_token = self.backend.write_index(dump(new), token)
            except IndexConflictError:
                self.conflicts += 1
                raise
            self._cached = (new_token, new) if new_token is not None else None
            return new

        def retryable(exc: BaseException) -> bool:
            return isinstance(exc, IndexConflictError) or retry.is_transient(exc)

        try:
            return retry.run(attempt, url=self.backend.url, what=what, budget=self.budget, attempts=200,
                             retry_on=retryable, wait=tenacity.wait_random_exponential(multiplier=0.005, max=0.5),
                             log_level=logging.DEBUG)
        except IndexConflictError as e:
            raise TransferError(f"{self.backend.url}: {what}: gave up after {self.conflicts} lost races") from e
        except CloudCkptError:
            raise
        except Exception as exc:
            if not (retry.is_transient(exc) or isinstance(exc, OSError)):
                raise  # a programming error: let it show as itself
            raise TransferError(f"{self.backend.url}: {what} failed: {exc}") from exc

    def claim(self) -> WriterLease:
        """Become the run's writer: a generation above every earlier writer's, which fences them out."""
        self.lease = None
        claimed: list[WriterLease] = []

        def change(index: Index) -> Index:
            gen = (index.writer.generation + 1) if index.writer else 1
            lease = WriterLease(id=self.writer_id, generation=gen, host=socket.gethostname(), since=utcnow())
            claimed[:] = [lease]
            return index.with_writer(lease)

        self.update(change, what="claim run")
        self.lease = claimed[0]
        log.info("claimed %s as writer generation %d", self.backend.url, self.lease.generation)
        return self.lease
