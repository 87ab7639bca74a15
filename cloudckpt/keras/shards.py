"""Saving a multi-process JAX job's variables shard by shard: every process stores what it holds, process 0 commits.

When some model or optimizer variable of a JAX job (`keras.distribution` over ``jax.distributed``) is split across
the processes (``ModelParallel``), no process holds the whole model, and none has to: at each save point every
process copies to host memory the shards it owns — the parts of each variable on its own devices, a part held by
several devices (replicated) owned by the lowest process holding it, a variable whole on every device owned by
process 0 — writes them as raw bytes into one object, ``cloudckpt_shards/p<process>.bin``, and uploads it itself
(hashed as read and checked by the store, as every upload). Process 0 then commits ONE checkpoint through the run's
index compare-and-swap, its manifest listing every process's object, the metadata
(:mod:`~cloudckpt.keras.shard_format`) and the resume state (:func:`~cloudckpt.distributed_commit.commit_stored`,
as PyTorch DCP saves commit). A process that fails or dies before that: nothing is listed, the previous checkpoint
stays the latest, ``gc`` removes the leftovers.

The processes agree through three small collectives (:func:`exchange`, all-gathers of bytes) that every process
enters at the same save point: the checkpoint id process 0 picked, each process's stored object and shards (or
its error), and process 0's outcome, so a failed save raises on every process alike rather than leaving one in a
collective its peers never enter. The save runs on the training thread (its collectives must), so training waits
for the upload; process 0's own upload is no larger than any other's.

Restore (:mod:`~cloudckpt.keras.shard_restore`) splits the values again for whatever processes and layout the
resuming job has.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np

from .. import failpoints, layout
from ..distributed_commit import commit_stored, discard_stored, merge_files
from ..errors import CloudCkptError, IntegrityError, TransferError
from ..manifest import CheckpointEntry, FileEntry, RunPolicy, utcnow
from ..store import CheckpointStore
from ..transfer import LocalFile, upload_all
from . import state as st
from .distributed import spans_processes
from .shard_format import METADATA, Box, Shard, ShardMetadata, Variable, parse_metadata, shard_object

log = logging.getLogger(__name__)


def model_and_optimizer(model: Any) -> list[tuple[str, Any]]:
    """``(key, variable)`` of the model's and its optimizer's variables, keyed as the resume state's layout."""
    optimizer = getattr(model, "optimizer", None)
    return ([(f"model_{i}", v) for i, v in enumerate(model.variables)]
            + [(f"optimizer_{i}", v) for i, v in enumerate(optimizer.variables if optimizer is not None else ())])


def any_split(model: Any) -> bool:
    """Whether a model or optimizer variable's value is split across processes (no process holds it whole)."""
    return any(spans_processes(v.value) for _, v in model_and_optimizer(model))


def box_of(index: tuple, shape: tuple[int, ...]) -> Box:
    """A shard's index (a tuple of slices, as JAX gives it) as ``[start, stop)`` per dimension."""
    out = []
    for sl, dim in zip(index, shape, strict=True):
        start, stop, step = sl.indices(dim)
        if step != 1:
            raise CloudCkptError(f"a shard with a strided index {index} can't be saved")
        out.append((start, stop))
    return tuple(out)


def owned_shards(value: Any, process: int) -> list[tuple[Box, np.ndarray]]:
    """Host copies of the distinct parts of ``value`` that process ``process`` stores: those on its devices that
    no lower process holds too. A value whole on this process's own devices alone (not one global array over
    the processes) is process 0's to store."""
    shape = tuple(int(d) for d in value.shape)
    whole = tuple((0, d) for d in shape)
    if getattr(value, "is_fully_addressable", True):
        return [(whole, np.asarray(value))] if process == 0 else []
    owners: dict[Box, int] = {}
    for device, index in value.sharding.devices_indices_map(shape).items():
        box = box_of(index, shape)
        owners[box] = min(owners.get(box, device.process_index), device.process_index)
    out: dict[Box, np.ndarray] = {}
    for shard in value.addressable_shards:
        box = box_of(shard.index, shape)
        if owners[box] == process and box not in out:
            out[box] = np.asarray(shard.data)
    return sorted(out.items())


def exchange(payload: bytes) -> list[bytes]:
    """Every process's ``payload``, in process order: a collective every process enters at the same point."""
    from jax.experimental import multihost_utils

    lengths = np.asarray(multihost_utils.process_allgather(np.asarray([len(payload)], np.int32))).reshape(-1)
    buf = np.zeros(max(int(lengths.max()), 1), np.uint8)
    buf[:len(payload)] = np.frombuffer(payload, np.uint8)
    got = np.asarray(multihost_utils.process_allgather(buf))
    return [got[i, :int(n)].tobytes() for i, n in enumerate(lengths)]


class ShardedSaves:
    """The save points of one fit of a multi-process JAX job with split variables.

    Args:
        store: this process's store (process 0's has claimed the run).
        process, processes: this process's index and the job's process count.
        collective: how the processes exchange bytes (:func:`exchange`).

    After each save, :attr:`stored` holds what this process uploaded of it (``bytes``, ``shards``, ``seconds``).
    """

    def __init__(self, store: CheckpointStore, process: int, processes: int,
                 collective: Callable[[bytes], list[bytes]] = exchange) -> None:
        self.store, self.process, self.processes = store, process, processes
        self.collective = collective
        self.stored: dict[str, float] = {}
        self.last: CheckpointEntry | None = None  # process 0: the checkpoint the last save committed

    @property
    def coordinator(self) -> bool:
        return self.process == 0

    def save(self, model: Any, push_args: dict[str, Any], state: st.ResumeState,
             arrays: dict[str, np.ndarray]) -> CheckpointEntry | None:
        """Store this process's shards of ``model``'s variables; on process 0 also the metadata and the resume
        state (``state``, ``arrays``), then commit with ``push_args`` (a :class:`~cloudckpt.keras.state.SavePoint`'s).
        Returns the committed entry on process 0, None elsewhere.

        Raises:
            TransferError: this or another process could not store its part, or process 0's commit failed
                (on every process; nothing is listed). Process 0 raises the commit's own error (e.g.
                StaleWriterError).
        """
        t0 = time.perf_counter()
        store = self.store
        began, cid = None, ""
        if self.coordinator:
            began = store.keeper.seq_floor()  # before any object of the id exists (gc's order: cloudckpt.condemn)
            cid = layout.new_checkpoint_id(push_args.get("epoch"), push_args.get("step"))
        cid = self.collective(cid.encode())[0].decode()
        if not layout.is_checkpoint_id(cid):
            raise IntegrityError(f"process 0 named no checkpoint id ({cid[:80]!r})")
        reply = self._store_mine(model, cid)
        replies = [json.loads(r) for r in self.collective(json.dumps(reply).encode())]
        self.stored["seconds"] = time.perf_counter() - t0
        errors = [f"process {i}: {r['error']}" for i, r in enumerate(replies) if r["error"]]
        outcome, entry, failure = "", None, None
        if self.coordinator:
            try:
                if errors:
                    raise TransferError(f"checkpoint {cid} not committed: " + "; ".join(errors))
                entry = self._commit(model, cid, replies, push_args, state, arrays, began)
            except BaseException as exc:  # every process must hear of it before process 0 raises
                failure, outcome = exc, f"{type(exc).__name__}: {exc}" or "failed"
        outcome = self.collective(outcome.encode() if self.coordinator else b"")[0].decode()
        if outcome and reply["error"] is None and reply["files"]:  # this process's object is no use now
            discard_stored(store, cid, [shard_object(self.process)])  # (best effort: gc removes what is left)
        if failure is not None:
            raise failure
        if outcome:
            raise TransferError(f"sharded checkpoint {cid} was not committed ({outcome[:300]})")
        self.last = entry
        return entry

    def _store_mine(self, model: Any, cid: str) -> dict[str, Any]:
        """Copy, write and upload this process's shards; what to tell process 0 (never raises: the others wait)."""
        name = shard_object(self.process)
        variables: dict[str, list[dict[str, Any]]] = {}
        try:
            with tempfile.TemporaryDirectory(prefix="cloudckpt-shards-") as tmp:
                path = Path(tmp) / "shards.bin"
                count = 0
                with open(path, "wb") as f:
                    for key, v in model_and_optimizer(model):
                        for box, data in owned_shards(v.value, self.process):
                            raw = np.ascontiguousarray(data).tobytes()
                            variables.setdefault(key, []).append(Shard(
                                box=[list(b) for b in box], object=name, start=f.tell(), length=len(raw),
                                crc32c=google_crc32c.Checksum(raw).digest().hex()).model_dump())
                            f.write(raw)
                            count += 1
                size = path.stat().st_size
                failpoints.hit("keras.shards.before_upload")
                files: list[FileEntry] = []
                if count:
                    try:
                        files = upload_all(self.store.backend, cid, [LocalFile(path, name)], sha256=False,
                                           budget=self.store.budget, pool=self.store._pool, progress=_mid_upload)
                    except BaseException:
                        discard_stored(self.store, cid, [name])
                        raise
            failpoints.hit("keras.shards.after_upload")
            self.stored.update(bytes=float(size), shards=float(count))
            log.info("process %d stored %d shards (%d bytes) of checkpoint %s", self.process, count, size, cid)
            return {"error": None, "files": [f.model_dump(mode="json") for f in files], "variables": variables}
        except Exception as exc:  # noqa: BLE001 - reported to process 0, which raises it on every process
            log.warning("process %d could not store its shards of %s: %s", self.process, cid, exc)
            return {"error": f"{type(exc).__name__}: {str(exc)[:300]}", "files": [], "variables": {}}

    def _commit(self, model: Any, cid: str, replies: list[dict[str, Any]], push_args: dict[str, Any],
                state: st.ResumeState, arrays: dict[str, np.ndarray], began: int | None) -> CheckpointEntry:
        """Process 0: the metadata and resume state, then ONE commit listing every process's object."""
        store = self.store
        dtypes = {key: np.dtype(v.value.dtype).name for key, v in model_and_optimizer(model)}
        files = merge_files(FileEntry.model_validate(f) for r in replies for f in r["files"])
        paths = {f.path for f in files}
        by_key: dict[str, list[Shard]] = {}
        for r in replies:
            for key, shards in r["variables"].items():
                by_key.setdefault(key, []).extend(Shard.model_validate(s) for s in shards)
        variables = []
        for key, _ in state_keys(state):
            group, i = key.split("_")
            path, shape = state.layout[group][int(i)]  # type: ignore[index]
            shards = by_key.get(key, [])
            if any(s.object not in paths for s in shards):
                raise IntegrityError(f"{cid}: a process reports shards of {key} in an object it did not store")
            variables.append(Variable(key=key, path=path, dtype=dtypes[key], shape=list(shape),
                                      shards=sorted(shards, key=lambda s: s.box)))
        doc = ShardMetadata(processes=self.processes, variables=variables).model_dump_json().encode()
        parse_metadata(doc, {f.path: f.size for f in files})  # what restore will check, checked before the commit
        with tempfile.TemporaryDirectory(prefix="cloudckpt-shards-") as tmp:
            st.write_state(Path(tmp), arrays, state)
            (Path(tmp) / METADATA).parent.mkdir(parents=True, exist_ok=True)
            (Path(tmp) / METADATA).write_bytes(doc)
            local = [LocalFile(Path(tmp) / rel, rel) for rel in (st.MARKER, f"{st.STATE_DIR}/{st.VARIABLES}",
                                                                  METADATA)]
            files += upload_all(store.backend, cid, local, sha256=False, budget=store.budget,
                                pool=store._pool)
        meta = {**push_args["meta"], "format": "keras-shards", "processes": str(self.processes)}
        entry = CheckpointEntry(id=cid, epoch=push_args["epoch"], step=push_args["step"], created=utcnow(),
                                metrics=push_args["metrics"], files=tuple(sorted(files, key=lambda f: f.path)),
                                size=sum(f.size for f in files), writer=store.keeper.writer_id, meta=meta)
        return commit_stored(store, entry, push_args["policy"], began=began)


def state_keys(state: st.ResumeState) -> list[tuple[str, Any]]:
    """The model's and optimizer's keys in ``state``'s layout, in order."""
    return ([(f"model_{i}", v) for i, v in enumerate(state.layout["model"])]
            + [(f"optimizer_{i}", v) for i, v in enumerate(state.layout["optimizer"])])


def _mid_upload(n: int) -> None:
    """Told of bytes sent as they go: the crash tests' point inside a process's upload."""
    if n > 0:
        failpoints.hit("keras.shards.mid_upload")


def stage(cb: Any, epoch: int, batch: int | None, logs: dict, *, saved: str | None, epoch_done: bool,
          position: int) -> None:
    """One save point of :class:`~cloudckpt.keras.CloudCheckpoint` (``cb``) whose model has split variables, on
    every process: its shards and, on process 0, the resume state, committed before training goes on. ``saved``:
    the path Keras decided to save to (no Keras file is written: the checkpoint is ``kind="model"``), or None."""
    from ..metrics import finite_metrics
    from . import internals
    from .committed import Moved

    model, saves = cb.model, cb._shards
    step = cb._step()
    optimizer = getattr(model, "optimizer", None)
    groups: dict[st.Group, list] = {
        "model": list(model.variables), "optimizer": list(optimizer.variables) if optimizer is not None else [],
        "metrics": [v for m in model.metrics for v in m.variables]}
    arrays = {} if epoch_done else {f"metrics_{i}": cb._trainer.to_host(v) for i, v in enumerate(groups["metrics"])}
    arrays.update(cb._trainer.randomness.capture())
    if cb._epoch_rng and not epoch_done:
        arrays.update(cb._epoch_rng)
    metrics = finite_metrics({k: v for k, v in logs.items() if internals.numeric(v)})
    improved = cb._improves(logs, saved)
    if improved:
        cb.best_seen = metrics.get(cb.monitor)
    keras_best = None if cb.best is None else float(cb.best)
    moved = Moved(best=keras_best if keras_best != cb._staged_best else None,
                  seen=metrics.get(cb.monitor) if improved else None)
    cb._staged_best = keras_best
    counters = internals.save_counters(cb)
    state = st.ResumeState(
        format=st.SHARDED_FORMAT, shards="cloudckpt_shards/metadata.json", epoch=epoch, epoch_done=epoch_done,
        batches_done=None if epoch_done else (batch or 0) + 1, initial_epoch=position, global_step=step,
        logs=metrics, best=keras_best, best_seen=cb.best_seen,
        batches_seen_since_last_saving=counters.batches_seen_since_last_saving,
        last_batch_seen=counters.last_batch_seen, keras_version=_keras_version(),
        layout={g: [(str(v.path), [int(d) for d in v.shape]) for v in vs] for g, vs in groups.items()})
    if cb._committed is not None:
        state = cb._committed.resolve(state, moved)
    meta = st.CheckpointMeta(kind="model" if saved and "://" not in saved else "state",
                             batch=state.batches_done or 0, epoch_done=epoch_done)
    policy = RunPolicy(monitor=cb.monitor, mode=internals.monitor_mode(cb), keep_best=cb.keep_best,
                          keep_last=cb.keep_last, keep_every=cb.keep_every_n_epochs)
    entry = saves.save(model, st.SavePoint(epoch + 1, step, metrics, meta, policy).push_args(), state, arrays)
    if entry is not None and cb._committed is not None:
        cb._committed.committed(moved)
    cb._last_staged_step = step


def _keras_version() -> str:
    import keras

    return str(keras.__version__)
