"""The coordinator's commit of a checkpoint several processes stored (cloudckpt.distributed_commit, the DCP path)
keeps gc's order: gc condemns the id while the ranks upload (``--min-age 0``) and deletes its objects; later gc runs
roll that name off the bounded condemned list (the horizon moves past it). The commit must still be refused — it
would list a checkpoint whose objects are gone — because the coordinator noted the index seq before any upload."""

from __future__ import annotations

import pytest

from cloudckpt import layout
from cloudckpt.condemn import MAX_CONDEMNED
from cloudckpt.distributed_commit import commit_stored
from cloudckpt.errors import CheckpointCondemnedError
from cloudckpt.manifest import CheckpointEntry, utcnow
from cloudckpt.retention import Retention
from cloudckpt.store import CheckpointStore
from cloudckpt.transfer import scan, upload_all


def _stored(store: CheckpointStore, tmp_path, cid: str) -> CheckpointEntry:
    """What a rank does: upload its object under ``cid``; the entry the coordinator would commit."""
    src = tmp_path / cid
    src.mkdir()
    (src / "__0_0.distcp").write_bytes(b"tensor bytes" * 100)
    files = upload_all(store.backend, cid, scan(src), sha256=False, budget=30, pool=store._pool)
    return CheckpointEntry(id=cid, step=1, created=utcnow(), files=tuple(files), size=sum(f.size for f in files),
                           writer=store.keeper.writer_id)


@pytest.mark.parametrize("url", ["local_url", "s3_url"])
def test_a_commit_gc_condemned_is_refused_after_the_name_left_the_list(url, request, tmp_path):
    url = request.getfixturevalue(url)
    with CheckpointStore(url) as store:
        store.push(_first(tmp_path), step=0)
        store.claim()
        began = store.keeper.seq_floor()  # the coordinator, before any rank uploads
        cid = layout.new_checkpoint_id(None, 1)
        entry = _stored(store, tmp_path, cid)
        with CheckpointStore(url) as gc_machine:
            assert cid in gc_machine.gc(min_age=0).checkpoints  # condemned, then its objects deleted
            for i in range(MAX_CONDEMNED + 1):  # later leftovers roll the name off the bounded list
                _stored(gc_machine, tmp_path, layout.new_checkpoint_id(None, 100 + i))
                gc_machine.gc(min_age=0)
        assert cid not in {c.name for c in store.keeper.read()[0].condemned}, "the name must have left the list"
        with pytest.raises(CheckpointCondemnedError):
            commit_stored(store, entry, Retention(), began=began)
        assert cid not in {c.id for c in store.list()}
        assert store.verify("latest")[0].ok


def _first(tmp_path):
    d = tmp_path / "first"
    d.mkdir()
    (d / "w.bin").write_bytes(b"w" * 100)
    return d
