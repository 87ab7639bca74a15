"""Real training processes for the PyTorch-family tests (torch, Hugging Face, Lightning): start one, read its
``step N`` lines until a chosen step (to kill it there), run one to the end, and compare two runs' final states."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
JOBS = Path(__file__).parent
EXIT_PREEMPTED = 143


def env() -> dict[str, str]:
    """This environment with the repository first on PYTHONPATH (the job imports this checkout's cloudckpt)."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def start(job: str, args: Sequence[str]) -> subprocess.Popen:
    """Start ``tests/support/<job>`` with ``args``; stdout and stderr are pipes."""
    return subprocess.Popen([sys.executable, str(JOBS / job), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env())


def run(job: str, args: Sequence[str]) -> list[str]:
    """Run the job to its end (it must exit 0); its stdout lines."""
    proc = start(job, args)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    return stdout.splitlines()


def read_until_step(proc: subprocess.Popen, step: int) -> list[str]:
    """The job's stdout lines up to the first ``step N`` line with N >= ``step`` (the job is left running)."""
    lines = []
    for line in proc.stdout:  # type: ignore[union-attr]
        lines.append(line.strip())
        if line.startswith("step ") and int(line.split()[1]) >= step:
            return lines
    raise AssertionError(f"the job ended before step {step}: {lines[-3:]} {proc.stderr.read()}")  # type: ignore


def kill_step(reference_lines: list[str], low: int) -> int:
    """A step to kill the job at, drawn from the steps the job really has: from ``low`` up to one before the last
    ``step N`` line of an uninterrupted run's output (so the job is still running when it is killed)."""
    last = max(int(ln.split()[1]) for ln in reference_lines if ln.startswith("step "))
    assert last - 1 >= low, f"the job has only {last} steps; a kill from step {low} on can't be drawn"
    return random.Random().randint(low, last - 1)


def read_until_committed(proc: subprocess.Popen, step: int, remote: str) -> int:
    """Read the job's output up to ``step``, then on until the store lists a checkpoint (commits run in the
    background: under load the first one may land a few steps later); return the last step read (the job is left
    running, to be killed there)."""
    from cloudckpt import CheckpointStore
    from cloudckpt.errors import CheckpointNotFoundError

    lines = read_until_step(proc, step)
    last = int(lines[-1].split()[1])
    while True:
        try:
            CheckpointStore(remote).latest()
            return last
        except CheckpointNotFoundError:
            pass
        line = proc.stdout.readline()  # type: ignore[union-attr]
        if not line:
            raise AssertionError(f"the job ended before any checkpoint was committed: {proc.stderr.read()}")  # type: ignore
        if line.startswith("step "):
            last = int(line.split()[1])


def assert_same_training(a: Path, b: Path, *, param_groups: bool = False) -> None:
    """The two final states (``torch.save`` of model and optimizer state dicts) are bit-identical."""
    import torch

    x, y = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    for k, v in x["model"].items():
        assert torch.equal(v, y["model"][k]), k
    for i, st in x["optimizer"]["state"].items():
        for k, v in st.items():
            assert torch.equal(v, y["optimizer"]["state"][i][k]), (i, k)
    if param_groups:
        assert x["optimizer"]["param_groups"] == y["optimizer"]["param_groups"]
