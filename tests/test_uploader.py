"""The background uploader: commits in order on every store, coalesces superseded checkpoints when behind, keeps new
bests, reports errors at once, holds a failed checkpoint for a retry (a best is retried, another is superseded), flush
reports every save not committed, and snapshots survive a rewrite."""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

import pytest

from cloudckpt.errors import CommitFailedError, StaleWriterError, TransferError
from cloudckpt.store import CheckpointStore
from cloudckpt.uploader import Uploader, snapshot


class GatedStore(CheckpointStore):
    """A real local store whose pushes wait for a gate, so the test decides when uploads fall behind."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.gate = threading.Event()
        self.started = threading.Event()

    def push(self, *a, **kw):
        self.started.set()
        assert self.gate.wait(30)
        return super().push(*a, **kw)


def stage(tmp: Path, name: str, data: bytes) -> Path:
    src = tmp / "src" / f"{name}.weights.h5"
    src.parent.mkdir(parents=True, exist_ok=True)
    src.write_bytes(data)
    return snapshot({src.name: src}, tmp / "staging" / name)


def test_commits_in_order_on_each_store(store_url, tmp_path):
    with CheckpointStore(store_url) as store:
        up = Uploader(store)
        for i in range(3):
            up.submit(stage(tmp_path, f"j{i}", b"w%d" % i), dict(epoch=i + 1, step=10 * (i + 1), monitor="val_loss",
                                                                   metrics={"val_loss": 1.0 / (i + 1)}))
            assert up.flush(120)
        up.close()
        up.raise_if_final_failed()
        assert [c.step for c in store.list()] == [10, 20, 30]
        assert store.latest().step == 30
        assert up.errors == []
        pulled = store.pull("latest", to=tmp_path / "pulled")
        assert (pulled.path / "j2.weights.h5").read_bytes() == b"w2"
    assert not any((tmp_path / "staging").iterdir()), "staging directories are removed after commit"


def test_coalesces_superseded_but_keeps_protected(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="cloudckpt.uploader")
    store = GatedStore(str(tmp_path / "store"))
    up = Uploader(store)
    up.submit(stage(tmp_path, "a", b"a"), dict(epoch=1, step=1))  # taken by the worker, blocked in push
    assert store.started.wait(10)
    up.submit(stage(tmp_path, "b", b"b"), dict(epoch=2, step=2), protected=True)  # a new best: kept
    c = up.submit(stage(tmp_path, "c", b"c"), dict(epoch=3, step=3))
    up.submit(stage(tmp_path, "d", b"d"), dict(epoch=4, step=4))  # supersedes c
    assert c.done.is_set() and c.entry is None and not c.path.exists()
    assert up.dropped == 1
    assert "superseded" in caplog.text
    store.gate.set()
    assert up.flush(60)
    up.close()
    assert [e.step for e in store.list()] == [1, 2, 4]
    store.close()


def test_flush_times_out_while_an_upload_hangs(tmp_path):
    store = GatedStore(str(tmp_path / "store"))
    up = Uploader(store)
    up.submit(stage(tmp_path, "a", b"a"), dict(epoch=1, step=1))
    assert up.flush(0.3) is False
    assert up.pending() == 1
    with pytest.raises(TransferError, match="epoch 1 step 1: not committed"):
        up.raise_if_final_failed()
    store.gate.set()
    assert up.flush(60)
    up.raise_if_final_failed()
    up.close()
    store.close()


def test_upload_error_is_logged_at_once_reported_by_flush_and_superseded(tmp_path, caplog):
    store = CheckpointStore(str(tmp_path / "store"))
    up = Uploader(store)
    missing = tmp_path / "staging" / "gone"  # the staged directory vanished: the push fails
    job = up.submit(missing, dict(epoch=1, step=1))
    assert job.done.wait(30)
    assert "upload of the checkpoint for epoch 1 step 1" in caplog.text
    assert up.flush(30) is False, "a failed upload is not reported as committed"
    assert [(f.epoch, f.step) for f in up.failures()] == [(1, 1)] and up.failures()[0].error is job.error
    with pytest.raises(CommitFailedError, match="epoch 1 step 1") as info:
        up.raise_if_uncommitted()
    assert info.value.__cause__ is job.error and info.value.failures[0].step == 1
    up.submit(stage(tmp_path, "ok", b"ok"), dict(epoch=2, step=2))  # not a best: the newer one supersedes it
    assert up.flush(30)
    assert up.failures() == []
    up.raise_if_uncommitted()
    up.close()
    assert [c.step for c in store.list()] == [2]
    store.close()


def test_a_failed_best_is_kept_and_retried_at_the_next_submit(tmp_path):
    store = CheckpointStore(str(tmp_path / "store"))
    up = Uploader(store)
    up.submit(stage(tmp_path, "first", b"1"), dict(epoch=1, step=1, monitor="val_loss", metrics={"val_loss": 0.5}))
    best = tmp_path / "staging" / "best"  # not there yet: its push fails, as on a dead network
    job = up.submit(best, dict(epoch=2, step=2, monitor="val_loss", metrics={"val_loss": 0.1}), protected=True)
    assert job.done.wait(30) and job.error is not None
    assert up.flush(30) is False and [f.step for f in up.failures()] == [2]
    best.mkdir(parents=True)
    (best / "model.weights.h5").write_bytes(b"the best")  # the network is back
    up.submit(stage(tmp_path, "worse", b"3"), dict(epoch=3, step=3, monitor="val_loss", metrics={"val_loss": 0.9}))
    assert up.flush(30), up.failures()
    assert job.entry is not None and job.attempts == 2
    assert store.best().step == 2, "the best was retried, not replaced by a worse checkpoint"
    assert [c.step for c in store.list()][-2:] == [2, 3]  # committed in order: the retry before the new one
    up.close()
    store.close()


def test_retry_requeues_every_held_checkpoint(tmp_path):
    store = CheckpointStore(str(tmp_path / "store"))
    up = Uploader(store)
    later = tmp_path / "staging" / "later"
    up.submit(later, dict(epoch=1, step=1))
    assert up.flush(30) is False
    later.mkdir(parents=True)
    (later / "w.h5").write_bytes(b"w")
    assert up.retry() == 1
    assert up.flush(30) and up.failures() == []
    assert [c.step for c in store.list()] == [1]
    up.close()
    store.close()


def test_stale_writer_is_fatal(tmp_path):
    url = str(tmp_path / "store")
    old, new = CheckpointStore(url), CheckpointStore(url)
    old.claim()
    new.claim()
    up = Uploader(old)
    up.submit(stage(tmp_path, "a", b"a"), dict(epoch=1, step=1))
    assert up.flush(30) is False
    assert isinstance(up.fatal, StaleWriterError)
    up.submit(stage(tmp_path, "b", b"b"), dict(epoch=2, step=2))
    assert up.flush(30) is False
    assert up.committed == []
    with pytest.raises(CommitFailedError, match="epoch 2 step 2"):
        up.raise_if_uncommitted()
    up.close()
    old.close()
    new.close()


def test_snapshot_survives_the_next_save_to_the_same_path(tmp_path):
    src = tmp_path / "ckpt" / "model.weights.h5"
    src.parent.mkdir()
    src.write_bytes(b"epoch-1")
    snap = snapshot({src.name: src}, tmp_path / "staging" / "j1")
    assert os.stat(src).st_nlink == 2  # a hard link: O(1), no copy
    os.unlink(src)  # what the callback does before Keras rewrites a snapshotted path
    src.write_bytes(b"epoch-2")
    assert (snap / src.name).read_bytes() == b"epoch-1"
    assert not list((tmp_path / "ckpt").glob(".*")), "nothing staged inside the checkpoint folder"


def test_staging_is_outside_the_folder_and_dead_runs_staging_is_swept(tmp_path):
    import subprocess
    import sys

    from cloudckpt.uploader import UNLOCKED_GRACE, new_staging_dir, remove_staging

    folder = tmp_path / "ckpt"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    leftover = tmp_path / "root" / f"cloudckpt-staging-{int(dead.stdout)}-abc"  # an older version's: no owner lock
    (leftover / "job-000001").mkdir(parents=True)
    young = tmp_path / "root" / "cloudckpt-staging-1-young"  # no lock yet and just made: maybe being created
    young.mkdir()
    old_time = time.time() - UNLOCKED_GRACE - 5
    os.utime(leftover, (old_time, old_time))
    mine = new_staging_dir(tmp_path / "root", folder)
    live = new_staging_dir(tmp_path / "root", folder)  # this process holds the first one's lock: it stays
    assert not leftover.exists() and young.exists()
    assert mine.exists() and live.exists() and mine.name.startswith(f"cloudckpt-staging-{os.getpid()}-")
    remove_staging(live)
    assert not live.exists() and mine.exists()
    default = new_staging_dir(None, folder)
    try:
        assert folder not in default.parents and os.stat(default).st_dev == os.stat(folder).st_dev
    finally:
        remove_staging(default)
        remove_staging(mine)
