"""Whatever ends a Keras fit, what was reported saved is committed, or the output names what was not (issue 21,
item 3).

A real training process per backend (TensorFlow, JAX) and per way training ends: a callback raising right after
epoch 2's save, ``sys.exit`` there, SIGINT there (``KeyboardInterrupt``, as Ctrl-C), and the normal end. Uploads are
slowed (1.5 s each) so the process ends while epoch 2's write and upload are in flight: Keras calls no
``on_train_end`` on an exception, and the writer and uploader are daemon threads. With ``verbose=1``, "finished saving
model to" is printed only once the file is written; the exit waits (one line) and says whether everything committed.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("keras")

from reliability.procs import ROOT, env_with  # noqa: E402

JOB = str(ROOT / "tests" / "support" / "keras_job.py")
BACKENDS = [pytest.param(name, marks=pytest.mark.skipif(importlib.util.find_spec(module) is None,
                                                        reason=f"{module} is not installed"))
            for name, module in (("tensorflow", "tensorflow"), ("jax", "jax"))]
EXPECTED_RC = {"raise": 1, "exit": 3, "sigint": -2, "normal": 0}


def run(remote: str, tmp: Path, backend: str, how: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, JOB, "--remote", remote, "--filepath", str(tmp / "ck" / "model-{epoch}.keras"),
           "--epochs", "3", "--preemption", "none", "--verbose", "1", "--deadline", "90", "--keep-last", "10",
           "--slow-uploads", "1.5"]
    if how != "normal":
        cmd += ["--end-after-epoch", "2", "--end-how", how]
    env = {**env_with(), "KERAS_BACKEND": backend}
    if backend == "jax":
        env.update(JAX_COMPILATION_CACHE_DIR=str(tmp / "jax-cache"))
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)


@pytest.mark.parametrize("how", list(EXPECTED_RC))
@pytest.mark.parametrize("backend", BACKENDS)
def test_what_was_reported_saved_is_committed_or_named(local_url, tmp_path, backend, how):
    p = run(local_url, tmp_path, backend, how)
    assert p.returncode == EXPECTED_RC[how], p.stderr[-3000:]
    saved = sorted({int(e) for e in re.findall(r"^Epoch (\d+): finished saving model to ", p.stdout, re.M)})
    assert saved == ([1, 2] if how != "normal" else [1, 2, 3]), p.stdout[-2000:]
    for epoch in saved:  # "saved" means written: the file is there, complete (Keras loads it)
        assert os.path.getsize(tmp_path / "ck" / f"model-{epoch}.keras") > 0
    from cloudckpt import CheckpointStore

    with CheckpointStore(local_url) as store:
        listed = {c.epoch for c in store.list() if c.meta.get("kind") == "model"}
    missing = [e for e in saved if e not in listed]
    named = [e for e in missing if re.search(rf"NOT committed .*epoch {e} step", p.stderr)]
    superseded = [e for e in missing if re.search(rf"epoch {e} step \d+ superseded", p.stderr)]
    assert sorted(named + superseded) == missing, f"saves of epochs {missing} were lost without a word"
    assert not named and max(saved) in listed, f"the exit wait should commit the saves: {p.stderr[-3000:]}"
    if how != "normal":
        assert re.search(r"waiting up to 90s for the checkpoints saved so far", p.stderr), p.stderr[-3000:]
        assert "every checkpoint saved is committed" in p.stderr, p.stderr[-3000:]
