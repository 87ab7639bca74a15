"""The Keras callback on the bad day: SIGKILLed at random while it trains and commits, saving through 20% network
faults, and training on a full disk. Training runs in a real subprocess (``tests/keras_job.py``: digits, a small
dense model, ``CloudCheckpoint`` committing every 5 batches)."""

from __future__ import annotations

import importlib.util
import random
import re
import subprocess
from pathlib import Path

import pytest

from .faultproxy import FaultProxy
from .invariants import check_run
from .procs import ROOT, env_with, run, run_and_kill

pytestmark = pytest.mark.skipif(importlib.util.find_spec("keras") is None, reason="keras is not installed")
JOB = str(ROOT / "tests" / "keras_job.py")


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


@pytest.mark.parametrize("full_side,size", [("store", "150k"), ("store", "20k"),
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
