"""A sharded Keras checkpoint's metadata as data: which bytes of which object hold which part of each variable.

A checkpoint saved from a multi-process JAX job whose variables are split across the processes (see
:mod:`cloudckpt.keras.shards`) holds, besides ``cloudckpt_state/``, one object of raw array bytes per process
(``cloudckpt_shards/p<process>.bin``, each shard's values in C order, nothing pickled) and :data:`METADATA`, a JSON
document: for every model and optimizer variable its key in the resume state's layout (``model_3``), path, dtype
and global shape, and for each of its distinct shards the box it covers (``[start, stop)`` per dimension), the object
holding it, the byte range there and the crc32c of those bytes.

The metadata is read from the store, so :func:`parse_metadata` checks it as hostile input before anything is read
with it: a shard naming an object that is not a shard object of this checkpoint, a byte range past an object's end,
a range whose length does not fit its box, boxes outside the variable, overlapping or leaving part of it uncovered —
each an :class:`~cloudckpt.errors.IntegrityError`.

Example:
    >>> md = ShardMetadata(processes=1, variables=[Variable(key="model_0", path="d/kernel", dtype="float32",
    ...     shape=[2, 2], shards=[Shard(box=[[0, 2], [0, 2]], object="cloudckpt_shards/p00000.bin", start=0,
    ...     length=16, crc32c="00000000")])])
    >>> parse_metadata(md.model_dump_json().encode(), {"cloudckpt_shards/p00000.bin": 16}).variables[0].key
    'model_0'
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import ConfigurationError, IntegrityError

SHARD_DIR = "cloudckpt_shards"
METADATA = f"{SHARD_DIR}/metadata.json"  #: a checkpoint holding this was saved shard by shard
MAX_DIMS = 32
MAX_SHARDS = 4096  #: per variable
MAX_VARIABLES = 100_000
_DIM = Annotated[int, Field(ge=0, le=2**48)]
_KEY = r"^(model|optimizer)_(0|[1-9][0-9]{0,6})$"
#: dtypes a sharded checkpoint may hold (numpy names; bfloat16 and the float8 types through ml_dtypes, a JAX
#: dependency)
DTYPES = ("float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint64", "uint32",
          "uint16", "uint8", "bool", "complex64", "complex128")

Box = tuple[tuple[int, int], ...]  # [start, stop) per dimension


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


class Shard(_Strict):
    """One distinct part of a variable: the ``box`` it covers and where its raw bytes are."""

    box: Annotated[list[Annotated[list[_DIM], Field(min_length=2, max_length=2)]], Field(max_length=MAX_DIMS)]
    object: str
    start: Annotated[int, Field(ge=0)]
    length: Annotated[int, Field(ge=0)]
    crc32c: Annotated[str, Field(pattern=r"^[0-9a-f]{8}$")]

    def extent(self) -> Box:
        return tuple((a, b) for a, b in self.box)


class Variable(_Strict):
    """One model or optimizer variable: its key in the resume state's layout, path, dtype, shape and shards."""

    key: Annotated[str, Field(pattern=_KEY)]
    path: str
    dtype: str
    shape: Annotated[list[_DIM], Field(max_length=MAX_DIMS)]
    shards: Annotated[list[Shard], Field(max_length=MAX_SHARDS)]


class ShardMetadata(_Strict):
    format: Literal["cloudckpt-keras-shards"] = "cloudckpt-keras-shards"
    version: Literal[1] = 1
    processes: Annotated[int, Field(ge=1, le=2**20)]
    variables: Annotated[list[Variable], Field(max_length=MAX_VARIABLES)]


def numpy_dtype(name: str) -> np.dtype:
    """The numpy dtype a checkpoint names (one of :data:`DTYPES`); ConfigurationError for any other."""
    if name not in DTYPES:
        raise ConfigurationError(f"dtype {name} is not one a sharded checkpoint can hold ({', '.join(DTYPES)})")
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def box_size(box: Box) -> int:
    """Elements in ``box``."""
    return math.prod(b - a for a, b in box)


def intersect(a: Box, b: Box) -> Box | None:
    """The box both cover, or None."""
    out = tuple((max(x0, y0), min(x1, y1)) for (x0, x1), (y0, y1) in zip(a, b, strict=True))
    return out if all(lo < hi for lo, hi in out) or (not out) else None


def shard_object(process: int) -> str:
    """The object of the checkpoint holding process ``process``'s shards."""
    return f"{SHARD_DIR}/p{process:05d}.bin"


def parse_metadata(data: bytes, files: Mapping[str, int]) -> ShardMetadata:
    """Validate the metadata ``data`` of a checkpoint whose stored objects are ``files`` (path -> size)."""
    try:
        raw = json.loads(data)
    except (UnicodeDecodeError, ValueError) as exc:
        raise IntegrityError(f"{METADATA} is not JSON: {exc}") from None
    try:
        md = ShardMetadata.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise IntegrityError(f"{METADATA} is malformed: {exc.error_count()} problem(s): {err['msg']} at "
                             f"{err['loc']}") from None
    keys: set[str] = set()
    for v in md.variables:
        if v.key in keys:
            raise IntegrityError(f"{METADATA}: variable {v.key} is listed twice")
        keys.add(v.key)
        _check_variable(v, files)
    return md


def _check_variable(v: Variable, files: Mapping[str, int]) -> None:
    if v.dtype not in DTYPES:
        raise IntegrityError(f"{METADATA}: {v.key} ({v.path}): unknown dtype {v.dtype!r}")
    itemsize = numpy_dtype(v.dtype).itemsize
    boxes: list[Box] = []
    for s in v.shards:
        where = f"{METADATA}: {v.key} ({v.path}) shard {s.box}"
        if not s.object.startswith(SHARD_DIR + "/") or s.object == METADATA or s.object not in files:
            raise IntegrityError(f"{where} names {s.object!r}, not a shard object of this checkpoint")
        if s.start + s.length > files[s.object]:
            raise IntegrityError(f"{where}: bytes {s.start}..{s.start + s.length} run past the end of {s.object} "
                                 f"({files[s.object]} bytes)")
        box = s.extent()
        if len(box) != len(v.shape) or any(not 0 <= a <= b <= d for (a, b), d in zip(box, v.shape, strict=True)):
            raise IntegrityError(f"{where} is outside the variable's shape {v.shape}")
        if s.length != box_size(box) * itemsize:
            raise IntegrityError(f"{where}: {s.length} bytes, but its box holds {box_size(box)} {v.dtype} values")
        boxes.append(box)
    if sum(box_size(b) for b in boxes) != math.prod(v.shape) or _overlap(boxes):
        raise IntegrityError(f"{METADATA}: {v.key} ({v.path}): its shards don't cover its shape {v.shape} exactly "
                             f"once")


def _overlap(boxes: Sequence[Box]) -> bool:
    """Whether two of ``boxes`` (non-empty ones) share an element."""
    full = [b for b in boxes if box_size(b) > 0]
    return any(intersect(full[i], full[j]) is not None for i in range(len(full)) for j in range(i + 1, len(full)))
