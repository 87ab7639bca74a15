"""The index changes a store makes, as pure functions of the index. No I/O.

Each takes the current index and returns a :class:`Change`: the index to write (None when there is nothing to
write) and the checkpoints it pruned (whose objects the store deletes once the write has happened).
:meth:`~cloudckpt.commit.IndexKeeper.apply` runs a change with compare-and-swap, again on every lost race, so a
change must depend only on its arguments.

Example:
    >>> from cloudckpt.manifest import Index
    >>> from cloudckpt.retention import Retention
    >>> prune_checkpoints(Index(), Retention(keep_last=1), busy=frozenset())
    Change(index=None, pruned=())
"""

from __future__ import annotations

import logging
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, replace
from datetime import datetime

from .manifest import CheckpointEntry, Index, RunPolicy, WriterLease
from .retention import Record, Retention

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Change:
    """The index to write (None: leave it as it is) and the checkpoints that index no longer lists."""

    index: Index | None
    pruned: tuple[CheckpointEntry, ...] = ()


def commit_checkpoint(index: Index, entry: CheckpointEntry, policy: Retention, *, prune: bool,
                      busy: AbstractSet[str]) -> Change:
    """Add ``entry`` as the latest checkpoint; the settings given in ``policy`` become the run's; with ``prune``,
    apply the run's retention in the same update (``busy`` ids, the new latest and the best are kept)."""
    if any(c.id == entry.id for c in index.checkpoints):
        return Change(None)  # defensive: only this push adds the id, and a write that happened is never re-applied
    run = RunPolicy.of(policy.over(index.run.retention))
    new = (index.with_policy(run) if run != index.run else index).with_checkpoint(entry)
    if not prune:
        return Change(new)
    doomed = _doomed(new, new.run.retention, busy)
    return Change(new.without(doomed) if doomed else new, _entries(new, doomed))


def prune_checkpoints(index: Index, keep: Retention | None, *, busy: AbstractSet[str]) -> Change:
    """Take out what retention doesn't keep: the keep-* rules of ``keep`` in place of the run's (the run's monitor
    still ranks), or the run's own policy when ``keep`` is None. The latest, best, pinned and ``busy`` stay."""
    run = index.run.retention
    rules = run if keep is None else replace(keep, monitor=run.monitor, mode=run.mode)
    doomed = _doomed(index, rules, busy)
    return Change(index.without(doomed) if doomed else None, _entries(index, doomed))


def discard_checkpoints(index: Index, ids: AbstractSet[str], *, busy: AbstractSet[str]) -> Change:
    """Take out the checkpoints ``ids`` (a framework dropped them); the latest, best, pinned and ``busy`` stay."""
    keep = {index.latest, index.best, *busy} | {c.id for c in index.checkpoints if c.pinned}
    doomed = {c.id for c in index.checkpoints if c.id in ids} - keep
    return Change(index.without(doomed) if doomed else None, _entries(index, doomed))


def claim_writer(index: Index, writer_id: str, host: str, now: datetime) -> Change:
    """Make ``writer_id`` the run's writer, one generation above the current one (which fences it out)."""
    generation = (index.writer.generation + 1) if index.writer else 1
    return Change(index.with_writer(WriterLease(id=writer_id, generation=generation, host=host, since=now)))


def _doomed(index: Index, retention: Retention, busy: AbstractSet[str]) -> set[str]:
    always = {cid for cid in (index.latest, index.best, *busy) if cid is not None}
    records = [Record(c.id, c.epoch, c.step, c.metrics, c.pinned) for c in index.checkpoints]
    return retention.plan(records, always=always)


def _entries(index: Index, ids: AbstractSet[str]) -> tuple[CheckpointEntry, ...]:
    return tuple(c for c in index.checkpoints if c.id in ids)
