"""The store's promises, checked after every crash, fault and race: what the reliability suites assert.

``check_run`` is the one invariant: the index parses, every listed checkpoint verifies, ``pull latest`` restores
it, and ``gc(min_age=0)`` brings the stored objects back to exactly what the index lists (its files and manifests,
plus ``index.json``) without changing what it lists (it may condemn leftovers in it).
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from cloudckpt import CheckpointStore, GcReport
from cloudckpt.errors import CheckpointNotFoundError
from cloudckpt.garbage import PROBE_GRACE, RESERVED_GRACE
from cloudckpt.layout import segment_key
from cloudckpt.manifest import INDEX_NAME, MANIFEST_NAME, PROBE_DIR, Index


def listed_objects(index: Index) -> set[str]:
    """Every object a committed run consists of: each listed checkpoint's files and manifest, the index and the
    sealed segments it references (an index from ``store.index()`` lists every checkpoint and no segment: add
    :func:`segment_objects`)."""
    rels = {INDEX_NAME} | {segment_key(r.sha256) for r in index.segments}
    for c in index.checkpoints:
        rels |= {f"{c.id}/{f.path}" for f in c.files if not f.inline}  # inline files ride in the manifest
        rels.add(f"{c.id}/{MANIFEST_NAME}")
    return rels


def segment_objects(store: CheckpointStore) -> set[str]:
    """The sealed index segments the run's index references now."""
    return {segment_key(r.sha256) for r in store.keeper.read_existing().segments}


def young_probes(store: CheckpointStore) -> set[str]:
    """What gc keeps whatever min_age: conditional-write probe objects younger than ``garbage.PROBE_GRACE``, and
    objects of checkpoint ids the index reserves (a push uploading again, or one that died doing so) younger than
    ``garbage.RESERVED_GRACE``."""
    now = time.time()
    try:
        reserved = {r.name for r in store.keeper.read_existing().reserved}
    except CheckpointNotFoundError:
        reserved = set()
    return {o.rel for o in store.backend.list_objects()
            if (o.rel.startswith(f"{PROBE_DIR}/") and now - o.mtime < PROBE_GRACE)
            or (o.rel.split("/", 1)[0] in reserved and now - o.mtime < RESERVED_GRACE)}


@dataclass
class RunState:
    """What :func:`check_run` found: the index (None when the run has no index yet) and what gc removed."""

    index: Index | None
    gc_deleted: list[str]


class _Moved(Exception):
    """The index moved while the run was checked."""


def check_run(url: str, **storage_options) -> RunState:
    """Assert every promise of a run at ``url`` holds; return what was found.

    A run without an index (the writer died before its first commit) is valid when gc leaves nothing behind but an
index of its own that lists nothing (it condemns the leftovers there before deleting them).

    A killed writer's last request may still be applied by the server after the kill (it was sent; Azurite once
    applied an index update while the check ran, and ``pull("latest")`` then named a newer checkpoint than the index
    read first): when the index moves under the check, the whole check runs again on the run as it is then.
    """
    for _ in range(3):
        try:
            return _check_once(url, **storage_options)
        except _Moved:
            continue
    raise AssertionError(f"{url}: the index kept moving while the run was checked")


def _check_once(url: str, **storage_options) -> RunState:
    with CheckpointStore(url, budget=30, **storage_options) as store:
        try:
            index = store.index()
        except CheckpointNotFoundError:
            try:
                report = store.gc(min_age=0)  # the first commit crashed: its leftovers go
            except CheckpointNotFoundError:
                report = GcReport()  # nothing at all was written
            left = {o.rel for o in store.backend.list_objects()} - young_probes(store)
            if left == {INDEX_NAME}:  # gc condemned the leftovers in an index of its own: it lists nothing
                assert not store.index().checkpoints
                left = set()
            assert left == set(), f"no index, yet objects remain after gc: {sorted(left)}"
            return RunState(None, report.deleted)
        if index.checkpoints:
            results = store.verify(all=True)
            bad = [r for r in results if not r.ok]
            assert not bad, f"listed checkpoints fail to verify: {bad}"
            assert len(results) == len(index.checkpoints)
            with tempfile.TemporaryDirectory(prefix="rel-pull-") as tmp:
                pulled = store.pull("latest", to=Path(tmp) / "latest")
                if pulled.entry.id != index.latest and store.index().seq != index.seq:
                    raise _Moved()
                assert pulled.entry.id == index.latest
                for f in pulled.entry.files:
                    assert (pulled.path / f.path).stat().st_size == f.size
        report = store.gc(min_age=0)
        after = store.index()
        unchanged = {"condemned", "horizon", "seq", "applied"}  # gc records what it condemns, nothing else
        assert after.model_dump(exclude=unchanged) == index.model_dump(exclude=unchanged), "gc changed the listing"
        stored = {o.rel for o in store.backend.list_objects()} - young_probes(store)
        expected = listed_objects(index) | segment_objects(store)
        assert stored == expected, (
            f"after gc the store holds {sorted(stored - expected)} unlisted and misses {sorted(expected - stored)}"
        )
        return RunState(index, report.deleted)
