"""The run's index and each checkpoint's manifest: pure data, schema validation, selection. No I/O.

The index (``<run>/index.json``) is the only thing readers trust. It lists every committed checkpoint with its files
(relative path, size, checksum), names the best and the latest, and records the run's policy and the current writer
generation (the fence). Everything parsed from storage goes through :func:`parse_index` / :func:`parse_manifest`,
which turn any malformed, hostile or inconsistent document into an :class:`~cloudckpt.errors.IntegrityError`.
"""

from __future__ import annotations

import json
import logging
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    model_serializer,
    model_validator,
)

from .entry import MAX_FILE_SIZE as MAX_FILE_SIZE  # the entry's names, re-exported for existing callers
from .entry import MAX_FILES as MAX_FILES
from .entry import MAX_INLINE_FILE as MAX_INLINE_FILE
from .entry import MAX_INLINE_TOTAL as MAX_INLINE_TOTAL
from .entry import RESUME_STATE_DIR as RESUME_STATE_DIR
from .entry import CheckpointEntry as CheckpointEntry
from .entry import FileEntry as FileEntry
from .entry import _Frozen as _Frozen
from .entry import check_relative_path as check_relative_path
from .entry import utcnow as utcnow
from .errors import CheckpointNotFoundError, IntegrityError
from .index_parts import TOP_SCORES as TOP_SCORES  # the index's parts, re-exported for existing callers
from .index_parts import Applied as Applied
from .index_parts import Condemned as Condemned
from .index_parts import RunPolicy as RunPolicy
from .index_parts import SegmentRef as SegmentRef
from .index_parts import WriterLease as WriterLease
from .labels import LATEST_MODEL
from .layout import INDEX_NAME as INDEX_NAME  # the layout's names, re-exported for existing callers
from .layout import MANIFEST_NAME as MANIFEST_NAME
from .layout import PROBE_DIR as PROBE_DIR
from .layout import TMP_MARK as TMP_MARK
from .retention import Objective, rank_metrics

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1  # the manifest's (and an index without sealed segments: what older cloudckpt reads)
INDEX_VERSION = 2  # an index that references sealed segments; older cloudckpt refuses it (schema_version check)
GC_VERSION = 3  # an index that records gc's condemned names (and horizon); cloudckpt before it refuses it
INDEX_VERSIONS = (SCHEMA_VERSION, INDEX_VERSION, GC_VERSION)
MAX_APPLIED_READ = 1024  # applied-update records an index may carry (writers keep far fewer: commit.MAX_APPLIED)
MAX_CONDEMNED_READ = 4096  # condemned names an index may carry (gc keeps far fewer: condemn.MAX_CONDEMNED)




class Index(_Frozen):
    """The run's index (its head). ``seq`` counts updates; ``checkpoints`` are the most recent ones in commit order
    (oldest first), after the older ones sealed in ``segments`` (oldest first; absent in older indexes);
    ``applied`` holds the last update of each of the most recent writer sessions (bounded; absent in older indexes).
    ``condemned`` are the names gc has condemned (bounded, oldest first) and ``horizon`` the seq of the newest one
    it forgot: a push that began before ``horizon`` is refused; ``reserved`` are checkpoint ids a push uploads again
    after gc condemned its first id, which gc leaves alone (:mod:`cloudckpt.condemn`; all absent until a gc condemns
    something).
    """

    schema_: Literal["cloudckpt/index"] = Field(default="cloudckpt/index", alias="schema")
    schema_version: int = SCHEMA_VERSION
    seq: Annotated[int, Field(ge=0)] = 0
    run: RunPolicy = RunPolicy()
    writer: WriterLease | None = None
    checkpoints: tuple[CheckpointEntry, ...] = ()
    best: str | None = None
    latest: str | None = None
    applied: Annotated[tuple[Applied, ...], Field(max_length=MAX_APPLIED_READ)] = ()
    segments: tuple[SegmentRef, ...] = ()
    condemned: Annotated[tuple[Condemned, ...], Field(max_length=MAX_CONDEMNED_READ)] = ()
    horizon: Annotated[int, Field(ge=0)] = 0
    reserved: Annotated[tuple[Condemned, ...], Field(max_length=MAX_CONDEMNED_READ)] = ()

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, populate_by_name=True)

    @model_validator(mode="after")
    def _consistent(self) -> Index:
        if self.schema_version not in INDEX_VERSIONS:
            raise ValueError(f"unknown index schema_version {self.schema_version} (this cloudckpt reads "
                             f"{', '.join(map(str, INDEX_VERSIONS))})")
        if self.segments and self.schema_version == SCHEMA_VERSION:
            raise ValueError(f"an index with segments must have schema_version {INDEX_VERSION} or {GC_VERSION}")
        if self.gc_state and self.schema_version != GC_VERSION:
            raise ValueError(f"an index with condemned or reserved names must have schema_version {GC_VERSION}")
        if len({c.name for c in self.reserved}) != len(self.reserved):
            raise ValueError("index reserves a name twice")
        if len({c.name for c in self.condemned}) != len(self.condemned):
            raise ValueError("index condemns a name twice")
        ids = [c.id for c in self.checkpoints]
        if len(set(ids)) != len(ids):
            raise ValueError("index lists a checkpoint id twice")
        known = set(ids)
        sealed = {r.best.id for r in self.segments if r.best is not None}
        objective = (self.run.monitor, self.run.mode)
        for r in self.segments:
            if {r.first, r.last} & known or (r.best is not None and r.best.id in known):
                raise ValueError("index lists a checkpoint id twice (in a segment and in the head)")
            if (r.monitor, r.mode) != objective:
                raise ValueError(f"segment {r.sha256[:12]} is summarized for another monitor than the run's")
        if self.latest is not None and self.latest not in known:
            raise ValueError(f"index latest={self.latest!r} is not a listed checkpoint")
        if self.best is not None and self.best not in known | sealed:
            raise ValueError(f"index best={self.best!r} is not a listed checkpoint")
        if (ids or self.segments) and self.latest is None:
            raise ValueError("index lists checkpoints but names no latest")
        return self

    # --- queries -------------------------------------------------------------------------------------------------

    @property
    def gc_state(self) -> bool:
        """Whether the index records anything of gc's protocol (then it is written as schema_version 3)."""
        return bool(self.condemned or self.horizon or self.reserved)

    def get(self, cid: str) -> CheckpointEntry:
        """The entry ``cid`` among the head's checkpoints (and the segments' best ones); CheckpointNotFoundError."""
        for c in self.checkpoints:
            if c.id == cid:
                return c
        for r in self.segments:
            if r.best is not None and r.best.id == cid:
                return r.best
        raise CheckpointNotFoundError(f"no checkpoint {cid!r} in this run")

    def tags(self, cid: str) -> list[str]:
        """The run's names for ``cid`` (``best``, ``latest``); its own labels are in its entry's summary."""
        return [name for name in ("best", "latest") if getattr(self, name) == cid]

    def resolve(self, selector: str | int) -> CheckpointEntry:
        """Find the checkpoint named by ``selector``: ``best``, ``latest``, ``latest-model`` (the newest that holds a
        model), an epoch number, a checkpoint id or a tag.

        On a head with segments one not found may be in a segment (``cloudckpt.segments.full_view``).
        """
        if not self.checkpoints and not self.segments:
            raise CheckpointNotFoundError("the run has no committed checkpoint")
        sel = str(selector)
        if sel == "latest":
            return self.get(self.latest)  # type: ignore[arg-type]
        if sel == "best":
            if self.best is None:
                raise CheckpointNotFoundError(
                    f"no best checkpoint: the run's monitor {self.run.monitor!r} is in no checkpoint's metrics"
                )
            return self.get(self.best)
        if sel == LATEST_MODEL:
            for c in reversed(self.checkpoints):
                if c.holds_model:
                    return c
            raise CheckpointNotFoundError("no checkpoint of this run holds a model (each holds resume state alone)")
        if sel.isdigit():
            matches = [c for c in self.checkpoints if c.epoch == int(sel)]
            if not matches:
                raise CheckpointNotFoundError(f"no checkpoint for epoch {sel}")
            return matches[-1]
        tagged = [c for c in self.checkpoints if sel in c.tags]
        if tagged and not any(c.id == sel for c in self.checkpoints):
            return tagged[-1]
        return self.get(sel)

    # --- pure updates (return a new Index) -------------------------------------------------------------------------

    def with_checkpoint(self, entry: CheckpointEntry) -> Index:
        if any(c.id == entry.id for c in self.checkpoints):
            raise IntegrityError(f"checkpoint {entry.id!r} is already in the index")
        return self._refreshed(self.checkpoints + (entry,), latest=entry.id)

    def without(self, ids: set[str]) -> Index:
        kept = tuple(c for c in self.checkpoints if c.id not in ids)
        latest = self.latest if self.latest not in ids else (kept[-1].id if kept else None)
        return self._refreshed(kept, latest=latest)

    def with_policy(self, run: RunPolicy) -> Index:
        return self._refreshed(self.checkpoints, latest=self.latest, run=run)

    def with_writer(self, writer: WriterLease | None) -> Index:
        return self.model_copy(update={"writer": writer, "seq": self.seq + 1})

    def _refreshed(self, checkpoints: tuple[CheckpointEntry, ...], *, latest: str | None,
                   run: RunPolicy | None = None) -> Index:
        run = run or self.run
        if any((r.monitor, r.mode) != (run.monitor, run.mode) for r in self.segments):
            raise ValueError("a new objective needs the segments summarized again first (segments.retarget)")
        sealed = tuple(r.best for r in self.segments if r.best is not None)  # each segment's best, oldest first
        best = best_of(sealed + checkpoints, run.retention.objective)
        return self.model_copy(
            update={"checkpoints": checkpoints, "latest": latest, "best": best, "run": run, "seq": self.seq + 1}
        )


def best_of(checkpoints: tuple[CheckpointEntry, ...], objective: Objective) -> str | None:
    """Id of the best checkpoint by ``objective`` (ties go to the earliest; one without a model never), or None."""
    ranked = objective.ranked(checkpoints, lambda c: rank_metrics(c.metrics, c.meta))
    return ranked[0].id if ranked else None


class Manifest(_Frozen):
    """A checkpoint's own manifest (``<run>/<id>/_cloudckpt_manifest.json``), written before the index lists it."""

    schema_: Literal["cloudckpt/manifest"] = Field(default="cloudckpt/manifest", alias="schema")
    schema_version: int = SCHEMA_VERSION
    checkpoint: CheckpointEntry
    #: base64 bytes of each file the entry marks ``inline``, by path (checked against the entry by cloudckpt.inline)
    inline: dict[str, Annotated[str, Field(max_length=4 * MAX_INLINE_FILE // 3 + 4)]] = {}

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, populate_by_name=True)

    @model_validator(mode="after")
    def _version(self) -> Manifest:
        if self.schema_version != SCHEMA_VERSION:
            raise ValueError(
                f"unknown manifest schema_version {self.schema_version} (this cloudckpt reads {SCHEMA_VERSION})")
        marked = {f.path for f in self.checkpoint.files if f.inline}
        if set(self.inline) != marked:
            raise ValueError(f"inline contents {sorted(self.inline)} are not the entry's inline files {sorted(marked)}")
        if sum(f.size for f in self.checkpoint.files if f.inline) > MAX_INLINE_TOTAL:
            raise ValueError(f"inline files exceed {MAX_INLINE_TOTAL} bytes")
        return self

    @model_serializer(mode="wrap")
    def _without_empty_inline(self, handler: SerializerFunctionWrapHandler) -> dict:
        data = handler(self)
        if not self.inline:
            data.pop("inline", None)
        return data


M = TypeVar("M", bound=BaseModel)

#: what a read-path error about a malformed index entry tells the user to run
REPAIR_HINT = "`cloudckpt repair --remote URL` rewrites the index without it (its objects are left for `cloudckpt gc`)"
_warned_nulls: set[tuple[object, str]] = set()


def _parse(model: type[M], data: bytes, what: str, *, tolerant: bool = True) -> M:
    """Validate ``data`` as ``model``. ``tolerant``: ``null`` metrics (older cloudckpt's NaN) are read as no value,
    with a warning once per entry and metric; otherwise they are refused as the schema says."""
    dropped: list[tuple[object, str]] = []
    try:
        parsed = model.model_validate_json(data, strict=True, context={"dropped": dropped} if tolerant else None)
    except ValidationError as e:
        err = e.errors()[0]
        version = _schema_version(data)
        known = INDEX_VERSIONS if model is Index else (SCHEMA_VERSION,)
        if version is not None and version not in known:
            raise IntegrityError(f"{what} has schema_version {version}; this cloudckpt reads "
                                 f"{' and '.join(map(str, known))} (upgrade cloudckpt)") from None
        raise IntegrityError(_located(what, data, tuple(err["loc"]), err["msg"])) from None
    for cid, name in dropped:
        if (cid, name) not in _warned_nulls:
            _warned_nulls.add((cid, name))
            log.warning("%s: checkpoint %r has metric %r = null (a NaN or infinite value written by an older "
                        "cloudckpt): read as no value; `cloudckpt repair --remote URL` rewrites the index without it",
                        what, cid, name)
    return parsed


def _located(what: str, data: bytes, loc: tuple[int | str, ...], msg: str) -> str:
    """The message for a validation error at ``loc``: one in a checkpoint entry names the entry and the repair."""
    path = (loc[:2] if loc[:1] == ("checkpoints",) else loc[:3] if loc[:1] == ("segments",) and "best" in loc[2:3]
            else ())
    if len(path) < 2 or not isinstance(loc[1], int):
        return f"{what} is invalid at {'.'.join(map(str, loc)) or '<root>'}: {msg}"
    raw: Any = _raw(data)
    for key in path:
        ok = isinstance(raw, dict) or (isinstance(raw, list) and isinstance(key, int) and key < len(raw))
        raw = raw.get(key) if isinstance(raw, dict) else raw[key] if ok else None
    cid = raw.get("id") if isinstance(raw, dict) else None
    rest = ".".join(map(str, loc[len(path):])) or "<entry>"
    return (f"{what}: checkpoint entry {'.'.join(map(str, path))} (id {cid!r}) is invalid at {rest}: {msg}; "
            f"{REPAIR_HINT}")


def _raw(data: bytes) -> object:
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None


def _schema_version(data: bytes) -> object:
    raw = _raw(data)
    return raw.get("schema_version") if isinstance(raw, dict) else None


def parse_index(data: bytes) -> Index:
    """Parse and validate index bytes; raise IntegrityError on anything malformed."""
    return _parse(Index, data, "index")


def parse_manifest(data: bytes) -> Manifest:
    """Parse and validate manifest bytes; raise IntegrityError on anything malformed."""
    return _parse(Manifest, data, "manifest")


def readable(model: M, data: bytes, what: str) -> bytes:
    """``data`` (``model`` serialized) if this cloudckpt reads it back, strictly (no ``null`` metric tolerated);
    else IntegrityError, raised at the writer before anything is written."""
    try:
        _parse(type(model), data, what, tolerant=False)
    except IntegrityError as e:
        raise IntegrityError(f"refusing to write a {what} this cloudckpt could not read back ({e})") from None
    return data


def dump(model: BaseModel) -> bytes:
    """Serialize an Index or Manifest to JSON bytes, checked to read back (:func:`readable`). An index is written
    with the oldest schema_version that holds it, without the keys it doesn't use, so older readers read what they
    can: no segments and nothing condemned is schema_version 1 (what any cloudckpt reads); segments make it 2; names
    condemned by gc make it 3 (refused, with "upgrade cloudckpt", by versions before it)."""
    what = "index" if isinstance(model, Index) else "manifest"
    if isinstance(model, Index):
        gc = model.gc_state
        version = GC_VERSION if gc else INDEX_VERSION if model.segments else SCHEMA_VERSION
        if model.schema_version != version:
            model = model.model_copy(update={"schema_version": version})
        unused = ({"segments"} if not model.segments else set()) | (set() if gc else {"condemned", "horizon",
                                                                                          "reserved"})
        return readable(model, model.model_dump_json(by_alias=True, indent=None, exclude=unused).encode(), what)
    return readable(model, model.model_dump_json(by_alias=True, indent=None).encode(), what)
