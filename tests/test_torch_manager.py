"""cloudckpt.torch.CheckpointManager: exact resume after SIGKILL, SIGTERM commits and exits 143, `pull best`, fencing,
and no unpickling of what the bucket holds. The training runs are real processes (tests/support/torch_job.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from support import trainer_runs as runs  # noqa: E402

from cloudckpt import CheckpointStore, IntegrityError, StaleWriterError  # noqa: E402
from cloudckpt.torch import EXIT_PREEMPTED, CheckpointManager  # noqa: E402

SAVE_EVERY = 10


def _start(remote: str, out: Path, *extra: str) -> subprocess.Popen:
    return runs.start("torch_job.py", [remote, str(out), "--save-every", str(SAVE_EVERY), *extra])


def _run(remote: str, out: Path, *extra: str) -> list[str]:
    return runs.run("torch_job.py", [remote, str(out), "--save-every", str(SAVE_EVERY), *extra])


def _assert_same_training(a: Path, b: Path) -> None:
    runs.assert_same_training(a, b, param_groups=True)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, Path, list[str]]:
    """One uninterrupted run: its final state, its store, its output."""
    d = tmp_path_factory.mktemp("torch_ref")
    lines = _run(str(d / "store"), d / "final.pt")
    assert lines[0] == "fresh" and lines[-1] == "done"
    return d / "final.pt", d / "store", lines


def test_sigkill_at_a_random_step_then_restart_ends_identical(tmp_path, local_url, reference):
    kill_at = runs.kill_step(reference[2], SAVE_EVERY + 3)
    proc = _start(local_url, tmp_path / "final.pt", "--step-delay", "0.02")
    kill_at = runs.read_until_committed(proc, kill_at, local_url)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    committed = CheckpointStore(local_url).latest().step
    lines = _run(local_url, tmp_path / "final.pt")
    resumed = int(lines[0].split()[1])
    assert resumed == committed, lines[0]
    assert kill_at - resumed <= 2 * SAVE_EVERY, f"killed after step {kill_at}, resumed from {resumed}"
    print(f"killed after step {kill_at}, resumed from step {resumed}")
    _assert_same_training(reference[0], tmp_path / "final.pt")


def test_sigterm_mid_interval_commits_that_step_and_exits_143(tmp_path, s3_url, reference):
    stop_at = SAVE_EVERY + SAVE_EVERY // 2  # between two periodic saves
    proc = _start(s3_url, tmp_path / "final.pt", "--step-delay", "0.02")
    before = runs.read_until_step(proc, stop_at)
    proc.send_signal(signal.SIGTERM)
    rest, stderr = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, stderr
    last = [int(ln.split()[1]) for ln in before + rest.splitlines() if ln.startswith("step ")][-1]
    assert last % SAVE_EVERY, "the test wants a step between periodic saves"
    assert CheckpointStore(s3_url).latest().step == last
    lines = _run(s3_url, tmp_path / "final.pt")
    assert lines[0] == f"resumed {last}"
    _assert_same_training(reference[0], tmp_path / "final.pt")


def test_pull_best_returns_the_lowest_val_loss(tmp_path, reference):
    _, store, lines = reference
    saved = {int(s): float(v) for _, s, v in (ln.split() for ln in lines if ln.startswith("saved "))}
    best_step = min(saved, key=saved.__getitem__)
    cli = [sys.executable, "-m", "cloudckpt"]
    out = subprocess.run([*cli, "pull", "best", "--remote", str(store), "--to", str(tmp_path / "best")],
                         capture_output=True, text=True, env=runs.env(), timeout=120)
    assert out.returncode == 0, out.stderr
    ls = subprocess.run([*cli, "ls", "--remote", str(store)], capture_output=True, text=True, env=runs.env(),
                        timeout=120)
    assert ls.returncode == 0 and "[best]" in ls.stdout
    state = torch.load(tmp_path / "best" / "state.pt", weights_only=True)
    assert set(state) >= {"model", "optimizer", "scheduler", "rng", "data"}
    entry = CheckpointStore(str(store)).best()
    assert entry.step == best_step and entry.metrics["val_loss"] == saved[best_step]
    with CheckpointManager(str(store), monitor="val_loss", preemption=None) as mgr:
        assert mgr.restore("best").step == best_step


class _Boom:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_hostile_pickle_in_the_bucket_is_refused_and_never_run(tmp_path, local_url):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil"
    evil.mkdir()
    torch.save({"model": _Boom(marker)}, evil / "state.pt")
    CheckpointStore(local_url).push(evil, step=7, meta={"framework": "torch"})
    with CheckpointManager(local_url, preemption=None) as mgr:
        with pytest.raises(IntegrityError, match="refused"):
            mgr.restore()
    assert not marker.exists()


def test_a_newer_writer_fences_the_older_one(tmp_path, local_url):
    state = {"w": torch.ones(3)}
    old = CheckpointManager(local_url, preemption=None)
    old.save(1, state)
    assert old.wait(60)
    new = CheckpointManager(local_url, preemption=None)
    old.save(2, state)
    old.wait(60)
    with pytest.raises(StaleWriterError):
        old.save(3, state)
    old._shutdown()
    new.save(3, state)
    new.close()
    assert [c.step for c in CheckpointStore(local_url).list()] == [1, 3]


def test_state_that_is_not_tensors_or_plain_data_is_refused_at_save(local_url):
    with CheckpointManager(local_url, preemption=None) as mgr:
        with pytest.raises(ValueError, match=r"state\['opt'\]"):
            mgr.save(1, {"opt": object()})


def test_core_and_cli_import_no_framework():
    code = ("import sys, cloudckpt, cloudckpt.cli, cloudckpt.store; "
            "print(sorted({'torch', 'lightning', 'transformers', 'keras'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=runs.env(), timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr
