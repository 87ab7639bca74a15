"""A checkpoint as the index lists it: its entry (id, step, metrics, labels, metadata) and its files (relative path,
size, checksum). Pure data and schema validation; the documents that hold entries are in :mod:`cloudckpt.manifest`.
"""

from __future__ import annotations

import math
import re
from datetime import datetime, timezone
from typing import Annotated

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)

from .errors import UnsafePathError
from .labels import MAX_TAGS, tag_problem
from .layout import is_checkpoint_id, reserved_path_problem
from .retention import holds_model

MAX_FILES = 100_000
MAX_FILE_SIZE = 2**50  # 1 PiB: anything larger is a corrupt or hostile index
MAX_INLINE_FILE = 256 * 1024  # bytes of one file a manifest may carry inline (cloudckpt.inline picks them)
MAX_INLINE_TOTAL = 1024 * 1024  # bytes of all inline files of one checkpoint
RESUME_STATE_DIR = "cloudckpt_state"  # the Keras callback's resume state in a checkpoint
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_DRIVE = re.compile(r"^[A-Za-z]:")


def check_relative_path(path: str) -> str:
    """Return ``path`` if it is a safe relative POSIX path inside a checkpoint, else raise UnsafePathError."""
    if not isinstance(path, str) or not path or len(path) > 1024:
        raise UnsafePathError(f"unsafe path in manifest: {path!r} (empty or too long)")
    if path[0] == "/" or "\\" in path or _DRIVE.match(path):
        raise UnsafePathError(f"unsafe path in manifest: {path!r} (absolute)")
    if _CONTROL.search(path):
        raise UnsafePathError(f"unsafe path in manifest: {path!r} (control character)")
    wrapped = f"/{path}/"
    if "//" in wrapped or "/./" in wrapped or "/../" in wrapped:
        raise UnsafePathError(f"unsafe path in manifest: {path!r} (empty, '.' or '..' component)")
    reserved = reserved_path_problem(path)
    if reserved:
        raise UnsafePathError(f"unsafe path in manifest: {path!r} ({reserved})")
    return path


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


class FileEntry(_Frozen):
    """One file of a checkpoint: its path relative to the checkpoint, size in bytes and checksum(s).

    ``inline``: its bytes ride inside the checkpoint's manifest object (:mod:`cloudckpt.inline`), not in an object of
    their own; written to JSON only when true, so an entry without it is what older cloudckpt versions wrote.
    """

    path: str
    size: Annotated[int, Field(ge=0, le=MAX_FILE_SIZE)]
    crc32c: Annotated[str, Field(pattern=r"^[0-9a-f]{8}$")] | None = None  # checked natively: fast at scale
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")] | None = None
    inline: bool = False

    @model_serializer(mode="wrap")
    def _without_default_inline(self, handler: SerializerFunctionWrapHandler) -> dict:
        data = handler(self)
        if not self.inline:
            data.pop("inline", None)
        return data

    @field_validator("path")
    @classmethod
    def _path(cls, v: str) -> str:
        try:
            return check_relative_path(v)
        except UnsafePathError as e:
            raise ValueError(str(e)) from None

    @model_validator(mode="after")
    def _checksum(self) -> FileEntry:
        if self.crc32c is None and self.sha256 is None:
            raise ValueError(f"file {self.path!r} has no checksum")
        if self.inline and self.size > MAX_INLINE_FILE:
            raise ValueError(f"inline file {self.path!r} is {self.size} bytes (at most {MAX_INLINE_FILE})")
        return self


class CheckpointEntry(_Frozen):
    """A committed checkpoint as the index lists it."""

    id: str
    epoch: Annotated[int, Field(ge=0)] | None = None
    step: Annotated[int, Field(ge=0)] | None = None
    created: datetime
    metrics: dict[str, float] = {}
    files: tuple[FileEntry, ...]
    size: Annotated[int, Field(ge=0)]
    writer: str | None = None
    pinned: bool = False
    meta: dict[str, str] = {}
    #: names a user gave it (``cloudckpt tag``; :mod:`cloudckpt.labels`); written to JSON only when there are some
    tags: Annotated[tuple[str, ...], Field(max_length=MAX_TAGS)] = ()

    @model_serializer(mode="wrap")
    def _without_empty_tags(self, handler: SerializerFunctionWrapHandler) -> dict:
        data = handler(self)
        if not self.tags:
            data.pop("tags", None)
        return data

    @field_validator("metrics", mode="before")
    @classmethod
    def _null_metrics(cls, v: object, info: ValidationInfo) -> object:
        """On a tolerant read (``info.context`` holds a ``"dropped"`` list): a ``null`` metric, what older cloudckpt
        wrote for a NaN or infinite value, is read as no value (left out, noted in the list with the entry's id)."""
        dropped = info.context.get("dropped") if isinstance(info.context, dict) else None
        if dropped is None or not isinstance(v, dict) or None not in v.values():
            return v
        dropped.extend((info.data.get("id"), k) for k, x in v.items() if x is None)
        return {k: x for k, x in v.items() if x is not None}

    @field_validator("id")
    @classmethod
    def _id(cls, v: str) -> str:
        if not is_checkpoint_id(v):
            raise ValueError(f"invalid checkpoint id {v!r}")
        return v

    @field_validator("tags")
    @classmethod
    def _tags(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for name in v:
            problem = tag_problem(name)
            if problem:
                raise ValueError(problem)
        if len(set(v)) != len(v):
            raise ValueError("a tag is listed twice")
        return v

    @field_validator("metrics")
    @classmethod
    def _metrics(cls, v: dict[str, float]) -> dict[str, float]:
        for name, value in v.items():
            if not name or len(name) > 200:
                raise ValueError(f"invalid metric name {name!r}")
            if not math.isfinite(value):  # JSON has no NaN/inf: cloudckpt.metrics records them as no value
                raise ValueError(f"metric {name!r} is {value} (not finite)")
        return v

    @model_validator(mode="after")
    def _files(self) -> CheckpointEntry:
        if not self.files:
            raise ValueError(f"checkpoint {self.id!r} lists no files")
        if len(self.files) > MAX_FILES:
            raise ValueError(f"checkpoint {self.id!r} lists {len(self.files)} files (more than {MAX_FILES})")
        paths = {f.path for f in self.files}
        if len(paths) != len(self.files):
            raise ValueError(f"checkpoint {self.id!r} lists a file twice")
        prefixes = set()
        for p in paths:
            while "/" in p:
                p = p.rsplit("/", 1)[0]
                prefixes.add(p)
        if prefixes & paths:
            raise ValueError(f"checkpoint {self.id!r} lists a file that is also a directory")
        if sum(f.size for f in self.files) != self.size:
            raise ValueError(f"checkpoint {self.id!r}: size {self.size} is not the sum of its files")
        return self

    @property
    def holds_model(self) -> bool:
        """Whether it holds a model: every checkpoint but resume state alone (:func:`retention.holds_model`)."""
        return holds_model(self.meta)

    @property
    def model_file(self) -> str | None:
        """The model file's path in the checkpoint when the writer recorded it (the Keras callback, Lightning)."""
        if not self.holds_model:
            return None
        name = self.meta.get("file") or self.meta.get("name")
        return name if name in {f.path for f in self.files} else None

    def unlabeled(self) -> CheckpointEntry:
        """The entry as committed: without the labels set later (``pinned``, ``tags``), as its manifest holds it."""
        return self.model_copy(update={"pinned": False, "tags": ()})

    def summary(self, tags: list[str] | None = None) -> dict:
        """The entry as plain JSON data, one schema for ``ls``/``show``/``pull``/``push --json``: the entry's
        fields, ``tags`` (the run's ``tags`` given, e.g. best and latest, then ``pinned`` and the user's tags),
        ``model`` (whether it holds a model), ``model_file`` (its path, when known) and ``resume_state`` (whether
        it holds the Keras callback's ``cloudckpt_state/``)."""
        data = self.model_dump(mode="json")
        data["tags"] = [*(tags or []), *(["pinned"] if self.pinned else []), *self.tags]
        data["model"] = self.holds_model
        data["model_file"] = self.model_file
        data["resume_state"] = any(f.path.startswith(RESUME_STATE_DIR + "/") for f in self.files)
        return data


def utcnow() -> datetime:
    return datetime.now(timezone.utc)
