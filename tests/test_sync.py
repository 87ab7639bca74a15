"""The sync service: commits finished checkpoints from a watched directory, stops cleanly on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cloudckpt import CheckpointStore
from cloudckpt.retention import Retention
from cloudckpt.sync import SyncService


def test_scan_commits_only_settled_and_recommits_changes(tmp_path, local_url):
    watch = tmp_path / "watch"
    watch.mkdir()
    (watch / "model-1-0.50.keras").write_bytes(b"one")
    (watch / ".hidden").write_bytes(b"x")
    (watch / "partial.tmp").write_bytes(b"x")
    with CheckpointStore(local_url) as store:
        svc = SyncService(store, watch, settle=10, name_pattern=r"model-(?P<epoch>\d+)-(?P<val_loss>[\d.]+)",
                          policy=Retention(monitor="val_loss"))
        assert svc.scan_once(now=100) == []  # first sight: not settled yet
        assert svc.scan_once(now=105) == []
        [entry] = svc.scan_once(now=111)
        assert entry.epoch == 1 and entry.metrics == {"val_loss": 0.5}
        assert [f.path for f in entry.files] == ["model-1-0.50.keras"]
        assert svc.scan_once(now=200) == []  # unchanged: not pushed again
        (watch / "model-1-0.50.keras").write_bytes(b"one, rewritten")
        assert svc.scan_once(now=300) == []
        [again] = svc.scan_once(now=311)
        assert again.id != entry.id
        assert [c.id for c in store.list()] == [entry.id, again.id]
        assert store.index().run.monitor == "val_loss"


def test_directory_checkpoints_are_one_checkpoint_each(tmp_path, local_url):
    watch = tmp_path / "watch"
    (watch / "step-100").mkdir(parents=True)
    (watch / "step-100" / "a.bin").write_bytes(b"a")
    (watch / "step-100" / "sub").mkdir()
    (watch / "step-100" / "sub" / "b.bin").write_bytes(b"b")
    with CheckpointStore(local_url) as store:
        svc = SyncService(store, watch, settle=0, name_pattern=r"step-(?P<step>\d+)")
        [entry] = svc.scan_once()
        assert entry.step == 100 and sorted(f.path for f in entry.files) == ["a.bin", "sub/b.bin"]


def _wait_for(predicate, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def _listed(url: str) -> list[str]:
    try:
        with CheckpointStore(url) as store:
            return [c.id for c in store.list()]
    except FileNotFoundError:
        return []


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_sync_process_commits_then_stops_on_sigterm(kind, request, tmp_path):
    url = request.getfixturevalue(f"{kind}_url")
    watch = tmp_path / "watch"
    watch.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "cloudckpt", "sync", str(watch), "--remote", url, "--settle", "0.3",
                             "--poll", "0.1", "--keep-last", "2"], stderr=subprocess.PIPE, text=True)
    try:
        for epoch in range(3):
            (watch / f"ckpt-{epoch}.bin").write_bytes(os.urandom(1000))
            assert _wait_for(lambda: len(_listed(url)) >= min(epoch + 1, 2) and proc.poll() is None)
        assert _wait_for(lambda: len(_listed(url)) == 2)
        (watch / "last.bin").write_bytes(b"written just before the signal")
        time.sleep(0.5)  # it settles
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    with CheckpointStore(url) as store:
        files = [c.files[0].path for c in store.list()]
    assert files[-1] == "last.bin" and len(files) == 2  # retention kept the last two


def test_exclusive_sync_exits_6_when_fenced(tmp_path, local_url):
    watch = tmp_path / "watch"
    watch.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "cloudckpt", "sync", str(watch), "--remote", local_url,
                             "--exclusive", "--settle", "0", "--poll", "0.1"], stderr=subprocess.PIPE, text=True)
    try:
        assert _wait_for(lambda: Path(local_url, "index.json").exists())
        with CheckpointStore(local_url) as newer:
            newer.claim()  # a replacement takes over the run
        (watch / "a.bin").write_bytes(b"late write by the old service")
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 6, err
    assert "superseded" in err
    assert _listed(local_url) == []
