"""The index changes a store makes, as pure functions of the index. No I/O.

Each takes the current index and returns a :class:`Change`: the index to write (None when there is nothing to
write) and the checkpoints it pruned (whose objects the store deletes once the write has happened), plus any sealed
index segments to write before that index (:mod:`cloudckpt.segments`; read through ``load``, only when needed).
:meth:`~cloudckpt.commit.IndexKeeper.apply` runs a change with compare-and-swap, again on every lost race, so a
change must depend only on its arguments.

Example:
    >>> from cloudckpt.manifest import Index
    >>> from cloudckpt.retention import Retention
    >>> prune_checkpoints(Index(), Retention(keep_last=1), busy=frozenset())
    Change(index=None, pruned=(), segments=())
"""

from __future__ import annotations

import logging
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, replace
from datetime import datetime

from .condemn import commit_refusal, released
from .errors import CheckpointCondemnedError, CheckpointNotFoundError, ConfigurationError
from .manifest import CheckpointEntry, Index, RunPolicy, WriterLease
from .retention import Retention
from .segments import Doomed, Loader, NewSegment, doomed, full_view, locate, no_segments, relabel, retarget, without

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Change:
    """The index to write (None: leave it as it is) and the checkpoints that index no longer lists."""

    index: Index | None
    pruned: tuple[CheckpointEntry, ...] = ()
    segments: tuple[NewSegment, ...] = ()


def commit_checkpoint(index: Index, entry: CheckpointEntry, policy: Retention, *, prune: bool,
                      busy: AbstractSet[str], load: Loader = no_segments, began: int | None = None) -> Change:
    """Add ``entry`` as the latest checkpoint; the settings given in ``policy`` become the run's; with ``prune``,
    apply the run's retention in the same update (``busy`` ids, the new latest and the best are kept).

    Raises CheckpointCondemnedError when gc condemned ``entry``'s id, or its push ``began`` (the index's seq before
    its first upload) before gc's horizon (:mod:`cloudckpt.condemn`).
    """
    if any(c.id == entry.id for c in index.checkpoints):
        return Change(None)  # defensive: only this push adds the id, and a write that happened is never re-applied
    if index.gc_state:
        why = commit_refusal(index, entry.id, began=index.horizon if began is None else began)
        if why is not None:
            raise CheckpointCondemnedError(why)
        index = released(index, entry.id)
    run = RunPolicy.of(policy.over(index.run.retention))
    if run != index.run:
        if index.segments and (run.monitor, run.mode) != (index.run.monitor, index.run.mode):
            index = retarget(index, run.retention.objective, load)  # rare: the run's objective changed
        index = index.with_policy(run)
    new = index.with_checkpoint(entry)
    if not prune:
        return Change(new)
    return _take_out(new, doomed(new, new.run.retention, _always(new, busy), load), load)


def prune_checkpoints(index: Index, keep: Retention | None, *, busy: AbstractSet[str],
                      load: Loader = no_segments) -> Change:
    """Take out what retention doesn't keep: the keep-* rules of ``keep`` in place of the run's (the run's monitor
    still ranks), or the run's own policy when ``keep`` is None. The latest, best, pinned and ``busy`` stay."""
    run = index.run.retention
    rules = run if keep is None else replace(keep, monitor=run.monitor, mode=run.mode)
    change = _take_out(index, doomed(index, rules, _always(index, busy), load), load)
    return change if change.pruned else Change(None)


def discard_checkpoints(index: Index, ids: AbstractSet[str], *, busy: AbstractSet[str],
                        load: Loader = no_segments) -> Change:
    """Take out the checkpoints ``ids`` (a framework dropped them); the latest, best, pinned and ``busy`` stay."""
    keep = _always(index, busy) | {c.id for c in index.checkpoints if c.pinned}
    change = _take_out(index, locate(index, set(ids) - keep, load), load)
    return change if change.pruned else Change(None)


def label_checkpoint(index: Index, selector: str, *, pinned: bool | None = None, tag: str | None = None,
                     untag: str | None = None, load: Loader = no_segments) -> Change:
    """Pin or unpin the checkpoint ``selector`` names, give it the tag ``tag`` (taken off any other checkpoint: a
    tag names one) or take ``untag`` off it. A sealed checkpoint's segment is written again with it changed."""
    full = full_view(index, load) if index.segments else index
    target = full.resolve(selector)
    if tag is not None and any(c.id == tag for c in full.checkpoints):
        raise ConfigurationError(f"invalid tag {tag!r}: a checkpoint of this run has that id")
    if untag is not None and untag not in target.tags:
        raise CheckpointNotFoundError(f"{target.id} has no tag {untag!r}")

    def relabeled(c: CheckpointEntry) -> CheckpointEntry:
        tags = tuple(t for t in c.tags if t not in (tag, untag))
        if c.id != target.id:
            return c if tags == c.tags else c.model_copy(update={"tags": tags})
        pin = c.pinned if pinned is None else pinned
        return c.model_copy(update={"pinned": pin, "tags": (*tags, tag) if tag is not None else tags})

    new, made = relabel(index, relabeled, load)
    return Change(new if new != index else None, segments=made)


def claim_writer(index: Index, writer_id: str, host: str, now: datetime) -> Change:
    """Make ``writer_id`` the run's writer, one generation above the current one (which fences it out)."""
    generation = (index.writer.generation + 1) if index.writer else 1
    return Change(index.with_writer(WriterLease(id=writer_id, generation=generation, host=host, since=now)))


def _always(index: Index, busy: AbstractSet[str]) -> set[str]:
    return {cid for cid in (index.latest, index.best, *busy) if cid is not None}


def _take_out(index: Index, gone: Doomed, load: Loader) -> Change:
    if not gone:
        return Change(index)
    new, made, pruned = without(index, gone, load)
    return Change(new, pruned, made)
