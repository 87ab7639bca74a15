"""A DCP checkpoint's metadata as data: our JSON encoding of DCP's ``Metadata``, validated before use.

DCP pickles its ``Metadata`` into ``.metadata``; cloudckpt never unpickles from a store, so a checkpoint written by
:class:`~cloudckpt.torch.dcp.CloudStorageWriter` carries :data:`METADATA_NAME` instead: every state-dict entry
(a tensor: dtype, global size, the chunks it was saved in; or opaque bytes), and for every stored item the object of
the checkpoint holding it, its byte range and the crc32c of those bytes. :func:`parse_metadata` turns anything
malformed or hostile (not JSON, an object outside the checkpoint, a range past an object's end, a chunk outside its
tensor) into an :class:`~cloudckpt.errors.IntegrityError`. :func:`to_dcp` rebuilds DCP's ``Metadata`` from it
(locally generated objects only), e.g. to write the ``.metadata`` DCP's own ``FileSystemReader`` reads in a pulled
folder (:func:`write_local_metadata`).
"""

from __future__ import annotations

import json
import math
import operator
import pickle
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import pydantic_core
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)

from ..errors import ConfigurationError, IntegrityError
from ..restore import DCP_FORMAT as DCP_FORMAT  # meta["format"] of a checkpoint written through DCP

METADATA_NAME = "dcp_metadata.json"  #: the metadata's file inside a DCP checkpoint
MAX_DIMS = 64
MAX_ITEMS = 1_000_000
_DIM = Annotated[int, Field(ge=0, le=2**48)]

#: dtypes a checkpoint may name (their names in torch, e.g. ``float32``)
DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, name) for name in (
        "float64", "float32", "float16", "bfloat16", "complex64", "complex128", "int64", "int32", "int16", "int8",
        "uint8", "uint16", "uint32", "uint64", "bool", "float8_e4m3fn", "float8_e5m2")
    if isinstance(getattr(torch, name, None), torch.dtype)
}


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


class Chunk(_Strict):
    offsets: Annotated[list[_DIM], Field(max_length=MAX_DIMS)]
    sizes: Annotated[list[_DIM], Field(max_length=MAX_DIMS)]


class TensorItem(_Strict):
    type: Literal["tensor"]
    dtype: str
    size: Annotated[list[_DIM], Field(max_length=MAX_DIMS)]
    requires_grad: bool = False
    chunks: list[Chunk]


class BytesItem(_Strict):
    type: Literal["bytes"]


class Record(_Strict):
    """Where a tensor item's raw bytes are inside the item, and the crc32c of each ``block`` bytes of them."""

    start: Annotated[int, Field(ge=0)]
    size: Annotated[int, Field(ge=0)]
    block: Annotated[int, Field(ge=4096, le=2**30)]
    crc32c: list[Annotated[str, Field(pattern=r"^[0-9a-f]{8}$")]]


class StoredItem(_Strict):
    """One saved item: the DCP key (``fqn`` and, for a tensor chunk, its ``offset``) and where its bytes are."""

    fqn: str
    offset: Annotated[list[_DIM], Field(max_length=MAX_DIMS)] | None = None
    index: Annotated[int, Field(ge=0)] | None = None
    file: str
    start: Annotated[int, Field(ge=0)]
    length: Annotated[int, Field(ge=0)]
    crc32c: Annotated[str, Field(pattern=r"^[0-9a-f]{8}$")]
    record: Record | None = None  # a tensor item's raw bytes: a part of it can be read alone

    def key(self) -> MetadataIndex:
        return MetadataIndex(self.fqn, torch.Size(self.offset) if self.offset is not None else None)


class DcpMetadata(_Strict):
    format: Literal["cloudckpt-dcp"] = "cloudckpt-dcp"
    version: Literal[1] = 1
    dcp_version: str | None = None
    items: dict[str, TensorItem | BytesItem]
    storage: list[StoredItem]
    planner_data: dict[str, list[str | int]] | None = None


def encode(metadata: Metadata, stored: Iterable[StoredItem]) -> bytes:
    """Our JSON of DCP's ``metadata`` with where each item was ``stored``: what :func:`parse_metadata` validates.

    Built as plain data and written in one pass (the coordinator's commit runs it for every rank's items: pydantic
    models per chunk cost ~1 us each, 2,048 of them most of a 32-rank commit's growth); the only rules a torch
    ``Metadata`` can break, a dtype or a rank past what a checkpoint holds, are checked here."""
    items: dict[str, dict[str, Any]] = {}
    for fqn, md in metadata.state_dict_metadata.items():
        if isinstance(md, TensorStorageMetadata):
            dtype = str(md.properties.dtype).removeprefix("torch.")
            if dtype not in DTYPES:
                raise ConfigurationError(f"{fqn}: dtype {dtype} is not one a cloudckpt DCP checkpoint can hold")
            if len(md.size) > MAX_DIMS:
                raise ConfigurationError(f"{fqn}: {len(md.size)} dimensions (a checkpoint holds at most {MAX_DIMS})")
            items[fqn] = {"type": "tensor", "dtype": dtype, "size": list(md.size),
                          "requires_grad": bool(md.properties.requires_grad),
                          "chunks": [{"offsets": list(c.offsets), "sizes": list(c.sizes)} for c in md.chunks]}
        else:
            items[fqn] = {"type": "bytes"}
    planner = metadata.planner_data
    keep_planner = isinstance(planner, dict) and all(
        isinstance(k, str) and isinstance(v, (tuple, list)) and all(isinstance(p, (str, int)) for p in v)
        for k, v in planner.items())
    doc = {"format": "cloudckpt-dcp", "version": 1, "dcp_version": metadata.version,
           "planner_data": {k: list(v) for k, v in planner.items()} if keep_planner else None, "items": items,
           "storage": sorted(stored, key=_order)}
    return pydantic_core.to_json(doc, exclude_none=True)  # None is every optional field's default


def check_dtypes(items: Iterable[Any]) -> None:
    """ConfigurationError naming the first tensor of a save plan's ``items`` whose dtype a checkpoint can't hold."""
    for item in items:
        props = getattr(item, "tensor_data", None)
        dtype = str(props.properties.dtype).removeprefix("torch.") if props is not None else None
        if dtype is not None and dtype not in DTYPES:
            raise ConfigurationError(f"{item.index.fqn}: dtype {dtype} is not one a cloudckpt DCP checkpoint can "
                                     f"hold ({', '.join(DTYPES)})")


_order = operator.attrgetter("file", "start")


def parse_metadata(data: bytes, files: Mapping[str, int]) -> DcpMetadata:
    """Validate the metadata ``data`` of a checkpoint whose stored objects are ``files`` (path -> size)."""
    try:
        raw = json.loads(data)
    except (UnicodeDecodeError, ValueError) as exc:
        raise IntegrityError(f"{METADATA_NAME} is not JSON (a pickled or corrupt metadata object is never "
                             f"loaded): {exc}") from None
    try:
        md = DcpMetadata.model_validate(raw)
    except ValidationError as exc:
        raise IntegrityError(f"{METADATA_NAME} is malformed: {exc.error_count()} problem(s): "
                             f"{exc.errors()[0]['msg']} at {exc.errors()[0]['loc']}") from None
    if len(md.storage) > MAX_ITEMS:
        raise IntegrityError(f"{METADATA_NAME}: {len(md.storage)} stored items (at most {MAX_ITEMS})")
    for fqn, item in md.items.items():
        if isinstance(item, TensorItem):
            _check_tensor(fqn, item)
    seen: set[MetadataIndex] = set()
    for s in md.storage:
        _check_stored(s, md.items, files)
        if s.key() in seen:
            raise IntegrityError(f"{METADATA_NAME}: item {s.fqn} {s.offset} is stored twice")
        seen.add(s.key())
    return md


def _check_tensor(fqn: str, item: TensorItem) -> None:
    if item.dtype not in DTYPES:
        raise IntegrityError(f"{METADATA_NAME}: {fqn}: unknown dtype {item.dtype!r}")
    for c in item.chunks:
        if len(c.offsets) != len(item.size) or len(c.sizes) != len(item.size) or any(
                o + n > dim for o, n, dim in zip(c.offsets, c.sizes, item.size, strict=True)):
            raise IntegrityError(f"{METADATA_NAME}: {fqn}: chunk at {c.offsets} of size {c.sizes} is outside the "
                                 f"tensor's size {item.size}")


def _check_stored(s: StoredItem, items: Mapping[str, TensorItem | BytesItem], files: Mapping[str, int]) -> None:
    if s.file not in files:
        raise IntegrityError(f"{METADATA_NAME}: item {s.fqn} names {s.file!r}, not an object of this checkpoint")
    if s.start + s.length > files[s.file]:
        raise IntegrityError(f"{METADATA_NAME}: item {s.fqn} at bytes {s.start}..{s.start + s.length} runs past "
                             f"the end of {s.file} ({files[s.file]} bytes)")
    item = items.get(s.fqn)
    if item is None:
        raise IntegrityError(f"{METADATA_NAME}: stored item {s.fqn!r} is not in the state dict's metadata")
    if isinstance(item, TensorItem):
        if s.offset is None or chunk_of(item, s.offset) is None:
            raise IntegrityError(f"{METADATA_NAME}: stored item {s.fqn} {s.offset} is not a chunk of the tensor")
        chunk = chunk_of(item, s.offset)
        assert chunk is not None
        if math.prod(chunk.sizes) * DTYPES[item.dtype].itemsize > s.length:
            raise IntegrityError(f"{METADATA_NAME}: item {s.fqn} {s.offset}: {s.length} bytes can't hold a chunk "
                                 f"of size {chunk.sizes} ({item.dtype})")
        rec = s.record
        if rec is not None and (rec.start + rec.size > s.length or rec.size != math.prod(chunk.sizes) *
                                DTYPES[item.dtype].itemsize or len(rec.crc32c) != -(-rec.size // rec.block)):
            raise IntegrityError(f"{METADATA_NAME}: item {s.fqn} {s.offset}: its record ({rec.start}+{rec.size}, "
                                 f"{len(rec.crc32c)} blocks) doesn't fit the item or the chunk")
    elif s.offset is not None or s.record is not None:
        raise IntegrityError(f"{METADATA_NAME}: bytes item {s.fqn} has a tensor offset or record")


def chunk_of(item: TensorItem, offset: list[int]) -> Chunk | None:
    """The chunk of ``item`` saved at ``offset``, or None."""
    return next((c for c in item.chunks if c.offsets == offset), None)


def to_dcp(md: DcpMetadata, storage: Mapping[MetadataIndex, Any]) -> Metadata:
    """DCP's ``Metadata`` for ``md`` (built here, never unpickled), with ``storage`` as its ``storage_data``."""
    sd: dict[str, TensorStorageMetadata | BytesStorageMetadata] = {}
    for fqn, item in md.items.items():
        if isinstance(item, TensorItem):
            props = TensorProperties(dtype=DTYPES[item.dtype], requires_grad=item.requires_grad)
            sd[fqn] = TensorStorageMetadata(properties=props, size=torch.Size(item.size), chunks=[
                ChunkStorageMetadata(offsets=torch.Size(c.offsets), sizes=torch.Size(c.sizes)) for c in item.chunks])
        else:
            sd[fqn] = BytesStorageMetadata()
    planner = {k: tuple(v) for k, v in md.planner_data.items()} if md.planner_data is not None else None
    return Metadata(state_dict_metadata=sd, planner_data=planner, storage_data=dict(storage),
                    storage_meta=StorageMeta(), version=md.dcp_version)


def write_local_metadata(folder: Path, files: Mapping[str, int]) -> None:
    """Write the ``.metadata`` DCP's ``FileSystemReader`` reads into a pulled ``folder``, from its validated
    :data:`METADATA_NAME` (pickled here, from objects built here: nothing of the store's is unpickled)."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    md = parse_metadata((folder / METADATA_NAME).read_bytes(), files)
    storage = {s.key(): _StorageInfo(s.file, s.start, s.length) for s in md.storage}
    (folder / ".metadata").write_bytes(pickle.dumps(to_dcp(md, storage)))
