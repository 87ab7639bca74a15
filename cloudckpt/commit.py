"""The index's compare-and-swap loop, how a write whose answer was lost is resolved, and writer fencing.

Every change to a run's index goes through :meth:`IndexKeeper.apply`: read the index and its version token, apply
a pure change (:mod:`cloudckpt.changes`), write it back only if the token still holds; on a lost race read again and
re-apply. A writer that has claimed the run (:meth:`IndexKeeper.claim`) carries a lease; once a newer writer claims
the run, every update of the older one raises :class:`~cloudckpt.errors.StaleWriterError` instead of writing.

A write can fail ambiguously: a timeout or reset after the store carried it out, or a 412 answering a client's
internal retry of a write that already succeeded. Re-applying the change then is wrong when another writer changed
the index since (a commit pruned meanwhile would be added again, and its retention would prune the other writer's
checkpoint). So every write stamps the index with this keeper's session id and a fresh update number
(:class:`~cloudckpt.manifest.Applied`, one record per session, the :data:`MAX_APPLIED` most recent sessions kept).
Before re-applying, the keeper reads its record back: if it names one of this update's writes, that write happened
and its result is returned as is — never re-applied, even if what it added has been pruned since; otherwise no
write of this update happened and the change is applied afresh. If the record may have been evicted (more than
:data:`MAX_APPLIED` other sessions wrote meanwhile) the outcome is unknown and :class:`OutcomeUnknownError` is
raised rather than guessed.

The index is a head with sealed segments (:mod:`cloudckpt.segments`): after a change, the keeper seals what the head
holds beyond its limit, writes the new segment objects, and only then swaps in the head that references them. It
reads segments on demand (:meth:`IndexKeeper.segment`), each checked against its reference, and keeps those it read
or wrote (they are immutable). A new segment whose key gc condemned is written under a fresh digest instead
(:mod:`cloudckpt.condemn`).
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import tenacity

from . import layout, retry
from .backends import Backend
from .backends.base import UNCHANGED
from .changes import Change, claim_writer
from .condemn import condemned_segments
from .errors import CheckpointNotFoundError, IndexConflictError, IntegrityError, StaleWriterError, TransferError
from .manifest import Applied, CheckpointEntry, Index, SegmentRef, WriterLease, dump, parse_index, utcnow
from .segments import NewSegment, Sealing, avoid, check, decode, full_view, seal

log = logging.getLogger(__name__)

#: writer sessions whose last update the index remembers (about 60 bytes each)
MAX_APPLIED = 32
#: sealed segments a keeper keeps in memory once read or written
SEGMENT_CACHE = 64


@dataclass(frozen=True)
class Update:
    """One applied index update: the index it was applied to, the one written (the same when nothing changed) and
    the checkpoints it took out (pruned: their objects are the caller's to delete).

    ``resolved`` is True when the write's answer was lost and the index showed afterwards that it happened.
    """

    before: Index
    after: Index
    pruned: tuple[CheckpointEntry, ...] = ()
    resolved: bool = False


class OutcomeUnknownError(TransferError):
    """An index write lost its answer and too many other writers wrote since to tell whether it happened.

    Nothing is re-applied. ``gone`` lists checkpoints the write would have pruned that the index no longer lists:
    they can never be listed again, so their objects may be deleted.
    """

    def __init__(self, message: str, gone: list[CheckpointEntry] | None = None) -> None:
        super().__init__(message)
        self.gone = list(gone or [])


def _stamped(new: Index, before: Index, session: str, op: int) -> Index:
    """``new`` with a seq above ``before``'s and this session's record of update ``op`` (bounded, newest kept)."""
    seq = max(new.seq, before.seq + 1)
    others = sorted((r for r in before.applied if r.writer != session), key=lambda r: r.seq)[-(MAX_APPLIED - 1):]
    return new.model_copy(update={"seq": seq, "applied": (*others, Applied(writer=session, op=op, seq=seq))})


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
        self.session = uuid.uuid4().hex[:16]  # names this keeper's writes in the index (Index.applied)
        self._ops = itertools.count(1)
        self._lock = threading.Lock()  # one update at a time: the session's record must be its latest update
        self._cached: tuple[object, Index] | None = None  # (token, index) last read or written by us
        self.sealing = Sealing.from_env()
        self._segments: OrderedDict[str, tuple[SegmentRef, tuple[CheckpointEntry, ...]]] = OrderedDict()
        self._segments_lock = threading.Lock()

    def segment(self, ref: SegmentRef) -> tuple[CheckpointEntry, ...]:
        """The checkpoints of the sealed segment ``ref`` names, read once and checked against ``ref``
        (IntegrityError when it is missing, altered or not what ``ref`` summarizes)."""
        with self._segments_lock:
            known = self._segments.get(ref.sha256)
            if known is not None:
                self._segments.move_to_end(ref.sha256)
                if known[0] == ref:
                    return known[1]
        key = layout.segment_key(ref.sha256)
        if known is None:
            try:
                data = retry.run(lambda: self.backend.read_bytes(key), url=self.backend.url, what=f"read {key}",
                                 budget=self.budget)
            except FileNotFoundError:
                raise IntegrityError(f"{self.backend.url}: the index references the segment {key}, which is "
                                     "missing") from None
            entries = decode(ref, data)
        else:
            entries = check(ref, known[1])  # the same object, summarized again (another objective)
        self._remember(ref, entries)
        return entries

    def _remember(self, ref: SegmentRef, entries: tuple[CheckpointEntry, ...]) -> None:
        with self._segments_lock:
            self._segments[ref.sha256] = (ref, entries)
            self._segments.move_to_end(ref.sha256)
            while len(self._segments) > SEGMENT_CACHE:
                self._segments.popitem(last=False)

    def read_all(self, index: Index) -> Index:
        """``index`` with every sealed checkpoint read into ``checkpoints`` (see :func:`segments.full_view`)."""
        return full_view(index, self.segment)

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

    def seq_floor(self) -> int:
        """A seq at or below the index's current one: that of the index this keeper last read or wrote (no request),
        else the current one (read). What a push notes before its first upload (:mod:`cloudckpt.condemn`)."""
        cached = self._cached
        return cached[1].seq if cached is not None else self.read()[0].seq

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
                f"{self.backend.url}: this writer ({self.lease.id}, generation {self.lease.generation}) was "
                "superseded by "
                f"{index.writer.id} (generation {index.writer.generation}) since {index.writer.since.isoformat()}; "
                "it stops writing to this run"
            )

    def apply(self, change: Callable[[Index], Change], *, what: str = "update index") -> Update:
        """Apply ``change`` (pure: the index -> a :class:`~cloudckpt.changes.Change`) with compare-and-swap; return
        what was written (see :class:`Update`).

        A write whose answer was lost is resolved before anything is re-applied (module docstring); raises
        :class:`OutcomeUnknownError` when that can't be decided.
        """
        written: dict[int, Update] = {}  # update number -> what that write would make of the index

        def attempt() -> Update:
            return self._attempt(change, written, what)

        def retryable(exc: BaseException) -> bool:
            return isinstance(exc, IndexConflictError) or retry.is_transient(exc)

        with self._lock:
            try:
                return retry.run(attempt, url=self.backend.url, what=what, budget=self.budget, attempts=200,
                                 retry_on=retryable, wait=tenacity.wait_random_exponential(multiplier=0.005, max=0.5),
                                 log_level=logging.DEBUG)
            except IndexConflictError as e:  # other failures are typed by retry.run
                raise TransferError(f"{self.backend.url}: {what}: gave up after {self.conflicts} lost races") from e

    def _attempt(self, change: Callable[[Index], Change], written: dict[int, Update], what: str) -> Update:
        """One try of an update: settle an earlier write of it whose answer was lost, else apply ``change`` to the
        index as it is now and write the result conditionally, recording it in ``written`` first."""
        index, token = self.read()
        done = self._resolve(index, written, what) if written else None
        if done is not None:
            return done
        self._check_fence(index)
        proposed = change(index)
        if proposed.index is None:
            return Update(index, index)
        self.backend.ensure_conditional_writes(self.budget)  # once per backend: refuse a store without CAS
        for made in proposed.segments:
            self._remember(made.ref, made.entries)
        sealed, more = seal(proposed.index, self.sealing, self.segment)
        new_segments = (*proposed.segments, *more)
        dead = condemned_segments(index)
        if dead:  # never reference a segment key gc condemned: it may be deleting that object
            sealed, new_segments = avoid(sealed, new_segments, dead, lambda: uuid.uuid4().hex)
        self._write_segments(sealed, new_segments)
        op = next(self._ops)
        new = _stamped(sealed, index, self.session, op)
        written[op] = Update(index, new, proposed.pruned)
        try:
            new_token = self.backend.write_index(dump(new), token)
        except IndexConflictError:
            self.conflicts += 1
            raise
        self._cached = (new_token, new) if new_token is not None else None
        return written[op]

    def _write_segments(self, index: Index, made: tuple[NewSegment, ...]) -> None:
        """Write the new segments ``index`` references (before the swap that makes them part of the run)."""
        wanted = {r.sha256 for r in index.segments}
        for seg in {m.ref.sha256: m for m in made if m.ref.sha256 in wanted}.values():
            self._remember(seg.ref, seg.entries)
            self.backend.write_bytes(seg.key, seg.data)

    def _resolve(self, index: Index, written: dict[int, Update], what: str) -> Update | None:
        """Which earlier write of this update the index shows applied; None when none did; raise when unknowable."""
        mine = next((r for r in index.applied if r.writer == self.session), None)
        if mine is not None and mine.op in written:
            done = written[mine.op]
            log.info("%s at %s: an earlier write's answer was lost; the index (seq %d) shows it applied at seq %d",
                     what, self.backend.url, index.seq, mine.seq)
            return Update(done.before, done.after, done.pruned, resolved=True)
        if mine is None and len(index.applied) >= MAX_APPLIED:
            oldest = min(r.seq for r in index.applied)
            if any(u.after.seq < oldest for u in written.values()):  # its record may have been pushed out
                listed = {c.id for c in self.read_all(index).checkpoints}
                gone = {c.id: c for u in written.values() for c in u.pruned if c.id not in listed}
                raise OutcomeUnknownError(
                    f"{self.backend.url}: {what}: a write's answer was lost and {len(index.applied)} other writers "
                    "wrote since, so whether it happened is unknown; nothing was re-applied",
                    list(gone.values()))
        return None  # a record of ours older than this update, or none: no write of this update happened

    def claim(self) -> WriterLease:
        """Become the run's writer: a generation above every earlier writer's, which fences them out."""
        self.lease = None
        host, now = socket.gethostname(), utcnow()
        lease = self.apply(lambda index: claim_writer(index, self.writer_id, host, now), what="claim run").after.writer
        assert lease is not None
        self.lease = lease  # a claim that lost its answer and was superseded since: the next update is fenced
        log.info("claimed %s as writer generation %d", self.backend.url, self.lease.generation)
        return self.lease
