"""Each adapter commits a checkpoint with the metrics the trainer logged at the step that wrote it, or none (issue 21
item 8): real training jobs (tests/support/*_job.py) print what they logged; the store must hold the same numbers.

The Lightning case is the usual pair of callbacks — a best-2 ModelCheckpoint by val_loss and a periodic one with no
monitor and ``save_last=True`` — where a periodic file used to be committed with the other callback's last score.
"""

from __future__ import annotations

import json
import math

import pytest
from support import trainer_runs as runs

from cloudckpt import CheckpointStore

pytest.importorskip("torch")


def _logged(lines: list[str], tag: str) -> dict[int, float]:
    """``{step: value}`` from the job's ``TAG STEP VALUE`` lines."""
    return {int(ln.split()[1]): float(ln.split()[2]) for ln in lines if ln.startswith(f"{tag} ")}


def test_lightning_files_carry_their_own_steps_score_or_none(tmp_path):
    pytest.importorskip("lightning")
    store = tmp_path / "store"
    lines = runs.run("lightning_job.py", [str(store), str(tmp_path / "root"), str(tmp_path / "final.pt"),
                                          "--periodic", "--epochs", "8", "--lr", "0.05"])
    val = _logged(lines, "val")
    best_so_far = [min(v for s, v in val.items() if s <= step) for step in sorted(val)]
    assert any(val[s] > b for s, b in zip(sorted(val), best_so_far)), "the run must get worse at some epoch"
    entries = CheckpointStore(str(store)).list()
    names = [c.meta["name"] for c in entries]
    assert any(n.startswith("periodic-") for n in names) and any(n.startswith("best-") for n in names)
    for c in entries:
        if c.meta["name"].startswith("best-"):  # written by the monitoring callback: its step's score
            assert c.metrics == {"val_loss": val[c.step]}, c.meta["name"]
        else:  # periodic files and last.ckpt: no monitoring callback wrote them
            assert c.metrics in ({}, {"val_loss": val[c.step]}), c.meta["name"]
    _, best_name, best_score = next(ln.split() for ln in lines if ln.startswith("best "))
    best = CheckpointStore(str(store)).best()
    assert best.meta["name"] == best_name and best.metrics["val_loss"] == float(best_score)


def test_torch_manager_commits_the_metrics_of_each_save(tmp_path, local_url):
    lines = runs.run("torch_job.py", [local_url, str(tmp_path / "out.pt"), "--save-every", "7"])
    saved = _logged(lines, "saved")
    entries = CheckpointStore(local_url).list()
    assert entries
    for c in entries:
        assert c.metrics == ({"val_loss": saved[c.step]} if c.step in saved else {}), c.id


def test_hf_callback_commits_the_eval_metrics_of_its_step(tmp_path, local_url):
    pytest.importorskip("transformers")
    lines = runs.run("hf_job.py", [local_url, str(tmp_path / "out"), str(tmp_path / "final.pt")])
    evals = _logged(lines, "eval")
    entries = CheckpointStore(local_url).list()
    assert entries
    for c in entries:
        assert c.metrics["eval_loss"] == evals[c.step], c.id
        assert all(k.startswith("eval_") and math.isfinite(v) for k, v in c.metrics.items())


def test_keras_callback_commits_the_logs_of_its_epoch(tmp_path, local_url, monkeypatch):
    pytest.importorskip("keras")
    monkeypatch.setenv("KERAS_BACKEND", "torch")
    filepath = str(tmp_path / "ckpt" / "e{epoch:02d}.keras")
    lines = runs.run("keras_job.py", ["--remote", local_url, "--filepath", filepath, "--epochs", "3"])
    logs = {int(ln.split()[1]): json.loads(ln.split(" ", 2)[2]) for ln in lines if ln.startswith("EPOCH ")}
    entries = CheckpointStore(local_url).list()
    assert entries
    for c in entries:
        assert c.metrics == logs[c.epoch], c.id
