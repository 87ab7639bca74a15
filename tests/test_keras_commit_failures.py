"""A save that fails is never reported as committed (issue 21, item 2): real Keras training (TensorFlow, in a
subprocess: tests/support/keras_job.py) against moto S3 behind the fault proxy, which refuses one epoch's requests.

- refused for longer than the store budget, then let through: the checkpoint is kept, retried and committed; every
  checkpoint committed meanwhile records in its resume state the best the store had then, not the failed one's;
- refused for good: ``fit`` raises CommitFailedError naming that epoch (it returned normally before), and no
  committed state believes in its score;
- with ``on_upload_error="raise"``: the failure raises at the next save point, not at the end;
- a background write that fails (ENOSPC at a failpoint): ``flush()`` returns False and names it (it returned True);
- a preemption checkpoint whose write fails: the log says it was NOT committed (it named an older one "committed").
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest

pytest.importorskip("keras")

from reliability.faultproxy import FaultProxy  # noqa: E402
from reliability.procs import ROOT, env_with  # noqa: E402
from test_keras_resume import STEPS_PER_EPOCH  # noqa: E402

JOB = str(ROOT / "tests" / "support" / "keras_job.py")
EPOCH_KEY = re.compile(r"ckpt-e(\d{6})-")


def job(remote: str, tmp: Path, *extra: str, env: dict | None = None, timeout: float = 300):
    cmd = [sys.executable, JOB, "--remote", remote, "--filepath", str(tmp / "ck" / "model.keras"),
           "--preemption", "none", "--keep-last", "50", *extra]
    p = subprocess.run(cmd, env={**(env or env_with()), "KERAS_BACKEND": "tensorflow"}, capture_output=True,
                       text=True, timeout=timeout, cwd=ROOT)
    return p


class Refuse:
    """The proxy's filter: refuse (503) every request for one epoch's checkpoint objects until ``release`` is set
    (never, when it is None); with ``release_on_later``, release once a later epoch's upload starts (the refused
    push had failed: pushes run one at a time, in order)."""

    def __init__(self, epoch: int, *, release_on_later: bool) -> None:
        self.epoch, self.release_on_later = epoch, release_on_later
        self.released = threading.Event()
        self.refused = 0

    def __call__(self, method: str, target: str) -> bool:
        m = EPOCH_KEY.search(target)
        if not m:
            return False
        epoch = int(m.group(1))
        if self.release_on_later and epoch > self.epoch:
            self.released.set()
        if epoch == self.epoch and not self.released.is_set():
            self.refused += 1
            return True
        return False


def states(url: str, tmp: Path) -> list[tuple[object, object]]:
    """Each committed checkpoint (commit order) with its resume state."""
    from cloudckpt import CheckpointStore
    from cloudckpt.keras.state import read_state

    out = []
    with CheckpointStore(url) as store:
        for i, entry in enumerate(store.list()):
            pulled = store.pull(entry.id, to=tmp / f"pulled-{i}")
            out.append((entry, read_state(pulled.path)[0]))
    return out


def assert_best_is_committed(url: str, tmp: Path) -> list:
    """Every committed checkpoint's recorded best is the best val_loss of the model checkpoints committed up to it
    (itself included): what a run resumed from it may believe."""
    found = states(url, tmp)
    committed_best = None
    for entry, state in found:
        if entry.meta.get("kind") == "model":
            value = entry.metrics["val_loss"]
            committed_best = value if committed_best is None else min(committed_best, value)
        assert state.best is not None
        assert state.best == pytest.approx(committed_best), (
            f"{entry.id} (epoch {entry.epoch}) records best {state.best}, the store's best then was {committed_best}")
    return found


def epochs_logged(stdout: str) -> dict[int, dict]:
    return {int(m.group(1)): json.loads(m.group(2)) for m in re.finditer(r"^EPOCH (\d+) (\{.*\})$", stdout, re.M)}


def test_a_best_whose_upload_failed_is_retried_and_never_recorded_before_it_commits(s3_url, s3_server, tmp_path):
    refuse = Refuse(2, release_on_later=True)
    with FaultProxy(s3_server.endpoint, rates={"503": 1.0}, fault_filter=refuse) as proxy:
        env = env_with(AWS_ENDPOINT_URL=proxy.endpoint, AWS_ENDPOINT_URL_S3=proxy.endpoint)
        p = job(s3_url, tmp_path, "--epochs", "4", "--best-only", "--store-budget", "2", env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    assert refuse.refused > 0 and refuse.released.is_set()
    assert re.search(r"upload of (the )?checkpoint.*epoch 2.* failed", p.stderr)
    logged = epochs_logged(p.stdout)
    assert logged[2]["val_loss"] < logged[1]["val_loss"], "the test needs epoch 2 to be a new best"
    found = assert_best_is_committed(s3_url, tmp_path)
    assert 2 in [e.epoch for e, _ in found if e.meta.get("kind") == "model"], "the failed best was never retried"
    order = [e.epoch for e, _ in found]
    assert order.index(2) > order.index(3) if 3 in order else True  # committed after a later save: it was retried
    from cloudckpt import CheckpointStore

    with CheckpointStore(s3_url) as store:
        best = min(logged[e]["val_loss"] for e in logged)
        assert store.best().metrics["val_loss"] == pytest.approx(best)
        assert store.latest().epoch == 4, "a resume must start from the end, not from the retried checkpoint"


def test_a_best_that_never_commits_makes_fit_raise_and_is_never_recorded(s3_url, s3_server, tmp_path):
    refuse = Refuse(2, release_on_later=False)
    with FaultProxy(s3_server.endpoint, rates={"503": 1.0}, fault_filter=refuse) as proxy:
        env = env_with(AWS_ENDPOINT_URL=proxy.endpoint, AWS_ENDPOINT_URL_S3=proxy.endpoint)
        p = job(s3_url, tmp_path, "--epochs", "4", "--best-only", "--store-budget", "2", env=env)
    assert p.returncode != 0 and "DONE" not in p.stdout, "fit returned normally with a save not committed"
    assert re.search(r"CommitFailedError: 1 save\(s\) not committed to \S+: epoch 2 step \d+", p.stderr), \
        p.stderr[-3000:]
    logged = epochs_logged(p.stdout)
    assert logged[2]["val_loss"] < logged[1]["val_loss"], "the test needs epoch 2 to be a new best"
    found = assert_best_is_committed(s3_url, tmp_path)
    assert 2 not in [e.epoch for e, _ in found]
    assert all(s.best != pytest.approx(logged[2]["val_loss"]) for _, s in found)


def test_on_upload_error_raise_stops_training_at_the_next_save_point(s3_url, s3_server, tmp_path):
    refuse = Refuse(2, release_on_later=False)
    with FaultProxy(s3_server.endpoint, rates={"503": 1.0}, fault_filter=refuse) as proxy:
        env = env_with(AWS_ENDPOINT_URL=proxy.endpoint, AWS_ENDPOINT_URL_S3=proxy.endpoint)
        p = job(s3_url, tmp_path, "--epochs", "200", "--store-budget", "1", "--on-upload-error", "raise", env=env)
    assert p.returncode != 0
    tb = p.stderr[p.stderr.rfind("Traceback"):]
    tb = tb[:tb.find("CommitFailedError:")]
    assert re.search(r"CommitFailedError: .*epoch 2 step \d+", p.stderr), p.stderr[-3000:]
    assert "in on_train_end" not in tb and "in _check_fatal" in tb, tb
    assert len(epochs_logged(p.stdout)) < 200


def test_flush_reports_a_background_write_that_failed(local_url, tmp_path):
    env = env_with(CLOUDCKPT_FAILPOINT="keras.writer.task:2:enospc")  # epoch 2's write: a full disk
    p = job(local_url, tmp_path, "--epochs", "3", "--flush-each-epoch", env=env)
    flushes = {int(m.group(1)): (m.group(2), json.loads(m.group(3)))
               for m in re.finditer(r"^FLUSH (\d+) (True|False) (\[.*\])$", p.stdout, re.M)}
    assert flushes[1] == ("True", [])
    ok, failures = flushes[2]
    assert ok == "False", "flush() returned True after the background write failed"
    assert len(failures) == 1 and "epoch 2" in failures[0] and "No space left" in failures[0]
    assert p.returncode != 0 and "CheckpointWriteError" in p.stderr  # raised at the next boundary, as before


def test_preemption_checkpoint_whose_write_fails_is_not_logged_as_committed(local_url, tmp_path):
    # hit 1: epoch 1's save; hit 2: the preemption checkpoint (mid epoch 2)
    env = env_with(CLOUDCKPT_FAILPOINT="keras.writer.task:2:enospc")
    steps_per_epoch = STEPS_PER_EPOCH
    p = job(local_url, tmp_path, "--epochs", "3", "--preemption", "sigterm", "--kill-at", str(steps_per_epoch + 5),
            "--signal", "SIGTERM", "--no-wait-commit", env=env)
    assert p.returncode == 143, p.stderr[-3000:]
    assert "No space left" in p.stderr
    assert not re.search(r"preemption \(.*\): checkpoint \S+ at step \d+ committed", p.stderr), \
        "an older checkpoint was logged as the preemption checkpoint"
    assert re.search(rf"the checkpoint at step {steps_per_epoch + 5} was NOT committed", p.stderr), p.stderr[-3000:]
