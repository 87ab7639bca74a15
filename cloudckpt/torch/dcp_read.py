"""Reading a committed DCP checkpoint: which one (every rank the same), its validated metadata, and the items a
rank's load plan needs as ranged reads, neighbours coalesced, each item checked against its crc32c before use."""

from __future__ import annotations

import io
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import google_crc32c
import torch
from torch.distributed.checkpoint.metadata import Metadata

from .. import layout, retry
from ..errors import ConfigurationError, IntegrityError
from ..inline import stored_files
from ..manifest import CheckpointEntry
from ..store import CheckpointStore
from ..transfer import _run_all
from .dcp_format import (
    DCP_FORMAT,
    DTYPES,
    METADATA_NAME,
    BytesItem,
    DcpMetadata,
    StoredItem,
    TensorItem,
    chunk_of,
    parse_metadata,
    to_dcp,
)
from .dcp_items import block_crcs, decode_rows, decode_tensor, safe_bytes_item


def _agreed(store: CheckpointStore, selector: str | int) -> CheckpointEntry:
    """The checkpoint ``selector`` names. ``latest`` and ``best`` move as checkpoints are committed: under
    ``torch.distributed`` every rank takes the one rank 0 resolved (a broadcast on the default process group); an id
    or a step names one checkpoint, resolved by each rank alone."""
    dist = torch.distributed
    moving = selector in ("latest", "best")
    if not (moving and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return store.get(selector)
    box: list[Any] = [store.get(selector).id if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return store.get(str(box[0]))


def resolve_entry(store: CheckpointStore, selector: str | int) -> tuple[CheckpointEntry, DcpMetadata, Metadata]:
    """The checkpoint, its validated metadata, and DCP's ``Metadata`` built from it (``storage_data``: our items)."""
    entry = _agreed(store, selector)
    if entry.meta.get("format") != DCP_FORMAT:
        raise ConfigurationError(f"{store.url}: checkpoint {entry.id} was not written through DCP "
                                 f"(CloudStorageWriter); pull it or restore it with the adapter that wrote it")
    files = {f.path: f for f in stored_files(entry.files)}
    md_file = files.get(METADATA_NAME)
    if md_file is None:
        raise IntegrityError(f"{store.url}: checkpoint {entry.id} lists no {METADATA_NAME}")
    rel = layout.object_key(entry.id, METADATA_NAME)
    data = _read(store, rel, 0, md_file.size)
    if md_file.crc32c is not None and google_crc32c.Checksum(data).digest().hex() != md_file.crc32c:
        raise IntegrityError(f"{store.url}/{rel}: checksum mismatch with the index")
    md = parse_metadata(data, {p: f.size for p, f in files.items() if p != METADATA_NAME})
    return entry, md, to_dcp(md, {s.key(): s for s in md.storage})


def _read(store: CheckpointStore, rel: str, start: int, length: int) -> bytes:
    try:
        return retry.run(lambda: store.backend.read_range(rel, start, length), url=store.url, what=f"read {rel}",
                         budget=store.budget)
    except FileNotFoundError as exc:
        raise IntegrityError(f"{store.url}/{rel}: listed in the index but missing from the store") from exc


class Span(Protocol):
    """Something stored at ``length`` bytes from ``start`` in ``file``."""

    @property
    def file(self) -> str: ...
    @property
    def start(self) -> int: ...
    @property
    def length(self) -> int: ...


S = TypeVar("S", bound=Span)


@dataclass(frozen=True)
class Piece:
    """One byte range to fetch: a whole item, or (``blocks``: ``[lo, hi)``) the blocks of a tensor item's raw record
    that hold rows ``rows`` of it."""

    file: str
    start: int
    length: int
    item: StoredItem
    blocks: tuple[int, int] | None = None
    rows: tuple[int, int] | None = None

    def key(self) -> tuple[str, int, int]:
        return self.file, self.start, self.length


def piece_for(s: StoredItem, item: TensorItem | BytesItem, offsets: Sequence[int], lengths: Sequence[int]) -> Piece:
    """What to fetch of ``s`` for the part of it at ``offsets``/``lengths``: the blocks holding the rows wanted
    when the part is some of its rows (every dimension but the first taken whole) and they leave out a block or
    more, else the whole item."""
    whole = Piece(s.file, s.start, s.length, s)
    rec = s.record
    if not isinstance(item, TensorItem) or rec is None or not lengths:
        return whole
    sizes = chunk_of(item, s.offset or [])
    assert sizes is not None
    dims = sizes.sizes
    if any(o != 0 or n != d for o, n, d in zip(offsets[1:], lengths[1:], dims[1:], strict=True)):
        return whole
    row = math.prod(dims[1:]) * DTYPES[item.dtype].itemsize
    a, b = offsets[0], offsets[0] + lengths[0]
    if (a, b) == (0, dims[0]):
        return whole  # every row: the item as saved (one checksum; adjacent items coalesce)
    lo, hi = a * row // rec.block, -(-(b * row) // rec.block)
    if (lo, hi) == (0, len(rec.crc32c)):
        return whole  # every block anyway: the item as saved
    first, last = lo * rec.block, min(hi * rec.block, rec.size)
    return Piece(s.file, s.start + rec.start + first, last - first, s, (lo, hi), (a, b))


ALONE = 4 << 20  #: an item this big is read alone: its bytes are the read's, decoded in place (no copy)


def ranges(items: Iterable[S], coalesce: int, alone: int = ALONE) -> list[tuple[str, int, int, list[S]]]:
    """Ranged reads for ``items``: ``(file, start, length, items in it)``, adjacent items of one file merged while
    the read stays within ``coalesce`` bytes, except items of ``alone`` bytes or more, each read by itself (big
    enough for a request of its own; cutting it out of a merged read would copy it). Nothing between two
    non-adjacent items is read."""
    out: list[tuple[str, int, int, list[S]]] = []
    for s in sorted(items, key=lambda s: (s.file, s.start)):
        if out and s.length < alone:
            file, start, length, group = out[-1]
            if file == s.file and start + length == s.start and length + s.length <= coalesce and \
                    group[-1].length < alone:
                out[-1] = (file, start, length + s.length, [*group, s])
                continue
        out.append((s.file, s.start, s.length, [s]))
    return out


Want = tuple[StoredItem, Sequence[int], Sequence[int]]  # an item, and the part of it wanted (offsets, lengths)


def read_items(store: CheckpointStore, cid: str, wanted: Sequence[Want], items: Mapping[str, Any], *,
               coalesce: int, stats: dict[str, int]) -> list[torch.Tensor | io.BytesIO]:
    """Each wanted part: the tensor of exactly that part, or a bytes item. Fetched as ranged reads in parallel
    (only the pieces needed: whole items, or the blocks of a record holding the rows wanted), every piece checked
    against its crc32c(s) before it is decoded."""
    pieces = [piece_for(s, items[s.fqn], offsets, lengths) for s, offsets, lengths in wanted]
    unique = {p.key(): p for p in pieces}
    plan = ranges(list(unique.values()), coalesce)

    def fetch(r: tuple[str, int, int, list[Piece]]) -> list[tuple[tuple[str, int, int], Any]]:
        file, start, length, group = r
        rel = layout.object_key(cid, file)
        data = _read(store, rel, start, length)  # a piece read alone is all of it: no slice, no copy
        return [(p.key(), _decode(data if len(group) == 1 else data[p.start - start:p.start - start + p.length], p,
                                  items, f"{store.url}/{rel}@{p.start}")) for p in group]

    got: dict[tuple[str, int, int], Any] = {}
    for pairs in _run_all(store._pool, fetch, plan):
        got.update(pairs)
    stats["bytes"] += sum(r[2] for r in plan)
    stats["requests"] += len(plan)
    stats["items"] += len(unique)
    out: list[torch.Tensor | io.BytesIO] = []
    for p, (_, offsets, lengths) in zip(pieces, wanted, strict=True):
        value = got[p.key()]
        if isinstance(value, torch.Tensor):
            starts = list(offsets)
            if p.rows is not None:
                starts[0] -= p.rows[0]  # the piece begins at its first row
            for dim, (o, n) in enumerate(zip(starts, lengths, strict=True)):
                value = value.narrow(dim, o, n)
        else:
            value = io.BytesIO(value.getvalue())  # each request its own stream
        out.append(value)
    return out


def _decode(data: bytes, p: Piece, items: Mapping[str, Any], where: str) -> torch.Tensor | io.BytesIO:
    s = p.item
    item = items[s.fqn]
    if p.blocks is None:
        got = google_crc32c.Checksum(data).digest().hex()
        if got != s.crc32c:
            raise IntegrityError(f"{where}: item {s.fqn} has crc32c {got}, saved as {s.crc32c}")
        if not isinstance(item, TensorItem):
            return safe_bytes_item(data, where)
        chunk = chunk_of(item, s.offset or [])
        assert chunk is not None  # parse_metadata checked it
        return decode_tensor(data, DTYPES[item.dtype], chunk.sizes, where)
    rec, (lo, _hi), rows = s.record, p.blocks, p.rows
    assert rec is not None and rows is not None and isinstance(item, TensorItem)
    for i, crc in enumerate(block_crcs(data, rec.block)):
        if crc != rec.crc32c[lo + i]:
            raise IntegrityError(f"{where}: item {s.fqn} block {lo + i} has crc32c {crc}, saved as "
                                 f"{rec.crc32c[lo + i]}")
    chunk = chunk_of(item, s.offset or [])
    assert chunk is not None
    dtype = DTYPES[item.dtype]
    row = math.prod(chunk.sizes[1:]) * dtype.itemsize
    skip = rows[0] * row - lo * rec.block
    body = data[skip:skip + (rows[1] - rows[0]) * row]
    return decode_rows(body, dtype, [rows[1] - rows[0], *chunk.sizes[1:]], where)
