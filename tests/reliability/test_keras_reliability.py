"""The Keras callback on the bad day: SIGKILLed at random while it trains and commits, saving through 20% network
faults, and training on a full disk. Training runs in a real subprocess (``tests/support/keras_job.py``: digits, a small
dense model, ``CloudCheckpoint`` committing every 5 batches)."""

from __future__ import annotations

import importlib.util
import random
import re
import subprocess
import tempfile
from pathlib import Path

import pytest

from .faultproxy import FaultProxy
from .invariants import check_run
from .procs import ROOT, env_with, run, run_and_kill

pytestmark = pytest.mark.skipif(importlib.util.find_spec("keras") is None, reason="keras is not installed")
JOB = str(ROOT / "tests" / "support" / "keras_job.py")


def job_cmd(remote: str, filepath: Path, *extra: str) -> list[str]:
    import sys

    return [sys.executable, JOB, "--remote", remote, "--filepath", str(filepath), "--save-freq", "5",
            "--preemption", "none", *extra]


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.slow)])
def keras_url(request) -> str:
    return request.getfixturevalue(f"{request.param}_url")


def test_callback_sigkilled_at_random_then_resumes(keras_url, tmp_path, full, figures):
    kind = "s3" if keras_url.startswith("s3://") else "local"
    rnd = random.Random(3)
    cmd = job_cmd(keras_url, tmp_path / "ck" / "model.keras", "--epochs", "30")
    committed_before = False
    for _ in range(8 if full else 1):  # each kill costs a TensorFlow start (~5 s)
        out = run_and_kill(cmd, delay=rnd.uniform(0.2, 2.0), ready="STEP", timeout=120)
        assert out.killed, f"training ended by itself: rc={out.returncode} {out.stderr[-2000:]}"
        figures["kills"][f"{kind}/random-keras-callback"] += 1
        state = check_run(keras_url)
        committed_before = committed_before or bool(state.index and state.index.checkpoints)
    # a full run afterwards resumes from what was committed and ends with a committed final state
    out = run(job_cmd(keras_url, tmp_path / "ck" / "model.keras", "--epochs", "3"), timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    resumed = re.search(r"RESUMED_FROM (\S+)", "\n".join(out.lines)).group(1)
    assert (resumed != "None") == committed_before
    state = check_run(keras_url)
    assert state.index.checkpoints


def test_callback_saves_commit_through_20_percent_faults(s3_url, s3_server, tmp_path, figures):
    rates = {"500": 0.04, "503": 0.04, "429": 0.03, "reset": 0.03, "drop_after": 0.03, "truncate": 0.03}
    with FaultProxy(s3_server.endpoint, rates=rates, seed=21) as proxy:
        env = env_with(AWS_ENDPOINT_URL=proxy.endpoint, AWS_ENDPOINT_URL_S3=proxy.endpoint)
        out = run(job_cmd(s3_url, tmp_path / "ck" / "model.keras", "--epochs", "2"), env=env, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        failed = [line for line in out.stderr.splitlines() if "ERROR" in line]
        assert not failed, failed[:3]
        saves = len(re.findall(r"committed ckpt-", out.stderr))
        assert saves >= 1  # queued saves may be superseded while uploads are slowed (documented coalescing)
        proxy.set_rates({})
        state = check_run(s3_url)  # through the proxy (now clean): the env of this process points at moto directly
    for k, v in proxy.faults.items():
        figures["faults_injected"][f"s3-keras/{k}"] += v
    figures["pushes_through_faults"]["s3-keras-saves"] += saves
    assert sum(proxy.faults.values()) > 0 and state.index.checkpoints
    assert state.index.get(state.index.latest).epoch == 2  # the end-of-training state was committed


def _tmpfs(path: Path, size: str) -> None:
    path.mkdir(parents=True)
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                       text=True)
    if p.returncode != 0:
        pytest.skip(f"mounting a {size} tmpfs is not permitted here: {p.stderr.strip()}")


@pytest.mark.parametrize("full_side,size", [("store", "150k"), pytest.param("store", "20k", marks=pytest.mark.slow),
                                            pytest.param("checkpoint-folder", "60k", marks=pytest.mark.slow)])
def test_training_on_a_full_disk_never_stops_checkpointing_silently(full_side, size, tmp_path, figures):
    """A full store disk: every failed save is an ERROR line and training goes on; if even the final state can't be
    committed, fit raises (exit 1). A full checkpoint folder: the same loud failure. The store stays valid."""
    small = tmp_path / "small"
    _tmpfs(small, size)
    try:
        remote = str(small / "store") if full_side == "store" else str(tmp_path / "store")
        folder = (tmp_path if full_side == "store" else small) / "ck"
        out = run(job_cmd(remote, folder / "model.keras", "--epochs", "2"), timeout=300)
        errors = [line for line in out.stderr.splitlines() if " ERROR " in line or "Error" in line]
        assert "No space left" in out.stderr
        assert errors, "the full disk went unreported"
        final_committed = out.returncode == 0
        if final_committed:
            assert "DONE" in out.lines
        else:
            assert "the final checkpoint could not be committed" in out.stderr or "No space left" in out.stderr
        if Path(remote).exists():
            check_run(remote)
        figures["bad_inputs"][f"full-disk/training-{full_side}-{size}"] += 1
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)


class _Logged(subprocess.Popen):
    """A child whose stdout and stderr go to files, not pipes: a trainer logging every commit fills a pipe nobody
    reads within ~30 epochs and then blocks in its logging (the old trainer of the fencing test did: the race it is
    there for never ran). ``communicate`` waits and returns what it wrote."""

    def __init__(self, cmd: list[str]) -> None:
        self._logs = (tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+"))
        super().__init__(cmd, env=env_with(), stdout=self._logs[0], stderr=self._logs[1], text=True, cwd=ROOT)

    def communicate(self, input: str | None = None, timeout: float | None = None) -> tuple[str, str]:
        self.wait(timeout=timeout)
        for f in self._logs:
            f.seek(0)
        return self._logs[0].read(), self._logs[1].read()


def _popen(cmd: list[str]) -> subprocess.Popen:
    return _Logged(cmd)


def _wait_for_commit(url: str, timeout: float = 120) -> None:
    import time

    from cloudckpt import CheckpointStore

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with CheckpointStore(url) as store:
                if store.list():
                    return
        except FileNotFoundError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"nothing committed to {url} within {timeout}s")


def test_replacement_trainer_fences_the_old_one(local_url, tmp_path, figures):
    """A preempted trainer still draining while its replacement starts: the replacement claims the run; the old
    trainer's next commit is refused and its fit stops with StaleWriterError — it never overwrites the index."""
    old = _popen(job_cmd(local_url, tmp_path / "a" / "model.keras", "--epochs", "400"))
    try:
        _wait_for_commit(local_url)
        new = run(job_cmd(local_url, tmp_path / "b" / "model.keras", "--epochs", "1"), timeout=300)
        assert new.returncode == 0, new.stderr[-3000:]
        out, err = old.communicate(timeout=300)
    finally:
        if old.poll() is None:
            old.kill()
            old.wait()
    assert old.returncode not in (0, -9), "the superseded trainer went on"
    assert "StaleWriterError" in err and "superseded" in err, err[-3000:]
    state = check_run(local_url)
    assert state.index.writer.generation == 2
    fenced_id = state.index.writer.id
    late = [c.id for c in state.index.checkpoints if c.writer != fenced_id and c.created > state.index.writer.since]
    assert not late, f"the superseded trainer committed after the replacement claimed the run: {late}"
    figures["fenced"]["keras-callback"] += 1


def test_sync_service_beside_the_callback_on_one_run(local_url, tmp_path, figures):
    """The sync service does not claim the run (documented), so it commits beside a training callback that did:
    neither loses an index update, neither reports an error, and the run stays valid."""
    import signal
    import sys

    watch = tmp_path / "watch"
    watch.mkdir()
    train = _popen(job_cmd(local_url, tmp_path / "ck" / "model.keras", "--epochs", "6"))
    sync = None
    try:
        _wait_for_commit(local_url)  # the callback has claimed the run and committed
        sync = _popen([sys.executable, "-m", "cloudckpt", "-v", "sync", str(watch), "--remote", local_url,
                       "--settle", "0", "--poll", "0.05"])
        for i in range(4):
            (watch / f"export-{i}.tmp").write_bytes(random.Random(i).randbytes(50_000))
            (watch / f"export-{i}.tmp").rename(watch / f"export-{i}.bin")
        out, train_err = train.communicate(timeout=300)
        sync.send_signal(signal.SIGTERM)
        _, sync_err = sync.communicate(timeout=60)
    finally:
        for p in (train, sync):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
    assert train.returncode == 0, train_err[-3000:]
    assert not [line for line in train_err.splitlines() if " ERROR " in line]
    assert sync.returncode == 0 and "Error" not in sync_err, sync_err[-3000:]
    synced = re.findall(r"sync: committed (\S+) as (ckpt-\S+)", sync_err)
    assert {name for name, _ in synced} == {f"export-{i}.bin" for i in range(4)}, sync_err[-2000:]
    state = check_run(local_url)
    # every update landed: the index counted each commit of both writers (retention may have pruned some since)
    trained = len(re.findall(r"committed ckpt-", train_err))
    assert state.index.seq >= trained + len(synced)
    figures["races"]["local/sync-beside-callback"] += trained + len(synced)


def test_callback_resumes_on_a_run_whose_latest_came_from_sync(local_url, tmp_path):
    """Another writer's commit (sync service, `cloudckpt push`) carries no resume state: the callback resumes from
    its own newest checkpoint instead, and starts fresh when there is none."""
    from cloudckpt import CheckpointStore

    src = tmp_path / "export"
    src.mkdir()
    (src / "model.bin").write_bytes(b"exported by another writer")
    with CheckpointStore(local_url) as store:
        store.push(src, epoch=0)
    out = run(job_cmd(local_url, tmp_path / "ck" / "model.keras", "--epochs", "1"), timeout=300)
    assert out.returncode == 0, out.stderr[-1500:]
    stdout = "\n".join(out.lines)
    assert "RESUMED_FROM None" in stdout
    with CheckpointStore(local_url) as store:
        own = store.latest()
        assert any(f.path.startswith("cloudckpt_state/") for f in own.files)
        store.push(src, epoch=5)  # the run's latest is foreign again
    out = run(job_cmd(local_url, tmp_path / "ck" / "model.keras", "--epochs", "2"), timeout=300)
    assert out.returncode == 0, out.stderr[-1500:]
    stdout = "\n".join(out.lines)
    assert f"RESUMED_FROM {own.id}" in stdout
    assert stdout.count("EPOCH ") == 1  # only epoch 2 was trained
