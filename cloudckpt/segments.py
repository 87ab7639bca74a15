"""Sealed index segments: the older checkpoints of a long run, in immutable content-addressed objects. Pure.

The run's ``index.json`` is a head: the most recent checkpoints plus a :class:`~cloudckpt.manifest.SegmentRef` for
each sealed segment, oldest first. A segment (``_cloudckpt_index/<sha256>.json``, :func:`encode`) holds a run of
older entries in commit order; its reference carries what resolution and retention need without reading it (count,
first/last id, epochs, pinned count, the best values and the best entry by the run's objective). So resolving
``best``/``latest`` and committing read and write only the head, however long the run.

When the head holds more than :attr:`Sealing.head_max` checkpoints, the oldest are sealed (:func:`seal`): appended
to the newest segment while it has room (that segment is written again under its new digest), else into a new one.
The new segment objects are written before the compare-and-swap that swaps in the head referencing them (a lost
swap leaves an unreferenced segment for ``gc``). Retention (:func:`doomed`) decides from the references alone
whether a segment can hold anything to prune, and reads only the segments that can; the rare prune of a sealed
checkpoint writes that segment again without it (:func:`without`). Segments are read through a ``load`` function
(the store's, which checks every segment against its reference: :func:`decode`).

Example:
    >>> from cloudckpt.manifest import Index
    >>> index, made = seal(Index(), Sealing(), load=no_segments)
    >>> index.segments, made
    ((), ())
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Annotated, Literal

from pydantic import ConfigDict, Field, model_validator

from .errors import ConfigurationError, IntegrityError
from .layout import segment_key
from .manifest import TOP_SCORES, CheckpointEntry, Index, SegmentRef, _Frozen, _parse, readable
from .retention import KeepEvery, KeepLast, Objective, Record, Retention, rank_metrics

HEAD_ENV, SEGMENT_ENV = "CLOUDCKPT_INDEX_HEAD_MAX", "CLOUDCKPT_INDEX_SEGMENT_MAX"

Loader = Callable[[SegmentRef], tuple[CheckpointEntry, ...]]


def no_segments(ref: SegmentRef) -> tuple[CheckpointEntry, ...]:
    """A loader for callers that hold no store: any segment is an error."""
    raise RuntimeError(f"segment {ref.sha256[:12]} needed but no segment loader was given")


class Segment(_Frozen):
    """A sealed segment's document: checkpoints in commit order. ``nonce`` (written only when set) gives the same
    checkpoints another digest, for a segment whose first digest gc condemned (:func:`avoid`)."""

    schema_: Literal["cloudckpt/index-segment"] = Field(default="cloudckpt/index-segment", alias="schema")
    schema_version: Literal[1] = 1
    checkpoints: Annotated[tuple[CheckpointEntry, ...], Field(min_length=1)]
    nonce: Annotated[str, Field(pattern=r"^[0-9a-f]{32}$")] | None = None

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, populate_by_name=True)

    @model_validator(mode="after")
    def _unique(self) -> Segment:
        if len({c.id for c in self.checkpoints}) != len(self.checkpoints):
            raise ValueError("segment lists a checkpoint id twice")
        return self


@dataclass(frozen=True)
class NewSegment:
    """A segment to write (before the head that references it): its reference, bytes and entries."""

    ref: SegmentRef
    data: bytes = field(repr=False)
    entries: tuple[CheckpointEntry, ...] = field(repr=False)

    @property
    def key(self) -> str:
        return segment_key(self.ref.sha256)


@dataclass(frozen=True)
class Sealing:
    """When to seal: the head keeps at most ``head_max`` checkpoints (sealing leaves the newest ``head_max // 2``);
    a segment grows to at most ``segment_max`` checkpoints. Defaults 32 and 1024; ``$CLOUDCKPT_INDEX_HEAD_MAX`` and
    ``$CLOUDCKPT_INDEX_SEGMENT_MAX`` set them (:meth:`from_env`)."""

    head_max: int = 32
    segment_max: int = 1024

    def __post_init__(self) -> None:
        if self.head_max < 2 or self.segment_max < 1:
            raise ConfigurationError(f"the index head keeps >= 2 and a segment >= 1 checkpoints. Received: "
                                     f"head_max={self.head_max}, segment_max={self.segment_max}")

    @classmethod
    def from_env(cls) -> Sealing:
        try:
            return cls(int(os.environ.get(HEAD_ENV, cls.head_max)), int(os.environ.get(SEGMENT_ENV, cls.segment_max)))
        except ValueError as e:
            raise ConfigurationError(f"{HEAD_ENV} and {SEGMENT_ENV} are whole numbers ({e})") from None


def summarize(entries: Sequence[CheckpointEntry], objective: Objective, sha256: str) -> SegmentRef:
    """The reference of a segment holding ``entries``, its values ranked by ``objective``."""
    epochs = [c.epoch for c in entries if c.epoch is not None]
    increasing = len(epochs) == len(entries) and all(a < b for a, b in zip(epochs, epochs[1:]))
    ranked = objective.ranked(range(len(entries)), lambda i: rank_metrics(entries[i].metrics, entries[i].meta))
    top = tuple((float(objective.value(entries[i].metrics)), i) for i in ranked[:TOP_SCORES])  # type: ignore[arg-type]
    return SegmentRef(
        sha256=sha256, count=len(entries), first=entries[0].id, last=entries[-1].id,
        pinned=sum(c.pinned for c in entries), epoch_min=min(epochs, default=None), epoch_max=max(epochs, default=None),
        epoch_gcd=math.gcd(*epochs) if epochs else None, epochs_increasing=increasing, monitor=objective.monitor,
        mode=objective.mode, scored=len(ranked), top=top, best=entries[ranked[0]] if ranked else None)


def encode(entries: Sequence[CheckpointEntry], objective: Objective, nonce: str | None = None) -> NewSegment:
    """The segment object holding ``entries`` (in commit order) and its reference."""
    doc = Segment(checkpoints=tuple(entries), nonce=nonce)
    data = readable(doc, doc.model_dump_json(by_alias=True, exclude=None if nonce else {"nonce"}).encode(),
                    "index segment")
    return NewSegment(summarize(entries, objective, hashlib.sha256(data).hexdigest()), data, tuple(entries))


def avoid(index: Index, made: Sequence[NewSegment], condemned: AbstractSet[str],
          nonce: Callable[[], str]) -> tuple[Index, tuple[NewSegment, ...]]:
    """``index`` and the segments ``made`` for it, each new segment whose key gc condemned (``condemned``) encoded
    again with a fresh ``nonce()`` and referenced under its new digest: gc may be deleting the condemned object."""
    refs, out = list(index.segments), []
    for seg in made:
        if seg.key in condemned:
            at = next((i for i, r in enumerate(refs) if r.sha256 == seg.ref.sha256), None)
            seg = encode(seg.entries, Objective(seg.ref.monitor, seg.ref.mode), nonce())
            if at is not None:
                refs[at] = seg.ref
        out.append(seg)
    return index.model_copy(update={"segments": tuple(refs)}), tuple(out)


def decode(ref: SegmentRef, data: bytes) -> tuple[CheckpointEntry, ...]:
    """The entries of the segment ``ref`` names, read from ``data``: IntegrityError unless the bytes have its
    digest and hold exactly what the reference summarizes."""
    digest = hashlib.sha256(data).hexdigest()
    if digest != ref.sha256:
        raise IntegrityError(f"index segment {ref.sha256[:12]}: its bytes have sha256 {digest[:12]} (tampered)")
    return check(ref, _parse(Segment, data, f"index segment {ref.sha256[:12]}").checkpoints)


def check(ref: SegmentRef, entries: tuple[CheckpointEntry, ...]) -> tuple[CheckpointEntry, ...]:
    """``entries`` if they are exactly what ``ref`` summarizes, else IntegrityError."""
    if summarize(entries, Objective(ref.monitor, ref.mode), ref.sha256) != ref:
        raise IntegrityError(f"index segment {ref.sha256[:12]} does not hold what the index says it holds")
    return entries


def full_view(index: Index, load: Loader) -> Index:
    """``index`` with every sealed checkpoint read back into ``checkpoints`` (oldest first) and no segments: what
    listing, verifying all and gc see. IntegrityError if an id is listed twice."""
    if not index.segments:
        return index
    entries = tuple(e for r in index.segments for e in load(r)) + index.checkpoints
    if len({e.id for e in entries}) != len(entries):
        raise IntegrityError("the index and its segments list a checkpoint id twice")
    return index.model_copy(update={"checkpoints": entries, "segments": ()})


def seal(index: Index, sealing: Sealing, load: Loader) -> tuple[Index, tuple[NewSegment, ...]]:
    """Seal the head's oldest checkpoints when it holds more than ``sealing.head_max``: the index to write and the
    segments to write before it."""
    head = index.checkpoints
    if len(head) <= sealing.head_max:
        return index, ()
    n = len(head) - sealing.head_max // 2
    moving, refs = list(head[:n]), list(index.segments)
    objective = index.run.retention.objective
    if refs and refs[-1].count < sealing.segment_max:
        moving = list(load(refs.pop())) + moving  # fill the newest segment up (written again under a new digest)
    made = tuple(encode(moving[i:i + sealing.segment_max], objective)
                 for i in range(0, len(moving), sealing.segment_max))
    refs.extend(m.ref for m in made)
    return index.model_copy(update={"checkpoints": head[n:], "segments": tuple(refs)}), made


def retarget(index: Index, objective: Objective, load: Loader) -> Index:
    """``index`` with its segments summarized for a new objective (their objects are unchanged)."""
    refs = tuple(summarize(load(r), objective, r.sha256) for r in index.segments)
    return index.model_copy(update={"segments": refs})


@dataclass(frozen=True)
class Doomed:
    """Ids to prune: in the head, and per segment (by its position in ``index.segments``)."""

    head: frozenset[str] = frozenset()
    sealed: dict[int, frozenset[str]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.head) or any(self.sealed.values())


def _record(c: CheckpointEntry) -> Record:
    return Record(c.id, c.epoch, c.step, rank_metrics(c.metrics, c.meta), c.pinned)


def doomed(index: Index, retention: Retention, always: AbstractSet[str], load: Loader) -> Doomed:
    """What ``retention`` prunes from the whole run (as :meth:`Retention.plan` over every checkpoint would), reading
    only the segments whose references can't show that all their checkpoints are kept."""
    if retention.policy() is None:
        return Doomed()
    head, refs = index.checkpoints, index.segments
    if not refs:
        return Doomed(frozenset(retention.plan([_record(c) for c in head], always=always)))
    starts = [sum(r.count for r in refs[:i]) for i in range(len(refs))]
    total = sum(r.count for r in refs) + len(head)
    objective = retention.objective
    summarized = all((r.monitor, r.mode) == (objective.monitor, objective.mode) for r in refs)
    best: set[int] = set()  # global positions of the keep_best best
    if retention.keep_best is not None:
        k = retention.keep_best
        if not summarized or any(len(r.top) < r.scored and k > len(r.top) for r in refs):
            return _exact(index, retention, always, load)
        scored = [(value, starts[i] + at) for i, r in enumerate(refs) for value, at in r.top]
        scored += [(v, total - len(head) + j) for j, c in enumerate(head)
                   if (v := objective.value(rank_metrics(c.metrics, c.meta))) is not None]
        sign = 1 if objective.mode == "min" else -1
        best = {pos for _, pos in sorted(scored, key=lambda t: (sign * t[0], t[1]))[:k]}
    after = [c.epoch for c in head if c.epoch is not None]  # epochs after segment i, kept as a running minimum
    floor = min(after, default=math.inf)
    uncovered = []
    for i in reversed(range(len(refs))):
        r, s = refs[i], starts[i]
        covered = (r.pinned == r.count
                   or (retention.keep_last is not None and total - s <= retention.keep_last)
                   or (retention.keep_every is not None and r.epochs_increasing and r.epoch_gcd is not None
                       and r.epoch_gcd % retention.keep_every == 0 and r.epoch_max is not None and r.epoch_max < floor)
                   or all(s + j in best for j in range(r.count)))
        if not covered:
            uncovered.append(i)
        if r.epoch_min is not None:
            floor = min(floor, r.epoch_min)
    if uncovered and retention.keep_every is not None:
        return _exact(index, retention, always, load)  # which is the last of its epoch needs the later segments
    sealed = {}
    for i in uncovered:  # only keep_last, keep_best, pinned and always decide here: all known by position
        last = total - retention.keep_last if retention.keep_last is not None else total  # positions kept by keep_last
        gone = frozenset(c.id for j, c in enumerate(load(refs[i]))
                         if not (c.pinned or c.id in always or starts[i] + j >= last or starts[i] + j in best))
        if gone:
            sealed[i] = gone
    kept: set[str] = {c.id for c in head if c.pinned} | set(always)
    rules = [p for p in (KeepLast(retention.keep_last) if retention.keep_last is not None else None,
                         KeepEvery(retention.keep_every) if retention.keep_every is not None else None) if p]
    records = [_record(c) for c in head]
    for rule in rules:
        kept |= rule.keep(records)
    kept |= {c.id for j, c in enumerate(head) if total - len(head) + j in best}
    return Doomed(frozenset(c.id for c in head) - kept, sealed)


def _exact(index: Index, retention: Retention, always: AbstractSet[str], load: Loader) -> Doomed:
    """:func:`doomed` by reading every segment (a keep_best beyond the references' best values, a keep_every the
    references can't decide, or references summarized for another objective)."""
    loaded = [load(r) for r in index.segments]
    records = [_record(c) for seg in loaded for c in seg] + [_record(c) for c in index.checkpoints]
    ids = retention.plan(records, always=always)
    sealed = {i: frozenset(c.id for c in seg if c.id in ids) for i, seg in enumerate(loaded)}
    return Doomed(frozenset(c.id for c in index.checkpoints if c.id in ids), {i: s for i, s in sealed.items() if s})


def locate(index: Index, ids: AbstractSet[str], load: Loader) -> Doomed:
    """``ids`` found in the head and, only for those not there, in the segments (not the pinned ones there)."""
    head = frozenset(c.id for c in index.checkpoints if c.id in ids)
    rest = set(ids) - head
    sealed = {}
    for i, r in enumerate(index.segments if rest else ()):
        found = frozenset(c.id for c in load(r) if c.id in rest and not c.pinned)
        if found:
            sealed[i] = found
    return Doomed(head, sealed)


def relabel(index: Index, change: Callable[[CheckpointEntry], CheckpointEntry],
            load: Loader) -> tuple[Index, tuple[NewSegment, ...]]:
    """``index`` with ``change`` applied to every entry (pins and tags only: an entry keeps its id and place); each
    segment where it changed one is written again: the index and the segments to write first."""
    refs, made = list(index.segments), []
    for i, ref in enumerate(index.segments):
        entries = load(ref)
        changed = tuple(change(c) for c in entries)
        if changed != entries:
            made.append(encode(changed, index.run.retention.objective))
            refs[i] = made[-1].ref
    head = tuple(change(c) for c in index.checkpoints)
    if head == index.checkpoints and not made:
        return index, ()
    return index.model_copy(update={"checkpoints": head, "segments": tuple(refs), "seq": index.seq + 1}), tuple(made)


def without(index: Index, gone: Doomed,
            load: Loader) -> tuple[Index, tuple[NewSegment, ...], tuple[CheckpointEntry, ...]]:
    """``index`` without the checkpoints ``gone`` names (each segment that loses one written again, or dropped when
    it loses all): the index, the segments to write first and the entries taken out (oldest first)."""
    refs: list[SegmentRef | None] = list(index.segments)
    made, pruned = [], []
    objective = index.run.retention.objective
    for i, ids in sorted(gone.sealed.items()):
        entries = load(index.segments[i])
        pruned += [c for c in entries if c.id in ids]
        left = [c for c in entries if c.id not in ids]
        refs[i] = None
        if left:
            made.append(encode(left, objective))
            refs[i] = made[-1].ref
    pruned += [c for c in index.checkpoints if c.id in gone.head]
    kept = index.model_copy(update={"segments": tuple(r for r in refs if r is not None)})
    return kept.without(set(gone.head)), tuple(made), tuple(pruned)
