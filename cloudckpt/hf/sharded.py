"""The Hugging Face Trainer under FSDP with a sharded state dict: each ``checkpoint-N`` committed from every rank.

With ``fsdp_config={"state_dict_type": "SHARDED_STATE_DICT"}`` every rank writes its own part of ``checkpoint-N``
through DCP's ``FileSystemWriter`` (accelerate's ``save_fsdp_model``/``save_fsdp_optimizer``): its shards
``<folder>/__<rank>_<n>.distcp`` of ``pytorch_model_fsdp_0/`` and ``optimizer_0/``, and its ``rng_state_<rank>.pth``;
rank 0 writes each folder's ``.metadata`` (a pickle) and the rest (``trainer_state.json``, ``scheduler.pt``, ...).

:func:`commit_sharded` (every rank, from the callback's ``on_save``) stores each rank's files from its own process and
rank 0 commits ONE checkpoint listing them all through :func:`~cloudckpt.distributed_commit.commit_stored` (one index
compare-and-swap): until every rank's files are stored and verified nothing is listed; a rank that dies or fails
mid-save leaves only objects ``gc`` removes. The ``.metadata`` pickles are not stored: rank 0 (which wrote them)
records each DCP folder as our JSON metadata (:mod:`cloudckpt.torch.dcp_format`), every item's byte range and crc32c,
and a pull writes ``.metadata`` back from the validated JSON (:func:`cloudckpt.restore.pull_into`).
:func:`check_dcp_folders` then reads every item as DCP's reader will, without unpickling anything of the store's: a
tensor from its raw record, a non-tensor item with ``torch.load(weights_only=True)`` (DCP's planner unpickles those
fully).
"""

from __future__ import annotations

import logging
import re
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

import google_crc32c

from .. import failpoints, layout
from ..distributed_commit import commit_stored, discard_stored, merge_files
from ..errors import IntegrityError
from ..manifest import CheckpointEntry, FileEntry, utcnow
from ..restore import DCP_FOLDERS_FORMAT
from ..retention import Retention
from ..store import CheckpointStore
from ..torch.dcp_format import DTYPES, METADATA_NAME, StoredItem, TensorItem, chunk_of, encode, parse_metadata
from ..torch.dcp_items import decode_tensor, safe_bytes_item
from ..torch.ranks import Ranks, error_from, error_record

log = logging.getLogger(__name__)

_SHARD = re.compile(r"^__(\d+)_\d+\.distcp$")
_RNG = re.compile(r"^rng_state_(\d+)\.pth$")


def sharded_job(args: Any) -> Ranks | None:
    """The job's :class:`~cloudckpt.torch.ranks.Ranks` (a collective) when the Trainer runs on several processes
    under FSDP with a sharded state dict, else None (the main process alone commits, as without FSDP)."""
    plugin = getattr(args, "fsdp_plugin_args", None) or {}
    if "SHARDED" not in str(plugin.get("state_dict_type", "")).upper():
        return None
    return job_ranks()


def owned(folder: Path, rank: int, skipped: frozenset[str]) -> dict[str, Path]:
    """The files of ``folder`` rank ``rank`` stores: its DCP shards and rng state; rank 0 also every file no rank
    owns by name. Never a ``.metadata`` pickle (rank 0 records it as JSON) nor a ``skipped`` name."""
    out: dict[str, Path] = {}
    for p in sorted(folder.rglob("*")):
        if not p.is_file() or p.name in skipped or p.name == ".metadata" or p.name == METADATA_NAME:
            continue
        m = _SHARD.match(p.name) or _RNG.match(p.name)
        if (int(m.group(1)) if m else 0) == rank:
            out[p.relative_to(folder).as_posix()] = p
    return out


def _local_metadata(folder: Path) -> dict[str, Any]:
    """DCP's metadata of each DCP folder below ``folder`` (path relative to it -> Metadata). These ``.metadata``
    files were written by this job's rank 0 a moment ago, on this machine: never ones from a store."""
    from torch.distributed.checkpoint import FileSystemReader

    return {d.parent.relative_to(folder).as_posix(): FileSystemReader(str(d.parent)).read_metadata()
            for d in sorted(folder.rglob(".metadata")) if d.is_file()}


def _spans(metadata: Mapping[str, Any]) -> dict[str, list[list[int]]]:
    out: dict[str, list[list[int]]] = {}
    for sub, md in metadata.items():
        for info in md.storage_data.values():
            if getattr(info, "transform_descriptors", None):
                raise IntegrityError(f"{sub}: DCP items saved with transforms {info.transform_descriptors} "
                                     f"(compression, ...) are not supported")
            out.setdefault(_join(sub, info.relative_path), []).append([int(info.offset), int(info.length)])
    return out


def _join(sub: str, name: str) -> str:
    return (PurePosixPath(sub) / name).as_posix() if sub not in ("", ".") else name


def _crcs(files: Mapping[str, Path], spans: Mapping[str, list[list[int]]]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for rel, path in files.items():
        if rel in spans:
            with open(path, "rb") as f:
                out[rel] = []
                for start, length in spans[rel]:
                    f.seek(start)
                    out[rel].append(google_crc32c.Checksum(f.read(length)).digest().hex())
    return out


def commit_sharded(store: CheckpointStore, ranks: Ranks, folder: Path, *, step: int, metrics: Mapping[str, float],
                   meta: Mapping[str, str], policy: Retention, skipped: frozenset[str]) -> CheckpointEntry | None:
    """Commit ``folder`` (``checkpoint-N``, written by every rank): a collective. Returns the entry on rank 0, None
    elsewhere; raises the typed error of the rank or commit that failed on every rank (nothing is then listed)."""
    plan: dict[str, Any] | None = None
    metadata: dict[str, Any] = {}
    if ranks.coordinator:
        try:
            metadata = _local_metadata(folder)
            plan = {"cid": layout.new_checkpoint_id(None, step), "began": store.keeper.seq_floor(),
                    "spans": _spans(metadata)}
        except Exception as exc:  # noqa: BLE001 - reported to every rank, raised everywhere
            plan = {"error": error_record(exc)}
    plan = ranks.share(plan)
    if "error" in plan:
        raise error_from(plan["error"])
    cid, spans = str(plan["cid"]), plan["spans"]
    mine: dict[str, Path] = {}
    report: dict[str, Any]
    failure: BaseException | None = None
    try:
        mine = owned(folder, ranks.rank, skipped)
        failpoints.hit("hf.sharded.before_upload")
        from ..transfer import LocalFile, upload_all

        crcs = _crcs(mine, spans)
        stored = upload_all(store.backend, cid, [LocalFile(p, rel) for rel, p in mine.items()], sha256=False,
                            budget=store.budget, pool=store._pool, progress=_mid_upload)
        failpoints.hit("hf.sharded.after_upload")
        report = {"files": [e.model_dump(mode="json") for e in stored], "crcs": crcs}
    except Exception as exc:  # noqa: BLE001 - every rank learns that this save failed
        discard_stored(store, cid, mine)
        report = {"error": {**error_record(exc), "rank": ranks.rank}}
        failure = exc
    reports = ranks.gather(report)
    outcome: dict[str, Any] | None = None
    entry: CheckpointEntry | None = None
    if ranks.coordinator:
        failed = [r["error"] for r in reports if "error" in r]
        if failed:
            outcome = {"error": failed[0]}  # the first rank (in rank order) whose files could not be stored
        else:
            try:
                entry = _commit(store, cid, int(plan["began"]), reports, metadata, step=step, metrics=metrics,
                                meta=meta, policy=policy, world=ranks.world)
                outcome = {"id": entry.id}
            except Exception as exc:  # noqa: BLE001 - reported to every rank
                outcome = {"error": {**error_record(exc), "rank": 0}}
                failure = exc
    outcome = ranks.share(outcome)
    if "error" in outcome:
        if failure is not None:  # this rank's own error, as raised
            raise failure
        raise error_from(outcome["error"])
    log.info("checkpoint-%d committed from %d ranks as %s", step, ranks.world, outcome["id"])
    return entry


def _mid_upload(n: int) -> None:
    if n > 0:
        failpoints.hit("hf.sharded.mid_upload")


def _commit(store: CheckpointStore, cid: str, began: int, reports: list[dict[str, Any]], metadata: Mapping[str, Any],
            *, step: int, metrics: Mapping[str, float], meta: Mapping[str, str], policy: Retention,
            world: int) -> CheckpointEntry:
    files = merge_files(FileEntry.model_validate(f) for r in reports for f in r["files"])
    crcs: dict[str, list[str]] = {k: v for r in reports for k, v in r["crcs"].items()}
    from ..transfer import LocalFile, upload_all

    with tempfile.TemporaryDirectory(prefix="cloudckpt-hf-") as tmp:
        docs = []
        for n, (sub, md) in enumerate(metadata.items()):
            seen: dict[str, int] = {}
            items = []
            for key, info in md.storage_data.items():
                rel = _join(sub, info.relative_path)
                i = seen[rel] = seen.get(rel, -1) + 1
                if rel not in crcs or i >= len(crcs[rel]):
                    raise IntegrityError(f"{rel}: no rank stored this DCP file of checkpoint {cid}")
                items.append(StoredItem(fqn=key.fqn, offset=list(key.offset) if key.offset is not None else None,
                                        index=key.index, file=info.relative_path, start=int(info.offset),
                                        length=int(info.length), crc32c=crcs[rel][i]))
            path = Path(tmp) / f"{n}.json"
            path.write_bytes(encode(md, items))
            docs.append(LocalFile(path, _join(sub, METADATA_NAME)))
        files += upload_all(store.backend, cid, docs, sha256=False, budget=store.budget, pool=store._pool)
    failpoints.hit("hf.sharded.before_commit")
    entry = CheckpointEntry(id=cid, step=step, created=utcnow(), metrics=dict(metrics), files=tuple(files),
                            size=sum(f.size for f in files), writer=store.keeper.writer_id,
                            meta={**meta, "format": DCP_FOLDERS_FORMAT, "ranks": str(world)})
    return commit_stored(store, entry, policy, began=began)


def check_dcp_folders(folder: Path) -> None:
    """IntegrityError unless every DCP item of every pulled DCP folder below ``folder`` matches its crc32c and
    decodes as what its validated metadata says (tensors from their raw record, other items as plain data)."""
    for shard in folder.rglob("*.distcp"):
        if not (shard.parent / METADATA_NAME).is_file():
            raise IntegrityError(f"{shard.relative_to(folder)}: a DCP shard in a folder without {METADATA_NAME}")
    for doc in sorted(folder.rglob(METADATA_NAME)):
        d = doc.parent
        sizes = {p.name: p.stat().st_size for p in d.iterdir() if p.is_file() and p.name != METADATA_NAME}
        md = parse_metadata(doc.read_bytes(), sizes)
        handles: dict[str, Any] = {}
        try:
            for s in md.storage:
                f = handles.get(s.file) or handles.setdefault(s.file, open(d / s.file, "rb"))  # noqa: SIM115
                f.seek(s.start)
                data = f.read(s.length)
                where = f"{d.relative_to(folder).as_posix()}/{s.file}: {s.fqn}"
                if google_crc32c.Checksum(data).digest().hex() != s.crc32c:
                    raise IntegrityError(f"{where}: its bytes don't match the crc32c recorded at save")
                item = md.items[s.fqn]
                if isinstance(item, TensorItem):
                    chunk = chunk_of(item, s.offset or [])
                    assert chunk is not None  # parse_metadata checked it
                    decode_tensor(data, DTYPES[item.dtype], chunk.sizes, where)
                else:
                    safe_bytes_item(data, where)
        finally:
            for f in handles.values():
                f.close()


def job_ranks() -> Ranks | None:
    """The job's Ranks (a collective) when ``torch.distributed`` runs several processes, else None."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return Ranks()
    return None


def on_every_rank(ranks: Ranks, choose: Callable[[], tuple[Path | None, str | None]],
                  pull: Callable[[str, Path], None]) -> Path | None:
    """Rank 0's ``choose()`` (the folder it resumes from and the checkpoint id it pulled there) on every rank; a
    machine that doesn't see that folder pulls the same id into it with ``pull`` (its local rank 0 only, the others
    wait). Raises on every rank the error of the rank that failed."""
    import os

    chosen: dict[str, Any] | None = None
    if ranks.coordinator:
        try:
            path, cid = choose()
            chosen = {"path": None if path is None else str(path), "id": cid}
        except Exception as exc:  # noqa: BLE001 - every rank raises it
            chosen = {"error": error_record(exc)}
            failure: BaseException = exc
    chosen = ranks.share(chosen)
    if "error" in chosen:
        if ranks.coordinator:
            raise failure
        raise error_from(chosen["error"])
    if chosen["path"] is None:
        return None
    target = Path(chosen["path"])
    error: dict[str, Any] | None = None
    if not ranks.coordinator and int(os.environ.get("LOCAL_RANK", "0")) == 0 and chosen["id"] is not None \
            and not (target.is_dir() and any(target.iterdir())):
        try:
            pull(str(chosen["id"]), target)
        except Exception as exc:  # noqa: BLE001 - every rank raises it
            error = {**error_record(exc), "rank": ranks.rank}
    errors = [e for e in ranks.gather(error) if e is not None]
    if errors:
        raise error_from(errors[0])
    return target
