"""Repairing a run's index: what ``cloudckpt repair`` rewrites (a pure function of the stored bytes), and writing it.

A reader refuses an index with a malformed checkpoint entry and names the entry (:mod:`cloudckpt.manifest`); it
reads a ``null`` metric (what older cloudckpt wrote for NaN or infinity) as no value. :func:`plan_repair` reads the
index (and its sealed segments) entry by entry and proposes the index without what is wrong:

- a ``null`` metric is dropped (the entry is kept: its files are as trusted as any other's);
- an entry that fails validation (id, files, sizes, checksums, anything), or repeats an id listed before it, is
  removed: it is never acted on, its objects become leftovers for ``cloudckpt gc``.

The latest and best are recomputed from what is kept. A segment with a problem is not patched in place: every sealed
entry is brought back into the head and sealed again into new segment objects (the old ones are left for gc).
What repair can't fix (an index that is not JSON, a malformed run policy or writer lease, a missing or altered
segment) raises :class:`~cloudckpt.errors.IntegrityError` and nothing is written. :func:`repair_index` writes the
proposed index with the same compare-and-swap as every update (a lost race: read and plan again).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass

from pydantic import ValidationError

from . import layout, retry
from .backends import Backend
from .errors import CheckpointNotFoundError, IndexConflictError, IntegrityError, TransferError
from .manifest import CheckpointEntry, Index, SegmentRef, dump, parse_index
from .segments import NewSegment, Sealing, check, seal

log = logging.getLogger(__name__)

_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Problem:
    """One thing repair fixes: where (``index`` or ``index segment <digest>``), the entry's id as stored (None when
    it has none) and what is done about it."""

    where: str
    id: object
    fix: str

    def __str__(self) -> str:
        return f"{self.where}: {self.id!r}: {self.fix}"


@dataclass(frozen=True)
class RepairPlan:
    """The problems found, and the index to write (None when there is nothing to fix) with the segments to write
    before it."""

    problems: tuple[Problem, ...]
    index: Index | None = None
    segments: tuple[NewSegment, ...] = ()


def _error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    return f"invalid at {'.'.join(map(str, err['loc'])) or '<entry>'}: {err['msg']}"


def _entries(raw: object, where: str, seen: set[str]) -> tuple[list[CheckpointEntry], list[Problem]]:
    """The valid entries of the stored list ``raw`` (null metrics dropped), and what was wrong."""
    kept, problems = [], []
    for item in raw if isinstance(raw, list) else []:
        cid = item.get("id") if isinstance(item, dict) else None
        dropped: list[tuple[object, str]] = []
        try:
            entry = CheckpointEntry.model_validate_json(json.dumps(item), strict=True, context={"dropped": dropped})
        except ValidationError as exc:
            problems.append(Problem(where, cid, f"entry removed ({_error(exc)})"))
            continue
        if entry.id in seen:
            problems.append(Problem(where, cid, "entry removed (the id is listed before it)"))
            continue
        seen.add(entry.id)
        problems += [Problem(where, cid, f"metric {name!r} is null: dropped (no value)") for _, name in dropped]
        kept.append(entry)
    if raw is not None and not isinstance(raw, list):
        problems.append(Problem(where, None, "checkpoints is not a list: emptied"))
    return kept, problems


def _segment(ref: object, read: Callable[[str], bytes], seen: set[str]
             ) -> tuple[list[CheckpointEntry], list[Problem], bool]:
    """The valid entries of the segment ``ref`` (stored form) references, what was wrong, and whether ``ref`` still
    holds as it is (no problem in the segment or in the reference)."""
    sha = ref.get("sha256") if isinstance(ref, dict) else None
    if not isinstance(sha, str) or not _SHA256.fullmatch(sha):
        raise IntegrityError(f"index: a segment reference has no valid sha256 ({sha!r}); repair can't find its "
                             "checkpoints")
    where = f"index segment {sha[:12]}"
    try:
        data = read(sha)
    except FileNotFoundError:
        raise IntegrityError(f"{where} is missing; repair can't restore its checkpoints") from None
    if hashlib.sha256(data).hexdigest() != sha:
        raise IntegrityError(f"{where}: its bytes are not the ones the index references (altered); repair can't "
                             "trust them")
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise IntegrityError(f"{where} is not JSON; repair can't read its checkpoints") from None
    entries, problems = _entries(doc.get("checkpoints") if isinstance(doc, dict) else None, where, seen)
    dropped: list[tuple[object, str]] = []
    try:
        parsed = SegmentRef.model_validate_json(json.dumps(ref), strict=True, context={"dropped": dropped})
        holds = bool(entries) and not problems and not dropped and check(parsed, tuple(entries)) is not None
    except (ValidationError, IntegrityError):
        holds = False
    if dropped or not holds and not problems:
        problems.append(Problem("index", sha[:12], "segment reference summarized again"))
    return entries, problems, holds


def plan_repair(data: bytes, read_segment: Callable[[str], bytes], sealing: Sealing) -> RepairPlan:
    """What repair writes for the stored index ``data`` (``read_segment``: a segment's bytes by digest)."""
    try:
        raw = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raw = None
    if not isinstance(raw, dict):
        raise IntegrityError("index is not a JSON object; repair can't rebuild it")
    seen: set[str] = set()
    sealed, problems, holds = [], [], True
    refs_raw = raw.get("segments") or []
    if not isinstance(refs_raw, list):
        raise IntegrityError("index: segments is not a list; repair can't find its checkpoints")
    for ref in refs_raw:
        entries, found, ok = _segment(ref, read_segment, seen)
        sealed.append(entries)
        problems += found
        holds = holds and ok
    head, found = _entries(raw.get("checkpoints", []), "index", seen)
    problems += found
    if not problems:
        try:
            parse_index(data)
            return RepairPlan(())
        except IntegrityError as exc:  # every entry is sound, but not the whole (best, latest...): rebuild it
            problems.append(Problem("index", None, f"rebuilt from its entries ({exc})"))
            holds = False
    try:
        base = Index.model_validate_json(json.dumps({**raw, "checkpoints": [], "segments": [], "best": None,
                                                     "latest": None}), strict=True, context={"dropped": []})
    except ValidationError as exc:
        raise IntegrityError(f"index is {_error(exc)}, outside its checkpoint entries; repair can't fix that") from None
    objective = (base.run.monitor, base.run.mode)
    holds = holds and all(isinstance(r, dict) and (r.get("monitor"), r.get("mode", "min")) == objective
                          for r in refs_raw)  # else summarized again by sealing anew
    keep_refs = holds and bool(head)
    refs = tuple(SegmentRef.model_validate_json(json.dumps(r), strict=True, context={"dropped": []})
                 for r in refs_raw) if keep_refs else ()
    listed = tuple(head) if keep_refs else tuple(e for seg in sealed for e in seg) + tuple(head)
    ids = {e.id for e in listed}
    stored = raw.get("latest")
    latest = stored if isinstance(stored, str) and stored in ids else (listed[-1].id if listed else None)
    index = base.model_copy(update={"segments": refs})
    index = index._refreshed(listed, latest=latest)  # best recomputed from what is kept
    index, made = seal(index, sealing, lambda r: _loaded(r, refs, sealed))
    return RepairPlan(tuple(problems), index, made)


def _loaded(ref: SegmentRef, refs: tuple[SegmentRef, ...], sealed: list[list[CheckpointEntry]]
            ) -> tuple[CheckpointEntry, ...]:
    """A kept segment's entries (already read and checked) for sealing."""
    return tuple(sealed[refs.index(ref)])


def repair_index(backend: Backend, *, budget: float, dry_run: bool = False) -> RepairPlan:
    """Plan the repair of the run at ``backend`` and, unless ``dry_run``, write it: the new segments first, then the
    index with compare-and-swap against the version planned from. Returns the plan carried out."""
    sealing = Sealing.from_env()

    def read_segment(sha: str) -> bytes:
        key = layout.segment_key(sha)
        return retry.run(lambda: backend.read_bytes(key), url=backend.url, what=f"read {key}", budget=budget)

    for _ in range(20):
        data, token = retry.run(lambda: backend.read_index(None), url=backend.url, what="read index", budget=budget)
        if data is None:
            raise CheckpointNotFoundError(f"no cloudckpt run at {backend.url} (no index.json there)")
        plan = plan_repair(data, read_segment, sealing)
        if plan.index is None or dry_run:
            return plan
        backend.ensure_conditional_writes(budget)
        for seg in plan.segments:
            retry.run(lambda seg=seg: backend.write_bytes(seg.key, seg.data), url=backend.url,  # type: ignore[misc]
                      what=f"write {seg.key}", budget=budget)
        data = dump(plan.index)
        try:
            backend.write_index(data, token)  # not retried: a lost answer would be re-planned from the repaired index
        except IndexConflictError:
            continue
        for problem in plan.problems:
            log.info("repaired %s: %s", backend.url, problem)
        return plan
    raise TransferError(f"{backend.url}: repair kept losing the index race to writers; nothing was written")
