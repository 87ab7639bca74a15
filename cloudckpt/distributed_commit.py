"""Committing a checkpoint whose files several processes stored: the coordinator's half of a distributed save.

Every process (rank) uploads its own objects under ``<run>/<id>/`` with :func:`~cloudckpt.transfer.upload_all`
(each object hashed as read and checked by the store) and hands the coordinator their entries. The coordinator then
does what :meth:`CheckpointStore.push <cloudckpt.store.CheckpointStore.push>` does after its own upload: the
manifest, then ONE index compare-and-swap through :func:`~cloudckpt.changes.commit_checkpoint` (retention, fencing
and everything else the commit checks apply alike), then deletes what it pruned. Until that swap nothing is listed;
a process that dies before it leaves only objects under a generated id, which ``gc`` removes.

Processes of one job share a store per URL (:func:`job_store`): the coordinator's claims the run once, so an older
job still writing to it is fenced, and later saves of this job keep that claim.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Mapping
from typing import Any

from . import failpoints, layout
from .changes import commit_checkpoint
from .errors import IntegrityError
from .manifest import CheckpointEntry, FileEntry
from .retention import Retention
from .store import CheckpointStore

log = logging.getLogger(__name__)

_stores: dict[tuple[str, str], CheckpointStore] = {}
_lock = threading.Lock()


def job_store(url: str | None, *, claim: bool, budget: float = 300.0, workers: int = 8,
              **storage_options: Any) -> CheckpointStore:
    """This process's store for ``url`` (one per URL and options); with ``claim`` it has claimed the run (once)."""
    key = (url or "", repr(sorted(storage_options.items())))
    with _lock:
        store = _stores.get(key)
        if store is None:
            store = _stores[key] = CheckpointStore(url, budget=budget, workers=workers, **storage_options)
        if claim and store.keeper.lease is None:
            store.backend.ensure_conditional_writes(store.budget)
            store.claim()
    return store


def forget_job_stores() -> None:
    """Close and drop every store :func:`job_store` opened (a new job in the same process claims again)."""
    with _lock:
        stores = list(_stores.values())
        _stores.clear()
    for s in stores:
        s.close()


def merge_files(results: Iterable[FileEntry]) -> list[FileEntry]:
    """The distinct objects the ranks stored, sorted by path; IntegrityError when two answers disagree on one."""
    files: dict[str, FileEntry] = {}
    for e in results:
        known = files.setdefault(e.path, e)
        if known is not e and known != e:  # a rank's items share its entries: most are the same object
            raise IntegrityError(f"two ranks report different bytes for {e.path}: {known} and {e}")
    return [files[p] for p in sorted(files)]


def commit_stored(store: CheckpointStore, entry: CheckpointEntry, policy: Retention, *, prune: bool = True,
                  inline: Mapping[str, str] | None = None, began: int | None = None) -> CheckpointEntry:
    """Commit ``entry``, whose files are stored and verified already: its manifest, then one index update (with
    retention when ``prune``), then delete what that update pruned. ``began``: the index seq the coordinator noted
    (:meth:`~cloudckpt.commit.IndexKeeper.seq_floor`) before any rank stored an object of ``entry``. Raises like
    :meth:`CheckpointStore.push`'s commit (StaleWriterError when this job was fenced, CheckpointCondemnedError when
    gc condemned the id meanwhile; nothing is then listed)."""
    with store._busy.holding(entry.id):
        store._write_manifest(entry, dict(inline or {}))
        failpoints.hit("dcp.finish.after_manifest")
        done = store._apply(lambda index: commit_checkpoint(index, entry, policy, prune=prune, began=began,
                                                            busy=store._busy.ids(), load=store.keeper.segment),
                            what=f"commit {entry.id}")
    log.info("committed %s to %s (%d files, %d bytes, from several processes)", entry.id, store.url,
             len(entry.files), entry.size)
    store._delete_checkpoints(done.pruned)
    return entry


def discard_stored(store: CheckpointStore, cid: str, paths: Iterable[str]) -> None:
    """Best effort after a failed save: remove objects this process stored under ``cid`` (never listed); gc removes
    whatever is left."""
    rels = [layout.object_key(cid, p) for p in paths]
    if not rels:
        return
    try:
        store.backend.delete(rels)
    except Exception as exc:  # the save's own error matters more
        log.warning("could not remove the partial upload %s at %s (%s); `cloudckpt gc` will", cid, store.url, exc)


def forget_job_store(store: CheckpointStore) -> None:
    """Drop ``store`` from the job's stores (its owner closes it): a later :func:`job_store` opens a new one."""
    with _lock:
        for key in [k for k, s in _stores.items() if s is store]:
            del _stores[key]
