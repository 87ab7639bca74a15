"""examples/lightning_fit.py as users run it: a run whose val_loss has plateaued (lr 0: every validation gives the
same loss, so the monitored ModelCheckpoint stops writing after its first two files) still commits a checkpoint every
``--every`` steps, so a SIGKILL late in the run resumes from a late step, not from the last improvement."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("lightning")

from cloudckpt.errors import CheckpointNotFoundError  # noqa: E402
from cloudckpt.store import CheckpointStore  # noqa: E402

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "lightning_fit.py"
STEPS_PER_EPOCH, EPOCHS, EVERY = 24, 5, 10  # 1,497 training digits in batches of 64


def _argv(tmp_path: Path, remote: str) -> list[str]:
    return [sys.executable, str(EXAMPLE), "--remote", remote, "--dir", str(tmp_path / "ckpts"), "--epochs",
            str(EPOCHS), "--every", str(EVERY), "--lr", "0"]


ENV = {**os.environ, "PYTHONPATH": str(EXAMPLE.parent.parent)}  # this checkout's cloudckpt


def _latest_step(remote: str) -> int | None:
    try:
        with CheckpointStore(remote) as store:
            return store.latest().step
    except CheckpointNotFoundError:
        return None


def test_a_kill_late_in_a_plateau_resumes_late(tmp_path, local_url):
    total = STEPS_PER_EPOCH * EPOCHS
    late = total - 4 * EVERY  # well past the plateau's start (the monitored files stop at step 2 * 24)
    log = tmp_path / "first.log"  # a file, not a pipe: nothing reads the run's output until it is killed
    with log.open("w") as out_f:
        proc = subprocess.Popen(_argv(tmp_path, local_url), cwd=tmp_path, env=ENV, stdout=out_f, stderr=out_f,
                                text=True)
    seen = None
    try:
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:  # the example's commit cadence: wait for a
            seen = _latest_step(local_url)  # late commit, then kill the run there
            if seen is not None and seen >= late:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.05)
    finally:
        if proc.poll() is None and (seen is None or seen < late):
            proc.kill()
        proc.wait(timeout=60)
    err = log.read_text()
    assert seen is not None and seen >= late, (
        f"no checkpoint past step {seen} was committed while val_loss plateaued (a kill would redo "
        f"{total - (seen or 0)} of {total} steps): {err[-2000:]}")
    committed = _latest_step(local_url)
    assert committed is not None and committed >= seen
    shutil.rmtree(tmp_path / "ckpts")  # a new machine: nothing local
    again = subprocess.run(_argv(tmp_path, local_url), cwd=tmp_path, env=ENV, capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    lines = again.stdout.splitlines()
    assert lines[0].startswith("resuming from "), lines[:3]
    assert lines[-1] == f"done at step {total}", lines[-3:]
    print(f"killed after the commit of step {seen} of {total}; resumed from step {committed}")
