"""Real training processes for the PyTorch-family tests (torch, Hugging Face, Lightning): start one, read its
``step N`` lines until a chosen step (to kill it there), run one to the end, and compare two runs' final states."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
JOBS = Path(__file__).parent
EXIT_PREEMPTED = 143


def env() -> dict[str, str]:
    """This environment with the repository first on PYTHONPATH (the job imports this checkout's cloudckpt)."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


class Job(subprocess.Popen):
    """A training process: stdout a pipe (its ``step N`` lines are read as they come), stderr a file (read only at
    the end: a pipe nobody reads meanwhile would block a job that logs more than it holds)."""

    def __init__(self, cmd: list[str]) -> None:
        self._stderr_file = tempfile.TemporaryFile("w+")
        super().__init__(cmd, stdout=subprocess.PIPE, stderr=self._stderr_file, text=True, env=env())

    def communicate(self, input: str | None = None, timeout: float | None = None) -> tuple[str, str]:
        out, _ = super().communicate(input, timeout)
        return out, self.stderr_text()

    def stderr_text(self) -> str:
        """What the job wrote to stderr so far."""
        self._stderr_file.seek(0)
        return self._stderr_file.read()


def start(job: str, args: Sequence[str]) -> Job:
    """Start ``tests/support/<job>`` with ``args``."""
    return Job([sys.executable, str(JOBS / job), *args])


def run(job: str, args: Sequence[str]) -> list[str]:
    """Run the job to its end (it must exit 0); its stdout lines."""
    proc = start(job, args)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    return stdout.splitlines()


def read_until_step(proc: Job, step: int) -> list[str]:
    """The job's stdout lines up to the first ``step N`` line with N >= ``step`` (the job is left running)."""
    lines = []
    for line in proc.stdout:  # type: ignore[union-attr]
        lines.append(line.strip())
        if line.startswith("step ") and int(line.split()[1]) >= step:
            return lines
    raise AssertionError(f"the job ended before step {step}: {lines[-3:]} {proc.stderr_text()}")


def kill_step(reference_lines: list[str], low: int) -> int:
    """A step to kill the job at, drawn from the steps the job really has: from ``low`` up to one before the last
    ``step N`` line of an uninterrupted run's output (so the job is still running when it is killed)."""
    last = max(int(ln.split()[1]) for ln in reference_lines if ln.startswith("step "))
    assert last - 1 >= low, f"the job has only {last} steps; a kill from step {low} on can't be drawn"
    return random.Random().randint(low, last - 1)


def read_until_committed(proc: Job, step: int, remote: str) -> int:
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
            raise AssertionError(f"the job ended before any checkpoint was committed: {proc.stderr_text()}")
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
