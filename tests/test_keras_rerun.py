"""A finished script run again (issue 24 item 2), as real processes: it trains nothing, and says so in one line
visible by default (no logging set up) with the way to start over; a changed model raises ResumeMismatchError,
one line with the same way out."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("keras")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = """
import sys
import keras
from support.keras_job import data
from cloudckpt.keras import CloudCheckpoint

x, y = data()
width, remote, folder = int(sys.argv[1]), sys.argv[2], sys.argv[3]
model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(width, activation="relu"), keras.layers.Dense(10)])
model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
cb = CloudCheckpoint(folder + "/m.weights.h5", save_weights_only=True, remote=remote)
history = model.fit(x[:320], y[:320], batch_size=64, epochs=2, verbose=0, callbacks=[cb])
print("epochs trained:", len(history.epoch))
"""


def train(tmp_path: Path, width: int, remote: str) -> subprocess.CompletedProcess:
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]), "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run([sys.executable, str(script), str(width), remote, str(tmp_path / "ck")], env=env,
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)


def cloudckpt_lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if "cloudckpt" in ln]


def test_a_rerun_of_a_finished_run_says_so_and_a_changed_model_gets_a_way_out(tmp_path, local_url):
    first = train(tmp_path, 16, local_url)
    assert first.returncode == 0 and "epochs trained: 2" in first.stdout, first.stderr
    assert cloudckpt_lines(first.stderr) == []
    again = train(tmp_path, 16, local_url)
    assert again.returncode == 0 and "epochs trained: 0" in again.stdout, again.stderr
    [line] = cloudckpt_lines(again.stderr)
    assert line.startswith("cloudckpt: run already finished at epoch 2 of 2 (ckpt-e000002-")
    assert line.endswith("pass resume=False or a new remote to start over")
    changed = train(tmp_path, 24, local_url)
    assert changed.returncode == 1
    last = changed.stderr.strip().splitlines()[-1]
    assert last.startswith("cloudckpt.errors.ResumeMismatchError: this model does not match checkpoint ckpt-e000002")
    assert last.endswith("pass resume=False or a new remote to start over") and "variable.shape=(64, 24)" in last
