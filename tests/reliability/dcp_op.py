"""A distributed (multi-rank) save as one explored operation: what ``cloudckpt.torch.dcp`` does, without torch.

The coordinator (an explorer writer) claims the run at its job's first save (an older job is fenced), notes the
index seq (gc's horizon) and picks the checkpoint id; then each rank — a :class:`~cloudckpt.CheckpointStore` of its
own, as a separate process has, whose store calls park at the same writer's gate — uploads its object with
:func:`~cloudckpt.transfer.upload_all`; a rank that fails removes what it stored
(:func:`~cloudckpt.distributed_commit.discard_stored`) and the save ends with an error, nothing listed; else the
coordinator merges the ranks' entries, uploads the metadata object and commits ONE checkpoint through
:func:`~cloudckpt.distributed_commit.commit_stored`. The functions called are the library's own; only the bytes
are not tensors. Every store call parks, so the explorer interleaves the ranks' uploads and the commit with other
writers' pushes, prunes, claims and gc, loses answers, and kills the job at any call (a lost rank: torchrun ends
the whole job).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cloudckpt import CheckpointStore, layout
from cloudckpt.distributed_commit import commit_stored, discard_stored, merge_files
from cloudckpt.errors import CloudCkptError
from cloudckpt.manifest import CheckpointEntry, utcnow
from cloudckpt.store import _policy
from cloudckpt.transfer import LocalFile, upload_all


class RankFailed(CloudCkptError):
    """A rank's ``write_data`` raised: DCP reports it on every rank, the coordinator commits nothing."""


def distributed_save(coordinator: CheckpointStore, rank_store: Callable[[], CheckpointStore], *, work: Path,
                     epoch: int, loss: float, ranks: int, failing: int | None, keep_last: int) -> Callable[[], Any]:
    """The save's function (run on the explorer's op thread): ``ranks`` ranks, rank ``failing`` (if any) fails."""

    def save() -> CheckpointEntry:
        store = coordinator
        if store.keeper.lease is None:  # the job's first save (cloudckpt.distributed_commit.job_store)
            store.claim()
        began = store.keeper.seq_floor()
        cid = layout.new_checkpoint_id(epoch, None)
        results = []
        stores = [rank_store() for _ in range(ranks)]
        try:
            with tempfile.TemporaryDirectory(dir=work) as tmp:
                for r, rs in enumerate(stores):
                    name = f"__{r}_0.distcp"
                    path = Path(tmp) / name
                    path.write_bytes(os.urandom(8 + r))
                    stored = upload_all(rs.backend, cid, [LocalFile(path, name)], sha256=False, budget=rs.budget,
                                        pool=rs._pool)
                    if r == failing:
                        discard_stored(rs, cid, [name])
                        raise RankFailed(f"rank {r} failed after its upload")
                    results.extend(stored)
                files = merge_files(results)
                md = Path(tmp) / "dcp_metadata.json"
                md.write_text('{"ranks": %d}' % ranks)  # noqa: UP031
                files += upload_all(store.backend, cid, [LocalFile(md, md.name)], sha256=False, budget=store.budget,
                                    pool=store._pool)
            entry = CheckpointEntry(id=cid, epoch=epoch, created=utcnow(), metrics={"val_loss": loss},
                                    files=tuple(files), size=sum(f.size for f in files),
                                    writer=store.keeper.writer_id, meta={"ranks": str(ranks)})
            policy = _policy(None, monitor="val_loss", mode="min", keep_last=keep_last, keep_best=1)
            return commit_stored(store, entry, policy, began=began)
        finally:
            for rs in stores:
                rs.close()

    return save


def gated_store(url: str, opts: dict, gate: Callable[[Any], Any]) -> Callable[[], CheckpointStore]:
    """A factory of rank stores for ``url`` whose backend is wrapped by ``gate`` (the explorer's :class:`Gated`)."""

    def make() -> CheckpointStore:
        s = CheckpointStore(url, budget=30, workers=1, **opts)
        s.backend = s.keeper.backend = gate(s.backend)  # type: ignore[assignment]
        return s

    return make
