"""PyTorch Distributed Checkpoint (DCP) on cloudckpt's commit protocol: every rank writes its own items, the
coordinator commits ONE checkpoint with one index compare-and-swap. No rename, no shared filesystem.

```python
import torch.distributed.checkpoint as dcp
from cloudckpt.torch.dcp import CloudStorageReader, CloudStorageWriter

dcp.save(state, storage_writer=CloudStorageWriter("s3://bucket/runs/r1", step=step, metrics={"val_loss": v},
                                                  monitor="val_loss", keep_last=2))
dcp.load(state, storage_reader=CloudStorageReader("s3://bucket/runs/r1", "latest"))
```

Saving: the coordinator picks the checkpoint id (and claims the run at its first save: an older job is fenced),
each rank writes its items into ``<id>/__<rank>_<n>.distcp`` and uploads them itself (hashed as read, checked by the
store, retried), and DCP gathers every rank's results to the coordinator, whose ``finish`` stores the metadata as
JSON (:mod:`~cloudckpt.torch.dcp_format`) and commits the checkpoint through
:func:`~cloudckpt.distributed_commit.commit_stored`. A rank that fails or dies before that: nothing is listed.

Loading: the metadata is validated before use (:func:`~cloudckpt.torch.dcp_format.parse_metadata`); each rank
fetches only the items its load plan needs, as ranged reads (neighbouring items coalesced), checks each item's
crc32c, and decodes tensors without unpickling (:mod:`~cloudckpt.torch.dcp_items`). Any number of ranks may load a
checkpoint saved by any number (DCP reshards).
"""

from __future__ import annotations

import io
import logging
import os
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import google_crc32c
import torch
from torch.distributed.checkpoint import load as dcp_load
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, StorageMeta
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    LoadPlanner,
    SavePlan,
    SavePlanner,
    WriteItemType,
)
from torch.distributed.checkpoint.storage import StorageReader, StorageWriter, WriteResult
from torch.futures import Future

from .. import failpoints, layout
from ..distributed_commit import commit_stored, discard_stored, job_store, merge_files
from ..errors import CloudCkptError, ConfigurationError, IntegrityError
from ..manifest import CheckpointEntry, FileEntry, utcnow
from ..metrics import finite_metrics
from ..retention import Retention
from ..transfer import LocalFile, StagedFile, upload_all
from .dcp_format import DCP_FORMAT, METADATA_NAME, Record, StoredItem, check_dtypes, encode
from .dcp_items import BLOCK, block_crcs, encode_tensor, record_span
from .dcp_read import read_items, resolve_entry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Target:
    """What the coordinator tells each rank (a plan's ``storage_data``): the checkpoint id and the rank's prefix."""

    cid: str
    prefix: str


@dataclass(frozen=True)
class _Stored:
    """What a rank reports for one item (a WriteResult's ``storage_data``): where it is and the object holding it."""

    cid: str
    item: StoredItem
    object: FileEntry


class CloudStorageWriter(StorageWriter):
    """A ``torch.distributed.checkpoint`` StorageWriter that commits one checkpoint of the run at ``remote``.

    Create one per save on every rank, with the same arguments (the coordinator's are the ones recorded).

    Args:
        remote: the run's URL (``s3://``, ``gs://``, ``az://``, ``file://`` or a path). Default ``$CLOUDCKPT_REMOTE``.
        step: the training step recorded with the checkpoint. Default None.
        epoch: the epoch recorded (``keep_every`` counts epochs). Default None.
        metrics: values recorded with the checkpoint (``monitor`` picks the best by one). Default None.
        meta: extra string fields recorded. Default None.
        policy: a :class:`~cloudckpt.Retention`, or give ``monitor``/``mode``/``keep_*`` (not both). Default None.
        prune: apply retention in the commit. Default True.
        files_per_rank: objects each rank writes its items into (uploaded in parallel). Default 1.
        block_size: bytes of a tensor per recorded crc32c: a rank that needs some rows of a saved tensor reads (and
            checks) only the blocks holding them. Default 1 MiB.
        stage_in_memory: a rank whose items hold at most this many bytes serializes them in memory and uploads from
            there (as much memory again as its state); a bigger one writes them to temporary files first (memory
            bounded by the largest item). Default 1 GiB.
        budget: seconds each upload / index update may retry for. Default 300.
        workers: parallel transfers per process. Default 8.
        **storage_options: passed to the backend (see :class:`~cloudckpt.CheckpointStore`).
    """

    def __init__(self, remote: str | None = None, *, step: int | None = None, epoch: int | None = None,
                 metrics: Mapping[str, float] | None = None, meta: Mapping[str, str] | None = None,
                 policy: Retention | None = None, monitor: str | None = None, mode: str | None = None,
                 keep_best: int | None = None, keep_last: int | None = None, keep_every: int | None = None,
                 prune: bool = True, files_per_rank: int = 1, block_size: int = BLOCK,
                 stage_in_memory: int = 1 << 30, budget: float = 300.0, workers: int = 8,
                 **storage_options: Any) -> None:
        super().__init__()
        from ..store import _policy

        if files_per_rank < 1 or not 4096 <= block_size <= 2**30 or stage_in_memory < 0:
            raise ConfigurationError(f"files_per_rank must be >= 1, block_size within 4 KiB..1 GiB and "
                                     f"stage_in_memory >= 0. Received: files_per_rank={files_per_rank}, "
                                     f"block_size={block_size}, stage_in_memory={stage_in_memory}")
        self.block_size = block_size
        self.stage_in_memory = stage_in_memory
        self.remote = remote or os.environ.get("CLOUDCKPT_REMOTE")
        if not self.remote:
            raise ConfigurationError("no store URL given and $CLOUDCKPT_REMOTE is not set")
        self.step, self.epoch = step, epoch
        self.metrics = finite_metrics(metrics)  # NaN/inf: no value (never ranked), as on every path
        self.began: int | None = None
        self.meta = dict(meta or {})
        self.policy = _policy(policy, monitor=monitor, mode=mode, keep_best=keep_best, keep_last=keep_last,
                              keep_every=keep_every)
        self.prune = prune
        self.files_per_rank = files_per_rank
        self._opts = dict(storage_options, budget=budget, workers=workers)
        self.is_coordinator = False
        self.rank = 0
        self.cid: str | None = None
        self.committed: CheckpointEntry | None = None
        self.save_id = uuid.uuid4().hex

    # --- planning -----------------------------------------------------------------------------------------------

    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        self.cid, self.committed, self.save_id = None, None, uuid.uuid4().hex

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.is_coordinator = is_coordinator
        self.rank = int(kwargs.get("rank") or 0)

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        for p in plans:
            check_dtypes(p.items)  # before anything is stored
        store = job_store(self.remote, claim=True, **self._opts)  # before any upload: fence an older job, check CAS
        self.began = store.keeper.seq_floor()  # before any object of the id exists (gc's order: cloudckpt.condemn)
        self.cid = layout.new_checkpoint_id(self.epoch, self.step)
        return [replace(p, storage_data=_Target(self.cid, f"__{i}_")) for i, p in enumerate(plans)]

    # --- every rank: write and upload its own items ---------------------------------------------------------------

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        target = plan.storage_data
        if not isinstance(target, _Target):
            raise ConfigurationError("CloudStorageWriter: the plan carries no checkpoint id (was the global plan "
                                     "made by a CloudStorageWriter?)")
        store = job_store(self.remote, claim=False, **self._opts)
        groups = _split(plan.items, self.files_per_rank)
        names = [f"{target.prefix}{n}.distcp" for n in range(len(groups))]
        results: list[tuple[Any, StoredItem]] = []
        in_memory = sum(_nbytes(item) for item in plan.items) <= self.stage_in_memory
        with tempfile.TemporaryDirectory(prefix="cloudckpt-dcp-") as tmp:
            files: list[LocalFile | StagedFile] = []
            for name, items in zip(names, groups, strict=True):
                path = Path(tmp) / name
                with nullcontext(None) if in_memory else open(path, "wb") as f:
                    chunks, at = [], 0
                    for item in items:
                        data, record = _item_bytes(item, planner.resolve_data(item), self.block_size)
                        key = item.index
                        results.append((key, StoredItem(
                            fqn=key.fqn, offset=list(key.offset) if key.offset is not None else None,
                            index=key.index, file=name, start=at, length=len(data),
                            crc32c=google_crc32c.Checksum(data).digest().hex(), record=record)))
                        at += len(data)
                        if f is None:
                            chunks.append(data)
                        else:
                            f.write(data)
                files.append(StagedFile(tuple(chunks), name) if in_memory else LocalFile(path, name))
            failpoints.hit("dcp.before_upload")
            try:
                stored = upload_all(store.backend, target.cid, files, sha256=False, budget=store.budget,
                                    pool=store._pool, progress=_mid_upload)
            except BaseException:
                discard_stored(store, target.cid, names)
                raise
        failpoints.hit("dcp.after_upload")
        by_name = {e.path: e for e in stored}
        out = [WriteResult(index=key, size_in_bytes=s.length, storage_data=_Stored(target.cid, s, by_name[s.file]))
               for key, s in results]
        fut: Future[list[WriteResult]] = Future()
        fut.set_result(out)
        return fut

    # --- the coordinator: one commit ----------------------------------------------------------------------------

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        failpoints.hit("dcp.finish")
        store = job_store(self.remote, claim=True, **self._opts)
        stored = [wr.storage_data for rank in results for wr in rank]
        if self.cid is None or any(not isinstance(s, _Stored) or s.cid != self.cid for s in stored):
            raise IntegrityError(f"a rank reports items of another checkpoint than {self.cid}")
        files = merge_files(s.object for s in stored)
        doc = StagedFile((encode(metadata, [s.item for s in stored]),), METADATA_NAME)
        [md_entry] = upload_all(store.backend, self.cid, [doc], sha256=False, budget=store.budget, pool=store._pool)
        files.append(md_entry)
        meta = {**self.meta, "format": DCP_FORMAT, "ranks": str(len(results))}
        entry = CheckpointEntry(id=self.cid, epoch=self.epoch, step=self.step, created=utcnow(),
                                metrics=self.metrics, files=tuple(files), size=sum(f.size for f in files),
                                writer=store.keeper.writer_id, meta=meta)
        self.committed = commit_stored(store, entry, self.policy, prune=self.prune, began=self.began)

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta(checkpoint_id=self.remote, save_id=self.save_id)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        return False  # never picked by DCP's guessing from a path: pass storage_writer= explicitly


def load(state_dict: dict[str, Any], *, storage_reader: CloudStorageReader, **kwargs: Any) -> None:
    """``torch.distributed.checkpoint.load`` that raises the reader's own typed error (IntegrityError, ...) where DCP
    would raise it wrapped in a CheckpointException or an AssertionError naming it."""
    try:
        dcp_load(state_dict, storage_reader=storage_reader, **kwargs)
    except BaseException:  # DCP's CheckpointException is a BaseException
        if storage_reader.error is not None:
            raise storage_reader.error from None
        raise


def _mid_upload(n: int) -> None:
    """Told of bytes sent as they go: the crash tests' point inside a rank's upload."""
    if n > 0:
        failpoints.hit("dcp.mid_upload")


def _item_bytes(item: Any, data: Any, block: int) -> tuple[bytes, Record | None]:
    """An item's bytes; for a tensor also where its raw record is, with a crc32c per block of it."""
    if item.type == WriteItemType.BYTE_IO:
        assert isinstance(data, io.BytesIO)
        return data.getvalue(), None
    assert isinstance(data, torch.Tensor)
    blob = encode_tensor(data)
    start, size = record_span(blob)
    return blob, Record(start=start, size=size, block=block,
                        crc32c=block_crcs(memoryview(blob)[start:start + size], block))


def _nbytes(item: Any) -> int:
    """A write item's tensor bytes (0 for a bytes item: small, state other than tensors)."""
    props = item.tensor_data
    if props is None:
        return 0
    return int(props.size.numel()) * props.properties.dtype.itemsize


def _split(items: list[Any], n: int) -> list[list[Any]]:
    """Items in up to ``n`` groups of similar byte size (largest first into the lightest group); no empty group."""
    groups: list[list[Any]] = [[] for _ in range(min(n, len(items)))]
    loads = [0] * len(groups)
    for item in sorted(items, key=_nbytes, reverse=True):
        i = loads.index(min(loads))
        groups[i].append(item)
        loads[i] += _nbytes(item)
    return groups


class CloudStorageReader(StorageReader):
    """A ``torch.distributed.checkpoint`` StorageReader for one committed checkpoint of the run at ``remote``.

    Args:
        remote: the run's URL. Default ``$CLOUDCKPT_REMOTE``.
        selector: ``"latest"``, ``"best"``, a step... as :meth:`CheckpointStore.get` takes, or a checkpoint id. Under
            ``torch.distributed`` rank 0 resolves ``latest``/``best`` and every rank loads that same checkpoint (a
            broadcast on the default process group: to load on a subgroup, pass an id). Default "latest".
        coalesce: neighbouring items are fetched in one ranged read up to this many bytes. Default 64 MiB.
        budget, workers, **storage_options: as :class:`CloudStorageWriter`'s.

    After a load, :attr:`entry` is the checkpoint read and :attr:`stats` what this rank fetched
    (``bytes``, ``requests``, ``items``).
    """

    def __init__(self, remote: str | None = None, selector: str | int = "latest", *, coalesce: int = 64 * 2**20,
                 budget: float = 300.0, workers: int = 8, **storage_options: Any) -> None:
        super().__init__()
        self.remote = remote or os.environ.get("CLOUDCKPT_REMOTE")
        if not self.remote:
            raise ConfigurationError("no store URL given and $CLOUDCKPT_REMOTE is not set")
        self.selector = selector
        self.coalesce = coalesce
        self._opts = dict(storage_options, budget=budget, workers=workers)
        self.entry: CheckpointEntry | None = None
        self.stats: dict[str, int] = {"bytes": 0, "requests": 0, "items": 0}
        self.error: CloudCkptError | None = None
        self._storage: dict[MetadataIndex, StoredItem] = {}
        self._items: dict[str, Any] = {}

    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        self.stats = {"bytes": 0, "requests": 0, "items": 0}
        self.error = None

    @contextmanager
    def _recording(self) -> Iterator[None]:
        """Keep the typed error of a failed read: DCP re-raises it wrapped (CheckpointException, AssertionError)."""
        try:
            yield
        except CloudCkptError as exc:
            self.error = exc
            raise

    def read_metadata(self, *args: Any) -> Metadata:
        # no **kwargs: DCP then never calls it again per rank (``rank=``) after a failure; every rank reads it once
        store = job_store(self.remote, claim=False, **self._opts)
        with self._recording():
            self.entry, md, metadata = resolve_entry(store, self.selector)
        self._storage = {s.key(): s for s in md.storage}
        self._items = dict(md.items)
        return metadata

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        if self.entry is None:
            raise ConfigurationError("CloudStorageReader: read_metadata was not called on this rank")

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        assert self.entry is not None
        store = job_store(self.remote, claim=False, **self._opts)
        reqs = [(r, self._storage.get(r.storage_index)) for r in plan.items]
        missing = [r.storage_index for r, s in reqs if s is None]
        if missing:
            self.error = IntegrityError(f"{self.entry.id}: the checkpoint stores no item {missing[0]}")
            raise self.error
        wanted = [(s, r.storage_offsets, r.lengths) for r, s in reqs if s is not None]
        with self._recording():
            got = read_items(store, self.entry.id, wanted, self._items, coalesce=self.coalesce, stats=self.stats)
        for (req, _), value in zip(reqs, got, strict=True):
            if req.type == LoadItemType.BYTE_IO:
                assert isinstance(value, io.BytesIO)
                planner.load_bytes(req, value)
                continue
            assert isinstance(value, torch.Tensor)
            dest = planner.resolve_tensor(req).detach()
            if dest.size() != value.size():
                raise IntegrityError(f"{self.entry.id}: {req.storage_index.fqn}: stored part is "
                                     f"{tuple(value.size())}, the state dict wants {tuple(dest.size())}")
            dest.copy_(value)
            planner.commit_tensor(req, dest)
        fut: Future[None] = Future()
        fut.set_result(None)
        return fut

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        return False
