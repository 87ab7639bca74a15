"""cloudckpt.hf: a Trainer run killed (SIGKILL) and restarted on an emptied output_dir ends identical to an
uninterrupted one; SIGTERM commits the current step and exits 143; `pull best` is the best eval_loss. Real
processes (tests/hf_job.py)."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from cloudckpt import CheckpointStore  # noqa: E402

JOB = Path(__file__).with_name("hf_job.py")
ROOT = Path(__file__).resolve().parents[1]
SAVE_EVERY = 10
EXIT_PREEMPTED = 143


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def _start(remote: str, d: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(JOB), remote, str(d / "out"), str(d / "final.pt"), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())


def _run(remote: str, d: Path) -> list[str]:
    proc = _start(remote, d)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    return stdout.splitlines()


def _read_until_step(proc: subprocess.Popen, step: int) -> list[str]:
    lines = []
    for line in proc.stdout:  # type: ignore[union-attr]
        lines.append(line.strip())
        if line.startswith("step ") and int(line.split()[1]) >= step:
            return lines
    raise AssertionError(f"the job ended before step {step}: {lines[-3:]} {proc.stderr.read()}")  # type: ignore


def _assert_same_training(a: Path, b: Path) -> None:
    x, y = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    for k, v in x["model"].items():
        assert torch.equal(v, y["model"][k]), k
    for i, st in x["optimizer"]["state"].items():
        for k, v in st.items():
            assert torch.equal(v, y["optimizer"]["state"][i][k]), (i, k)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, Path, list[str]]:
    d = tmp_path_factory.mktemp("hf_ref")
    lines = _run(str(d / "store"), d)
    assert "fresh" in lines and lines[-1] == "done"
    return d / "final.pt", d / "store", lines


def test_sigkill_then_restart_on_a_new_machine_ends_identical(tmp_path, local_url, reference):
    kill_at = random.Random().randint(SAVE_EVERY + 3, 50)
    proc = _start(local_url, tmp_path, "--step-delay", "0.05")
    _read_until_step(proc, kill_at)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    committed = CheckpointStore(local_url).latest().step
    shutil.rmtree(tmp_path / "out")  # a new machine: nothing local
    lines = _run(local_url, tmp_path)
    assert f"resumed {committed}" in lines
    assert kill_at - committed <= 2 * SAVE_EVERY, f"killed after step {kill_at}, resumed from {committed}"
    print(f"killed after step {kill_at}, resumed from step {committed}")
    _assert_same_training(reference[0], tmp_path / "final.pt")


def test_sigterm_mid_interval_commits_that_step_and_exits_143(tmp_path, s3_url, reference):
    proc = _start(s3_url, tmp_path, "--step-delay", "0.05")
    before = _read_until_step(proc, SAVE_EVERY + SAVE_EVERY // 2)
    proc.send_signal(signal.SIGTERM)
    rest, stderr = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, stderr
    last = [int(ln.split()[1]) for ln in before + rest.splitlines() if ln.startswith("step ")][-1]
    assert last % SAVE_EVERY, "the test wants a step between periodic saves"
    assert CheckpointStore(s3_url).latest().step == last
    shutil.rmtree(tmp_path / "out")
    lines = _run(s3_url, tmp_path)
    assert f"resumed {last}" in lines
    _assert_same_training(reference[0], tmp_path / "final.pt")


def test_pull_best_is_the_lowest_eval_loss(tmp_path, reference):
    _, store, lines = reference
    evals = {int(s): float(v) for _, s, v in (ln.split() for ln in lines if ln.startswith("eval "))}
    best_step = min(evals, key=evals.__getitem__)
    out = subprocess.run([sys.executable, "-m", "cloudckpt", "pull", "best", "--from", str(store), "--to",
                          str(tmp_path / "best")], capture_output=True, text=True, env=_env(), timeout=120)
    assert out.returncode == 0, out.stderr
    state = (tmp_path / "best" / "trainer_state.json").read_text()
    assert f'"global_step": {best_step},' in state
    assert not (tmp_path / "best" / "training_args.bin").exists()
    assert CheckpointStore(str(store)).best().metrics["eval_loss"] == evals[best_step]
