"""Restoring a sharded Keras checkpoint (:mod:`~cloudckpt.keras.shards`) into any number of processes and layout.

The resume state and the metadata are read first (small objects, each checked against the crc32c the index
records) and the metadata validated (:func:`~cloudckpt.keras.shard_format.parse_metadata`) before any shard is
read. Then, for each model and optimizer variable, this process works out the parts its devices hold under the
variable's current layout (all of it on a single process), fetches only the saved shards that overlap them — ranged
reads, neighbouring shards of one object in one read — checks each shard's crc32c, assembles its parts and assigns
them: a `jax.Array` laid out as the variable is, so nothing is gathered and nothing re-split.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np

from .. import layout, retry
from ..errors import ConfigurationError, IntegrityError
from ..manifest import CheckpointEntry, FileEntry
from ..store import CheckpointStore
from ..transfer import _run_all
from . import state as st
from .shard_format import METADATA, Box, Shard, ShardMetadata, box_size, intersect, numpy_dtype, parse_metadata
from .shards import box_of, model_and_optimizer

log = logging.getLogger(__name__)

COALESCE = 64 * 2**20  #: neighbouring shards are read in one request up to this many bytes


def is_sharded(entry: CheckpointEntry) -> bool:
    """Whether ``entry`` was saved shard by shard."""
    return any(f.path == METADATA for f in entry.files)


def read_object(store: CheckpointStore, cid: str, f: FileEntry, start: int = 0, length: int | None = None) -> bytes:
    """Bytes ``start..start+length`` (default: all) of checkpoint ``cid``'s object ``f``, retried."""
    rel = layout.object_key(cid, f.path)
    n = f.size - start if length is None else length
    try:
        return retry.run(lambda: store.backend.read_range(rel, start, n), url=store.url, what=f"read {rel}",
                         budget=store.budget)
    except FileNotFoundError as exc:
        raise IntegrityError(f"{store.url}/{rel}: listed in the index but missing from the store") from exc


def read_state_and_metadata(store: CheckpointStore, entry: CheckpointEntry, to: Path
                            ) -> tuple[st.ResumeState, dict[str, np.ndarray], ShardMetadata]:
    """The checkpoint's resume state, its small arrays and its validated metadata (shards not read); the state's
    files are written under ``to``."""
    files = {f.path: f for f in entry.files}
    blobs = {}
    for rel in (st.MARKER, f"{st.STATE_DIR}/{st.VARIABLES}", METADATA):
        f = files.get(rel)
        if f is None or f.inline:
            raise IntegrityError(f"{store.url}: sharded checkpoint {entry.id} lists no object {rel}")
        data = read_object(store, entry.id, f)
        if f.crc32c is None or google_crc32c.Checksum(data).digest().hex() != f.crc32c:
            raise IntegrityError(f"{store.url}/{entry.id}/{rel}: checksum mismatch with the index")
        blobs[rel] = data
    md = parse_metadata(blobs.pop(METADATA), {p: f.size for p, f in files.items() if not f.inline})
    for rel, data in blobs.items():
        (to / rel).parent.mkdir(parents=True, exist_ok=True)
        (to / rel).write_bytes(data)
    state, arrays = st.read_state(to, list(files))
    if state.shards != METADATA:
        raise IntegrityError(f"{store.url}: checkpoint {entry.id}: its resume state does not name {METADATA}")
    for group, key in (("model", "model_"), ("optimizer", "optimizer_")):
        listed = {v.key: v for v in md.variables if v.key.startswith(key)}
        if sorted(listed) != sorted(f"{key}{i}" for i in range(len(state.layout[group]))):  # type: ignore[index]
            raise IntegrityError(f"{METADATA} does not list exactly the resume state's {group} variables")
        for i, (path, shape) in enumerate(state.layout[group]):  # type: ignore[index]
            if listed[f"{key}{i}"].shape != list(shape):
                raise IntegrityError(f"{METADATA}: {path} has shape {listed[f'{key}{i}'].shape}, the resume "
                                     f"state's layout says {shape}")
    return state, arrays, md


def wanted_boxes(value: Any, shape: tuple[int, ...]) -> list[Box]:
    """The distinct parts of a variable of ``shape`` whose value is ``value`` that this process's devices hold."""
    sharding = getattr(value, "sharding", None)
    if sharding is None or not hasattr(sharding, "addressable_devices_indices_map"):
        return [tuple((0, d) for d in shape)]
    return sorted({box_of(index, shape) for index in sharding.addressable_devices_indices_map(shape).values()})


def restore_shards(model: Any, store: CheckpointStore, entry: CheckpointEntry, md: ShardMetadata,
                   stats: dict[str, int] | None = None) -> None:
    """Assign every model and optimizer variable the parts of it this process holds, read from the checkpoint.

    Raises:
        ConfigurationError: a variable whose shape differs from the saved one.
        IntegrityError: a shard whose bytes don't match their crc32c, or a variable the checkpoint lacks.
    """
    saved = {v.key: v for v in md.variables}
    files = {f.path: f for f in entry.files}
    plan: list[tuple[Any, Any, list[Box], list[Shard]]] = []
    for key, var in model_and_optimizer(model):
        v = saved.get(key)
        if v is None:
            raise IntegrityError(f"{METADATA} lacks variable {key} ({var.path})")
        shape = tuple(v.shape)
        if shape != tuple(int(d) for d in var.shape):
            raise ConfigurationError(f"the checkpoint's variable {v.path} has shape {list(shape)}; this model's "
                                     f"{var.path} has {list(var.shape)}")
        boxes = wanted_boxes(var.value, shape)
        need = [s for s in v.shards
                if box_size(s.extent()) and any(intersect(s.extent(), b) is not None for b in boxes)]
        plan.append((var, v, boxes, need))
    got = _fetch(store, entry.id, files, [s for *_, need in plan for s in need], stats)
    for var, v, boxes, need in plan:
        dtype = numpy_dtype(v.dtype)
        saved_parts = [(s.extent(), np.frombuffer(got[_key(s)], dtype).reshape([b - a for a, b in s.extent()]))
                       for s in need]
        parts = {box: assemble(box, saved_parts, dtype) for box in boxes}
        var.assign(_laid_out(var.value, tuple(v.shape), parts))


def assemble(box: Box, saved: list[tuple[Box, np.ndarray]], dtype: np.dtype) -> np.ndarray:
    """The values of ``box`` from the ``saved`` parts (each its box and values) that overlap it; the parts must
    cover it (the metadata's check: every element saved exactly once)."""
    out = np.empty([b - a for a, b in box], dtype)
    for extent, data in saved:
        inter = intersect(extent, box)
        if inter is None:
            continue
        src = tuple(slice(lo - a, hi - a) for (lo, hi), (a, _) in zip(inter, extent, strict=True))
        dst = tuple(slice(lo - a, hi - a) for (lo, hi), (a, _) in zip(inter, box, strict=True))
        out[dst] = data[src]
    return out


def _laid_out(current: Any, shape: tuple[int, ...], parts: Mapping[Box, np.ndarray]) -> Any:
    """A value laid out as ``current`` from this process's ``parts`` (the whole array when not a `jax.Array`)."""
    sharding = getattr(current, "sharding", None)
    if sharding is None or not hasattr(sharding, "addressable_devices_indices_map"):
        return parts[tuple((0, d) for d in shape)]
    import jax

    return jax.make_array_from_callback(shape, sharding, lambda index: parts[box_of(tuple(index or ()), shape)])


def _key(s: Shard) -> tuple[str, int, int]:
    return s.object, s.start, s.length


def _fetch(store: CheckpointStore, cid: str, files: Mapping[str, FileEntry], shards: list[Shard],
           stats: dict[str, int] | None) -> dict[tuple[str, int, int], bytes]:
    """Each shard's bytes, checked: ranged reads in parallel, neighbours in one object merged."""
    unique = sorted({_key(s): s for s in shards}.values(), key=_key)
    reads: list[tuple[str, int, int, list[Shard]]] = []
    for s in unique:
        if reads:
            obj, start, length, group = reads[-1]
            if obj == s.object and start + length == s.start and length + s.length <= COALESCE:
                reads[-1] = (obj, start, length + s.length, [*group, s])
                continue
        reads.append((s.object, s.start, s.length, [s]))

    def one(r: tuple[str, int, int, list[Shard]]) -> list[tuple[tuple[str, int, int], bytes]]:
        obj, start, length, group = r
        data = read_object(store, cid, files[obj], start, length)
        out = []
        for s in group:
            piece = data[s.start - start:s.start - start + s.length]
            crc = google_crc32c.Checksum(piece).digest().hex()
            if crc != s.crc32c:
                raise IntegrityError(f"{store.url}/{cid}/{obj}@{s.start}: a shard has crc32c {crc}, saved as "
                                     f"{s.crc32c}")
            out.append((_key(s), piece))
        return out

    got: dict[tuple[str, int, int], bytes] = {}
    for pairs in _run_all(store._pool, one, reads):
        got.update(pairs)
    if stats is not None:
        stats["bytes"] = stats.get("bytes", 0) + sum(r[2] for r in reads)
        stats["requests"] = stats.get("requests", 0) + len(reads)
    log.info("read %d shards (%d bytes, %d requests) of checkpoint %s", len(unique), sum(r[2] for r in reads),
             len(reads), cid)
    return got

