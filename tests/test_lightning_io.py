"""cloudckpt.lightning: Lightning's own ModelCheckpoint commits through CloudCheckpointIO; a run killed (SIGKILL) and
restarted on an emptied folder with fit(ckpt_path="last") ends identical to an uninterrupted one; SIGTERM commits the
current step and exits 143; Lightning's removals are mirrored in the store; `pull best` is Lightning's best. Real
processes (tests/support/lightning_job.py)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("lightning")

from support import trainer_runs as runs  # noqa: E402

from cloudckpt import CheckpointStore  # noqa: E402

SAVE_EVERY = 10
EXIT_PREEMPTED = runs.EXIT_PREEMPTED


def _start(remote: str, d: Path, *extra: str) -> subprocess.Popen:
    return runs.start("lightning_job.py", [remote, str(d / "root"), str(d / "final.pt"), *extra])


def _run(remote: str, d: Path, *extra: str) -> list[str]:
    return runs.run("lightning_job.py", [remote, str(d / "root"), str(d / "final.pt"), *extra])


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, Path, list[str]]:
    d = tmp_path_factory.mktemp("lightning_ref")
    lines = _run(str(d / "store"), d)
    assert "fresh" in lines and lines[-1] == "done"
    return d, d / "store", lines


def test_sigkill_then_fit_last_on_a_new_machine_ends_identical(tmp_path, local_url, reference):
    kill_at = runs.kill_step(reference[2], SAVE_EVERY + 3)
    proc = _start(local_url, tmp_path, "--step-delay", "0.05")
    kill_at = runs.read_until_committed(proc, kill_at, local_url)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    committed = CheckpointStore(local_url).latest().step
    shutil.rmtree(tmp_path / "root")  # a new machine: nothing local
    lines = _run(local_url, tmp_path)
    assert any(ln.startswith("resumed ") for ln in lines), lines[:5]
    assert kill_at - committed <= 2 * SAVE_EVERY, f"killed after step {kill_at}, resumed from {committed}"
    print(f"killed after step {kill_at}, resumed from step {committed}")
    runs.assert_same_training(reference[0] / "final.pt", tmp_path / "final.pt")


def test_sigterm_mid_epoch_commits_that_step_and_exits_143(tmp_path, s3_url):
    # the delay sits inside the training step: the signal lands there, after the previous batch's checks
    proc = _start(s3_url, tmp_path, "--train-delay", "0.2")
    before = runs.read_until_step(proc, SAVE_EVERY + SAVE_EVERY // 2)
    proc.send_signal(signal.SIGTERM)
    rest, stderr = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, stderr
    last = [int(ln.split()[1]) for ln in before + rest.splitlines() if ln.startswith("step ")][-1]
    assert last % SAVE_EVERY, "the test wants a step between periodic saves"
    latest = CheckpointStore(s3_url).latest()
    assert latest.step == last and latest.meta["name"] == "last.ckpt"


def test_store_mirrors_lightning_top_k_and_pull_best_is_lightnings_best(tmp_path, reference):
    d, store, lines = reference
    _, best_name, best_score = next(ln.split() for ln in lines if ln.startswith("best "))
    local = sorted(os.listdir(d / "root" / "ckpts"))
    assert sorted(c.meta["name"] for c in CheckpointStore(str(store)).list()) == local
    out = subprocess.run([sys.executable, "-m", "cloudckpt", "pull", "best", "--remote", str(store), "--to",
                          str(tmp_path / "best")], capture_output=True, text=True, env=runs.env(), timeout=120)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "best" / best_name).is_file()
    assert CheckpointStore(str(store)).best().metrics["val_loss"] == pytest.approx(float(best_score), rel=1e-6)
