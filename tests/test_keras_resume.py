"""Exact resume, proven with real processes: training runs (tests/support/keras_job.py) are killed with SIGKILL or
SIGTERM, or told of a GCE preemption by a local metadata server, then restarted with the same command; the final weights
must be bit-identical to an uninterrupted run without the callback, and the batches trained twice are counted."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from functools import cache
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("keras")

from test_preemption import Metadata  # noqa: E402

JOB = str(Path(__file__).parent / "support" / "keras_job.py")
STEPS_PER_EPOCH = 23  # 1437 training samples of digits, batches of 64
EPOCHS = 3


class Run:
    def __init__(self, rc: int, out: str, err: str):
        self.rc, self.out, self.err = rc, out, err
        self.steps = [int(m) for m in re.findall(r"^STEP (\d+)$", out, re.M)]
        self.epochs = {int(e): json.loads(d) for e, d in re.findall(r"^EPOCH (\d+) (.*)$", out, re.M)}


def start(tmp: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    err = open(tmp / f"stderr-{len(list(tmp.glob('stderr-*')))}.log", "w+")  # a file: the pipe is read line by line
    proc = subprocess.Popen([sys.executable, JOB, "--epochs", str(EPOCHS), *args], stdout=subprocess.PIPE,
                            stderr=err, text=True, env=env, cwd=tmp)
    proc.err_file = err
    return proc


def finish(proc: subprocess.Popen, out: str = "") -> Run:
    rest = proc.stdout.read()  # through the same buffered reader the caller used
    proc.wait(timeout=300)
    proc.err_file.seek(0)
    err = proc.err_file.read()
    proc.err_file.close()
    return Run(proc.returncode, out + rest, err)


def run(tmp: Path, *args: str) -> Run:
    return finish(start(tmp, *args))


def run_until(tmp: Path, step: int, sig: int, *args: str) -> Run:
    """Start a job and, when it reports ``step``, send it ``sig`` from outside."""
    proc = start(tmp, *args)
    out = []
    for line in proc.stdout:
        out.append(line)
        if line.strip() == f"STEP {step}":
            proc.send_signal(sig)
            break
    return finish(proc, "".join(out))


def run_until_listed(tmp: Path, step: int, listed: int, sig: int, store: Path, *args: str) -> Run:
    """Start a job and send it ``sig`` at the first step from ``step`` on at which ``store`` lists the checkpoint of
    step ``listed`` (its upload runs in the background: under load it may not be committed by ``step`` yet)."""
    from cloudckpt import CheckpointStore

    proc = start(tmp, *args)
    out = []
    try:
        for line in proc.stdout:
            out.append(line)
            m = re.fullmatch(r"STEP (\d+)", line.strip())
            if m and int(m.group(1)) >= step:
                with CheckpointStore(str(store)) as s:
                    steps = [c.step for c in s.list()]
                if listed in steps or int(m.group(1)) >= EPOCHS * STEPS_PER_EPOCH - 3:  # late: assertions say why
                    proc.send_signal(sig)
                    break
    except BaseException:
        proc.kill()  # its uploads hang: never left running
        raise
    return finish(proc, "".join(out))


@cache
def baseline(shuffle: bool, tmp: str) -> tuple[list[np.ndarray], dict]:
    args = ["--no-checkpoint", "--remote", "unused", "--filepath", "m.keras", "--out", f"{tmp}/base-{shuffle}.npz"]
    r = run(Path(tmp), *args, *(["--shuffle"] if shuffle else []))
    assert r.rc == 0, r.err
    assert r.steps == list(range(1, EPOCHS * STEPS_PER_EPOCH + 1))
    return load(f"{tmp}/base-{shuffle}.npz"), r.epochs


@pytest.fixture(scope="module")
def basedir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("baseline"))


def load(path) -> list[np.ndarray]:
    with np.load(path) as f:
        return [f[k] for k in sorted(f.files, key=lambda k: int(k.split("_")[1]))]


def assert_bit_identical(path, expected: list[np.ndarray]) -> None:
    got = load(path)
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert a.tobytes() == b.tobytes(), "final weights differ from the uninterrupted run"


def redone(*runs: Run) -> int:
    steps = [s for r in runs for s in r.steps]
    assert set(steps) == set(range(1, EPOCHS * STEPS_PER_EPOCH + 1)), "every step trained at least once"
    return len(steps) - len(set(steps))


def test_sigkill_mid_epoch_and_at_epoch_end_resume_bit_identical(tmp_path, basedir):
    """shuffle=True here; shuffle=False is the S3 test below."""
    expected, epochs = baseline(True, basedir)
    args = ["--remote", str(tmp_path / "store"), "--filepath", "ckpt/m.weights.h5", "--weights-only",
            "--save-freq", "5", "--out", str(tmp_path / "final.npz"), "--shuffle"]
    first = run(tmp_path, *args, "--kill-at", "31")  # mid-epoch 2; last commit at step 30
    assert first.rc == -signal.SIGKILL
    second = run(tmp_path, *args, "--kill-at", str(2 * STEPS_PER_EPOCH))  # last batch of epoch 2, before its end
    assert second.rc == -signal.SIGKILL
    assert second.steps[0] == 31, "resumed right after the last committed step"
    third = run(tmp_path, *args)
    assert third.rc == 0, third.err
    assert "SKIPPED 22" in third.out  # resumed 22 batches into epoch 2 (committed at step 45), then its last batch
    assert_bit_identical(tmp_path / "final.npz", expected)
    assert redone(first, second, third) == 2  # one batch per kill: at most one save interval
    assert third.epochs[EPOCHS] == epochs[EPOCHS], "the resumed epoch's logs (metrics restored) match too"


def test_sigkill_at_an_arbitrary_moment_on_s3_with_epoch_saves(tmp_path, basedir, s3_url):
    expected, _ = baseline(False, basedir)
    args = ["--remote", s3_url, "--filepath", "ckpt/e{epoch:02d}.keras", "--out", str(tmp_path / "final.npz")]
    first = run_until(tmp_path, 30, signal.SIGKILL, *args)  # from outside, mid-epoch 2, no waiting for uploads
    assert first.rc == -signal.SIGKILL
    from cloudckpt.store import CheckpointStore

    with CheckpointStore(s3_url) as store:  # what was committed when the kill landed (uploads are asynchronous)
        committed = store.latest().step if store.list() else 0
    assert committed in (0, STEPS_PER_EPOCH), "epoch saves commit at epoch ends only"
    second = run(tmp_path, *args)
    assert second.rc == 0, second.err
    assert_bit_identical(tmp_path / "final.npz", expected)
    assert second.steps[0] - 1 == committed, "resumed right after the last committed checkpoint"
    assert redone(first, second) == first.steps[-1] - committed, "only what came after that commit is redone"


def test_sigkill_mid_epoch_on_azure_resumes_bit_identical(tmp_path, basedir, az_url):
    """remote="az://...": batch saves committed to Azure (Azurite), a SIGKILL mid-epoch, a bit-identical resume."""
    expected, _ = baseline(True, basedir)
    args = ["--remote", az_url, "--filepath", "ckpt/m.weights.h5", "--weights-only", "--save-freq", "5",
            "--out", str(tmp_path / "final.npz"), "--shuffle"]
    first = run(tmp_path, *args, "--kill-at", "31")  # mid-epoch 2; last commit at step 30
    assert first.rc == -signal.SIGKILL
    second = run(tmp_path, *args)
    assert second.rc == 0, second.err
    assert second.steps[0] == 31, "resumed right after the last committed step"
    assert_bit_identical(tmp_path / "final.npz", expected)
    assert redone(first, second) == 1


def test_preemption_notices_commit_and_exit_143_then_resume_bit_identical(tmp_path, basedir):
    expected, epochs = baseline(True, basedir)
    meta = Metadata()
    try:
        args = ["--remote", str(tmp_path / "store"), "--filepath", "ckpt/best.keras", "--best-only", "--shuffle",
                "--out", str(tmp_path / "final.npz")]
        gce = ["--preemption", "sigterm,gce", "--endpoints", json.dumps({"gce": meta.url})]

        meta.notice = True  # announced from the start: the first poll (made at once) sees it
        first = run(tmp_path, *args, *gce)
        meta.notice = False
        assert first.rc == 143, first.err
        assert "GCE instance/preempted: TRUE" in first.err
        assert re.search(r"committed [\d.]+s after the notice", first.err)
        second = run_until(tmp_path, 40, signal.SIGTERM, *args)  # a real SIGTERM from outside
        assert second.rc == 143, second.err
        took = float(re.search(r"committed ([\d.]+)s after the notice", second.err).group(1))
        assert took < 25
        third = run(tmp_path, *args)
        assert third.rc == 0, third.err
    finally:
        meta.close()
    assert_bit_identical(tmp_path / "final.npz", expected)
    assert redone(first, second, third) == 0, "a preemption checkpoint is taken at the batch boundary: nothing redone"
    assert third.epochs[EPOCHS] == epochs[EPOCHS]
    assert (tmp_path / "ckpt" / "best.keras").exists()


def test_sigterm_with_a_hung_upload_exits_143_by_the_deadline_and_resumes(tmp_path, basedir):
    expected, _ = baseline(False, basedir)
    args = ["--remote", str(tmp_path / "store"), "--filepath", "ckpt/m.weights.h5", "--weights-only",
            "--save-freq", "10", "--out", str(tmp_path / "final.npz")]
    first = run_until_listed(tmp_path, 25, 20, signal.SIGTERM, tmp_path / "store", *args, "--hang-uploads-after",
                             "20", "--deadline", "2")
    assert first.rc == 143, first.err
    assert "was NOT committed within 2s" in first.err
    second = run(tmp_path, *args)
    assert second.rc == 0, second.err
    assert "RESUMED_FROM ckpt-e000001-s0000000020" in second.out  # the latest committed one
    assert_bit_identical(tmp_path / "final.npz", expected)
    assert redone(first, second) == len([s for s in first.steps if s > 20])
