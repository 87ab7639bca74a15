"""Reading a committed DCP checkpoint: which one (every rank the same), its validated metadata, and the items a
rank's load plan needs as ranged reads, neighbours coalesced, each item checked against its crc32c before use."""

from __future__ import annotations

import io
from collections.abc import Iterable, Mapping
from typing import Any

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
    DcpMetadata,
    StoredItem,
    TensorItem,
    chunk_of,
    parse_metadata,
    to_dcp,
)
from .dcp_items import decode_tensor, safe_bytes_item

Key = tuple[str, int]  # (file, start): one stored item


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


def ranges(items: Iterable[StoredItem], coalesce: int) -> list[tuple[str, int, int, list[StoredItem]]]:
    """Ranged reads for ``items``: ``(file, start, length, items in it)``, adjacent items of one file merged while
    the read stays within ``coalesce`` bytes. Nothing between two non-adjacent items is read."""
    out: list[tuple[str, int, int, list[StoredItem]]] = []
    for s in sorted(items, key=lambda s: (s.file, s.start)):
        if out:
            file, start, length, group = out[-1]
            if file == s.file and start + length == s.start and length + s.length <= coalesce:
                out[-1] = (file, start, length + s.length, [*group, s])
                continue
        out.append((s.file, s.start, s.length, [s]))
    return out


def read_items(store: CheckpointStore, cid: str, wanted: Iterable[StoredItem], items: Mapping[str, Any], *,
               coalesce: int, stats: dict[str, int]) -> dict[Key, torch.Tensor | io.BytesIO]:
    """Fetch ``wanted`` (ranged reads in parallel), check each item's crc32c, decode it; keyed by (file, start)."""
    unique = {(s.file, s.start): s for s in wanted}
    plan = ranges(unique.values(), coalesce)

    def fetch(r: tuple[str, int, int, list[StoredItem]]) -> list[tuple[Key, torch.Tensor | io.BytesIO]]:
        file, start, length, group = r
        rel = layout.object_key(cid, file)
        data = _read(store, rel, start, length)
        return [((s.file, s.start), _decode(data[s.start - start:s.start - start + s.length], s, items,
                                            f"{store.url}/{rel}@{s.start}")) for s in group]

    out: dict[Key, torch.Tensor | io.BytesIO] = {}
    for pairs in _run_all(store._pool, fetch, plan):
        out.update(pairs)
    stats["bytes"] += sum(r[2] for r in plan)
    stats["requests"] += len(plan)
    stats["items"] += len(unique)
    return out


def _decode(data: bytes, s: StoredItem, items: Mapping[str, Any], where: str) -> torch.Tensor | io.BytesIO:
    got = google_crc32c.Checksum(data).digest().hex()
    if got != s.crc32c:
        raise IntegrityError(f"{where}: item {s.fqn} has crc32c {got}, saved as {s.crc32c}")
    item = items[s.fqn]
    if not isinstance(item, TensorItem):
        return safe_bytes_item(data, where)
    chunk = chunk_of(item, s.offset or [])
    assert chunk is not None  # parse_metadata checked it
    return decode_tensor(data, DTYPES[item.dtype], chunk.sizes, where)
