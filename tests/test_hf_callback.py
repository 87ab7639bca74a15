"""cloudckpt.hf: a Trainer run killed (SIGKILL) and restarted on an emptied output_dir ends identical to an
uninterrupted one; SIGTERM commits the current step and exits 143; `pull best` is the best eval_loss. Real
processes (tests/support/hf_job.py)."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from support import trainer_runs as runs  # noqa: E402

from cloudckpt import CheckpointStore  # noqa: E402

SAVE_EVERY = 10
EXIT_PREEMPTED = runs.EXIT_PREEMPTED


def _start(remote: str, d: Path, *extra: str) -> subprocess.Popen:
    return runs.start("hf_job.py", [remote, str(d / "out"), str(d / "final.pt"), *extra])


def _run(remote: str, d: Path, *extra: str) -> list[str]:
    return runs.run("hf_job.py", [remote, str(d / "out"), str(d / "final.pt"), *extra])


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, Path, list[str]]:
    d = tmp_path_factory.mktemp("hf_ref")
    lines = _run(str(d / "store"), d)
    assert "fresh" in lines and lines[-1] == "done"
    return d / "final.pt", d / "store", lines


def test_sigkill_then_restart_on_a_new_machine_ends_identical(tmp_path, local_url, reference):
    kill_at = runs.kill_step(reference[2], SAVE_EVERY + 3)
    proc = _start(local_url, tmp_path, "--step-delay", "0.05")
    kill_at = runs.read_until_committed(proc, kill_at, local_url)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    committed = CheckpointStore(local_url).latest().step
    shutil.rmtree(tmp_path / "out")  # a new machine: nothing local
    lines = _run(local_url, tmp_path)
    assert f"resumed {committed}" in lines
    assert kill_at - committed <= 2 * SAVE_EVERY, f"killed after step {kill_at}, resumed from {committed}"
    print(f"killed after step {kill_at}, resumed from step {committed}")
    runs.assert_same_training(reference[0], tmp_path / "final.pt")


def test_sigterm_mid_interval_commits_that_step_and_exits_143(tmp_path, s3_url, reference):
    proc = _start(s3_url, tmp_path, "--step-delay", "0.05")
    before = runs.read_until_step(proc, SAVE_EVERY + SAVE_EVERY // 2)
    proc.send_signal(signal.SIGTERM)
    rest, stderr = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, stderr
    last = [int(ln.split()[1]) for ln in before + rest.splitlines() if ln.startswith("step ")][-1]
    assert last % SAVE_EVERY, "the test wants a step between periodic saves"
    assert CheckpointStore(s3_url).latest().step == last
    shutil.rmtree(tmp_path / "out")
    lines = _run(s3_url, tmp_path)
    assert f"resumed {last}" in lines
    runs.assert_same_training(reference[0], tmp_path / "final.pt")


def test_pull_best_is_the_lowest_eval_loss(tmp_path, reference):
    _, store, lines = reference
    evals = {int(s): float(v) for _, s, v in (ln.split() for ln in lines if ln.startswith("eval "))}
    best_step = min(evals, key=evals.__getitem__)
    out = subprocess.run([sys.executable, "-m", "cloudckpt", "pull", "best", "--remote", str(store), "--to",
                          str(tmp_path / "best")], capture_output=True, text=True, env=runs.env(), timeout=120)
    assert out.returncode == 0, out.stderr
    state = (tmp_path / "best" / "trainer_state.json").read_text()
    assert f'"global_step": {best_step},' in state
    assert not (tmp_path / "best" / "training_args.bin").exists()
    assert CheckpointStore(str(store)).best().metrics["eval_loss"] == evals[best_step]


def test_an_exception_right_after_a_save_still_commits_it(tmp_path, local_url):
    """The Trainer calls no on_train_end when a callback raises: the exit waits for the saves (issue 21, item 3)."""
    import re

    proc = _start(local_url, tmp_path, "--raise-after-save", "20", "--slow-uploads", "1.5")
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 1 and "a callback failed after checkpoint-20" in stderr, stderr[-3000:]
    saved = [int(n) for n in re.findall(r"^saved (\d+)$", stdout, re.M)]
    assert saved == [10, 20]
    with CheckpointStore(local_url) as store:
        listed = {c.step for c in store.list()}
    assert 20 in listed, f"checkpoint-20 was saved but never committed: {stderr[-3000:]}"
    assert all(s in listed or re.search(rf"step {s} superseded", stderr) for s in saved), stderr[-3000:]
    assert "waiting up to 90s" in stderr and "every checkpoint saved is committed" in stderr, stderr[-3000:]
