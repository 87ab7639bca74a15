"""CloudCheckpoint on Keras' JAX and PyTorch backends (the TensorFlow variants are test_keras_resume.py,
test_keras_callback.py, test_keras_backends_refit.py and test_keras_modelcheckpoint_parity.py, run in this process).

Each backend gets its own processes, since Keras reads ``KERAS_BACKEND`` once, at import:
- a real training job (tests/support/keras_job.py) SIGKILLed mid-epoch, restarted, preempted with SIGTERM (exit 143),
  restarted again: the final weights are bit-identical to an uninterrupted run, one batch is trained twice (the one
  after the last commit before the SIGKILL) and none after the preemption;
- the in-process suites, run by pytest under that backend: Keras' own ModelCheckpoint tests with CloudCheckpoint in
  its place, and the same callback object fit again after an exception.
"""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("keras")

HERE = Path(__file__).parent
from test_keras_resume import EPOCHS, JOB, STEPS_PER_EPOCH, Run, assert_bit_identical, finish, load, redone  # noqa: E402,I001

BACKENDS = [pytest.param(name, marks=pytest.mark.skipif(importlib.util.find_spec(module) is None,
                                                        reason=f"{module} is not installed"))
            for name, module in (("jax", "jax"), ("torch", "torch"))]


def backend_env(backend: str, tmp: Path) -> dict[str, str]:
    """The environment of a process on ``backend``; JAX processes share a compilation cache (the restarted runs load
    the same compiled steps instead of compiling them again: about half their CPU time)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "KERAS_BACKEND": backend}
    if backend == "jax":
        env.update(JAX_COMPILATION_CACHE_DIR=str(tmp / "jax-cache"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return env


def start(tmp: Path, backend: str, *args: str) -> subprocess.Popen:
    env = backend_env(backend, tmp)
    err = open(tmp / f"stderr-{len(list(tmp.glob('stderr-*')))}.log", "w+")
    proc = subprocess.Popen([sys.executable, JOB, "--epochs", str(EPOCHS), *args], stdout=subprocess.PIPE,
                            stderr=err, text=True, env=env, cwd=tmp)
    proc.err_file = err
    return proc


def run_until(tmp: Path, backend: str, step: int | None, sig: int | None, *args: str) -> Run:
    """Run a job on ``backend``; when it reports ``step``, send it ``sig`` from outside."""
    proc = start(tmp, backend, *args)
    out = []
    for line in proc.stdout:
        out.append(line)
        if step is not None and line.strip() == f"STEP {step}":
            proc.send_signal(sig)
            break
    return finish(proc, "".join(out))


@pytest.mark.parametrize("backend", BACKENDS)
def test_sigkill_mid_epoch_then_preemption_resume_bit_identical(tmp_path, backend):
    # the uninterrupted run, beside the first interrupted one (they are independent)
    baseline = start(tmp_path, backend, "--no-checkpoint", "--remote", "unused", "--filepath", "m.keras", "--shuffle",
                     "--out", str(tmp_path / "base.npz"))
    # weights-only .weights.h5: the state reuses Keras' file (the optimizer is in it); every 5th batch a save
    args = ["--remote", str(tmp_path / "store"), "--filepath", "ckpt/m.weights.h5", "--weights-only",
            "--save-freq", "5", "--shuffle", "--out", str(tmp_path / "final.npz")]
    first = run_until(tmp_path, backend, None, None, *args, "--kill-at", "31")  # epoch 2; step 30 committed
    assert first.rc == -signal.SIGKILL, first.err
    base = finish(baseline)
    assert base.rc == 0, base.err
    assert base.steps == list(range(1, EPOCHS * STEPS_PER_EPOCH + 1))
    expected = load(tmp_path / "base.npz")

    second = run_until(tmp_path, backend, 40, signal.SIGTERM, *args)  # a real SIGTERM from outside
    assert second.rc == 143, second.err
    assert second.steps[0] == 31, "resumed right after the last committed step"
    assert re.search(r"resumed from ckpt-e000002-s0000000030-\w+ .*: epoch 2, 7 batches into it", second.err)
    assert re.search(r"committed [\d.]+s after the notice", second.err)
    third = run_until(tmp_path, backend, None, None, *args)
    assert third.rc == 0, third.err
    assert third.steps[0] == second.steps[-1] + 1, "the preemption checkpoint is at the batch boundary"

    assert_bit_identical(tmp_path / "final.npz", expected)
    assert redone(first, second, third) == 1, "one batch trained twice: the one after the last commit"
    assert third.epochs[EPOCHS] == base.epochs[EPOCHS], "the resumed run's logs (metrics restored) match too"


def test_in_process_suites_on_jax_and_torch(tmp_path):
    """Keras' own model_checkpoint_test.py with CloudCheckpoint in place, and the fit-again tests, under each backend
    (the two pytest processes run side by side)."""
    files = ["tests/test_keras_modelcheckpoint_parity.py", "tests/test_keras_backends_refit.py"]
    backends = [name for name, module in (("jax", "jax"), ("torch", "torch")) if importlib.util.find_spec(module)]
    if not backends:
        pytest.skip("neither jax nor torch is installed")
    procs = {b: subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files],
                                 cwd=HERE.parent, env=backend_env(b, tmp_path), stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True) for b in backends}
    for backend, proc in procs.items():
        out, _ = proc.communicate(timeout=900)
        assert proc.returncode == 0, f"{backend}:\n{out[-6000:]}"
        assert re.search(r"\b5 passed\b", out), f"{backend}:\n{out[-2000:]}"
