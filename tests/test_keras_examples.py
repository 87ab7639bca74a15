"""The examples run as users run them: the seed tutorial's two ModelCheckpoint examples (adapted only by the class
name and ``remote=``) against S3 and GCS, and the demo's whole preemption story on the local default store."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("keras")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run(tmp_path, script, *args, timeout=400):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    env.pop("CLOUDCKPT_REMOTE", None)
    return subprocess.run([sys.executable, str(EXAMPLES / script), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("script", ["01_best_weights.py", "02_every_epoch_full_model.py"])
def test_seed_examples_are_the_tutorial_with_one_change(script):
    src = (EXAMPLES / script).read_text()
    assert "CloudCheckpoint(" in src and "ModelCheckpoint(" not in src.split('"""', 2)[2]
    assert "remote=args.remote" in src


def test_example_1_best_weights_on_s3(tmp_path, s3_url):
    from cloudckpt.store import CheckpointStore

    done = run(tmp_path, "01_best_weights.py", "--remote", s3_url, "--dir", str(tmp_path / "ckpt"), "--epochs", "3")
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.search(r"test accuracy 0\.\d+", done.stdout)
    assert os.listdir(tmp_path / "ckpt") == ["checkpoint.model.weights.h5"]
    with CheckpointStore(s3_url) as store:
        best = store.best()
        assert best.meta["file"] == "checkpoint.model.weights.h5"
        pulled = store.pull("best", to=tmp_path / "pulled")
        assert (pulled.path / best.meta["file"]).read_bytes() == (tmp_path / "ckpt" / best.meta["file"]).read_bytes()


def test_example_2_full_model_every_epoch_on_gcs(tmp_path, gcs_url):
    from cloudckpt.store import CheckpointStore

    done = run(tmp_path, "02_every_epoch_full_model.py", "--remote", gcs_url, "--dir", str(tmp_path / "ckpt"),
               "--epochs", "3")
    assert done.returncode == 0, done.stderr[-3000:]
    files = sorted(os.listdir(tmp_path / "ckpt"))
    assert [f[:9] for f in files] == ["model-01-", "model-02-", "model-03-"], files
    with CheckpointStore(gcs_url) as store:
        index = store.index()
        assert index.run.monitor == "val_accuracy" and index.run.mode == "max"
        assert store.latest().epoch == 3
        assert {c.meta.get("file") for c in index.checkpoints} <= set(files)


def test_demo_tells_the_preemption_story(tmp_path):
    done = run(tmp_path, "demo.py", "--dir", str(tmp_path / "demo"), "--epochs", "3", "--sigterm-at-step", "50")
    out = done.stdout
    assert done.returncode == 0, out[-3000:] + done.stderr[-2000:]
    assert "training exited with status 143" in out
    assert re.search(r"committed [\d.]+s after the notice", out)
    assert re.search(r"resumed from ckpt-\S+ .*epoch 2, \d+ batches into it", out)
    assert "$ cloudckpt pull best" in out and "pulled ckpt-" in out
    assert re.search(r"test accuracy 0\.\d+", out)
    assert "I0000" not in out
    assert (tmp_path / "demo" / "pulled" / "digits.keras").is_file()
