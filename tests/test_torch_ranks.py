"""cloudckpt.torch.CheckpointManager under torch.distributed (gloo, CPU, 2 ranks): one claim per job, a replicated
state written by rank 0, a sharded (FSDP2) state through DCP, restore on every rank, exact resume after a rank is
SIGKILLed mid-save, and SIGTERM on one rank making every rank save the same step and exit 143.

Each rank is its own process, started as torchrun starts them (RANK, WORLD_SIZE, MASTER_ADDR/PORT in the
environment; tests/support/torch_ranks_job.py), so the test holds each rank's process: it signals one rank and reads
each rank's exit status. When a rank dies the other fails at its next collective, as under torchrun.
"""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from support import trainer_runs as runs  # noqa: E402

from cloudckpt import CheckpointStore  # noqa: E402

WORLD = 2
SAVE_EVERY = 4
STEPS = 16
DEADLINE = 25.0  # the manager's preemption_deadline (its default), counted from the notice


class Job:
    """The ranks of one run: rank 0's stdout is a pipe (read as it goes), the others' output goes to files."""

    def __init__(self, tmp: Path, remote: str, out: Path, *args: str) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.logs = []
        self.procs = []
        for rank in range(WORLD):
            env = {**runs.env(), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(WORLD),
                   "LOCAL_WORLD_SIZE": str(WORLD), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
            err = open(tmp / f"rank{rank}-{port}.err", "w+")  # noqa: SIM115 - closed in finish()
            outf = subprocess.PIPE if rank == 0 else open(tmp / f"rank{rank}-{port}.out", "w+")  # noqa: SIM115
            self.logs.append((outf, err))
            self.procs.append(subprocess.Popen(
                [sys.executable, str(runs.JOBS / "torch_ranks_job.py"), remote, str(out), "--save-every",
                 str(SAVE_EVERY), "--steps", str(STEPS), *args], stdout=outf, stderr=err, text=True, env=env))

    def finish(self, timeout: float = 240) -> list[tuple[int, str, str]]:
        """Wait for every rank; each one's (exit status, stdout, stderr). A rank still running after ``timeout``
        seconds fails the test (every rank is killed first)."""
        timer = threading.Timer(timeout, self.kill)
        timer.start()
        try:
            return self._collect()
        finally:
            timer.cancel()

    def kill(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                print(f"killed a rank still running (pid {proc.pid})")

    def _collect(self) -> list[tuple[int, str, str]]:
        results = []
        for rank, proc in enumerate(self.procs):
            outf, err = self.logs[rank]
            if rank == 0:
                out = proc.stdout.read()  # type: ignore[union-attr] # to its end: the rank exits (or dies)
                proc.stdout.close()  # type: ignore[union-attr]
            proc.wait()
            if rank:
                outf.seek(0)
                out = outf.read()
                outf.close()
            err.seek(0)
            results.append((proc.returncode, out or "", err.read()))
            err.close()
        return results


def run(tmp: Path, remote: str, out: Path, *args: str) -> list[str]:
    """A whole run; every rank must exit 0. Rank 0's stdout lines."""
    return run_all(tmp, remote, out, *args)[0]


def run_all(tmp: Path, remote: str, out: Path, *args: str) -> list[list[str]]:
    """A whole run; every rank must exit 0. Each rank's stdout lines."""
    results = Job(tmp, remote, out, *args).finish()
    for rank, (code, _, err) in enumerate(results):
        assert code == 0, f"rank {rank} exited {code}: {err[-3000:]}"
    return [r[1].splitlines() for r in results]


def assert_identical(a: Path, b: Path) -> None:
    """Two final states (name -> full tensor or value) bit-identical."""
    x, y = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    assert set(x) == set(y)
    for k in x:
        if isinstance(x[k], torch.Tensor):
            assert x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]), k
        else:
            assert x[k] == y[k], k


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted run per kind (ddp, fsdp), on a local store: its final state, its store, each rank's
    output. In the ddp run rank 0's upload of the last save fails once (``--fail-at``; committed by close's retry):
    training is not interrupted, and every rank says what it learned."""
    made: dict[str, tuple[Path, str, list[list[str]]]] = {}

    def get(kind: str) -> tuple[Path, str, list[list[str]]]:
        if kind not in made:
            d = tmp_path_factory.mktemp(f"ranks_ref_{kind}")
            store = str(d / "store")
            fail = ["--fail-at", str(STEPS)] if kind == "ddp" else []
            lines = run_all(d, store, d / "final.pt", "--kind", kind, *fail)
            assert all(ln[0] == "fresh" and ln[-1] == "done" for ln in lines), lines
            made[kind] = (d / "final.pt", store, lines)
        return made[kind]

    return get


def test_a_replicated_job_claims_once_and_rank_0_writes_each_save_once(reference):
    """Failed before ranks were known: every rank's manager claimed the run, fencing the others (a rank's save
    raised StaleWriterError and the job failed)."""
    _, store, _ = reference("ddp")
    listed = CheckpointStore(store).list()
    steps = [c.step for c in listed]
    assert steps == sorted(set(steps)) and steps[-1] == STEPS, steps  # each save committed once, the last kept
    assert len({c.writer for c in listed}) == 1  # one writer: the job's coordinator
    assert all(c.meta.get("format") != "torch-dcp" and any(f.path == "state.pt" for f in c.files) for c in listed)


def test_every_rank_learns_that_rank_0s_commit_failed(reference):
    _, store, lines = reference("ddp")
    want = [f"wait {s} True []" for s in range(SAVE_EVERY, STEPS, SAVE_EVERY)] + [f"wait {STEPS} False [{STEPS}]"]
    for rank, out in enumerate(lines):
        assert [ln for ln in out if ln.startswith("wait ")] == want, (rank, out)
    assert CheckpointStore(store).latest().step == STEPS  # close() retried it: committed, and close raised nothing


def sigkill_mid_save(tmp: Path, remote: str, kind: str, kill_rank: int, point: str) -> None:
    """A run whose rank ``kill_rank`` SIGKILLs itself at ``point`` of the second save: nothing of it is listed."""
    kill_at = 2 * SAVE_EVERY
    job = Job(tmp, remote, tmp / "final.pt", "--kind", kind, "--kill-at", str(kill_at), "--kill-rank",
              str(kill_rank), "--failpoint", point)
    results = job.finish()
    assert results[kill_rank][0] == -signal.SIGKILL, results[kill_rank][2][-2000:]
    other = results[1 - kill_rank]
    assert other[0] != 0  # the other rank learned it at its next collective (torchrun would stop it too)
    assert [c.step for c in CheckpointStore(remote).list()] == [SAVE_EVERY]  # the save at kill_at: not listed


def sigterm_one_rank(tmp: Path, remote: str, kind: str, resumed: int) -> int:
    """A run (resuming from step ``resumed``) whose rank 1 gets SIGTERM at its first step: every rank saves the
    same step and exits 143 within the deadline; that step is committed. Returns it."""
    job = Job(tmp, remote, tmp / "final.pt", "--kind", kind, "--step-delay", "0.1")
    rank0 = job.procs[0].stdout
    assert rank0 is not None
    head = []
    for line in rank0:  # the job has resumed and trains
        head.append(line.strip())
        if line.startswith("step "):
            break
    assert head[0] == f"resumed {resumed}", head
    job.procs[1].send_signal(signal.SIGTERM)  # a rank other than the coordinator
    sent = time.monotonic()
    results = job.finish(timeout=120)
    took = time.monotonic() - sent
    saved = []
    for rank, (code, out, err) in enumerate(results):
        assert code == 143, f"rank {rank} exited {code}: {err[-3000:]}"
        saved.append([int(m) for m in re.findall(r"^preempted (\d+)$", out, re.M)])
    assert saved[0] == saved[1] and len(saved[0]) == 1, saved  # every rank saved the same step, once
    step = saved[0][0]
    assert resumed < step < STEPS
    assert took < DEADLINE, f"the ranks exited {took:.1f}s after the signal"  # saved, committed and gone
    print(f"SIGTERM on rank 1: every rank saved step {step}; all exited 143 {took:.2f}s after the signal")
    assert CheckpointStore(remote).latest().step == step
    return step


def test_replicated_sigkill_of_rank_0_mid_upload_lists_nothing_and_the_restart_ends_identical(tmp_path, s3_url,
                                                                                            reference):
    final_ref, _, _ = reference("ddp")
    sigkill_mid_save(tmp_path, s3_url, "ddp", 0, "push.after_upload")  # rank 0's upload: stored, not listed
    every = run_all(tmp_path, s3_url, tmp_path / "final.pt", "--kind", "ddp", "--rank0-saves",  # `if rank == 0`
                    "--probe-missing")
    for lines in every:
        assert lines[:2] == ["missing: CheckpointNotFoundError", f"resumed {SAVE_EVERY}"], lines[:3]
    assert_identical(final_ref, tmp_path / "final.pt")


def test_sharded_sigkill_of_one_rank_then_sigterm_on_one_rank_then_the_restart_ends_identical(tmp_path, s3_url,
                                                                                             reference):
    """FSDP2: rank 1 SIGKILLed inside its upload of its shards (nothing listed); the restart resumes from the
    previous checkpoint, then SIGTERM on rank 1 alone makes every rank save the same step and exit 143; the next
    restart resumes from that step and ends bit-identical to an uninterrupted run. (One scenario: CI time.)"""
    final_ref, _, _ = reference("fsdp")
    sigkill_mid_save(tmp_path, s3_url, "fsdp", 1, "dcp.mid_upload")
    step = sigterm_one_rank(tmp_path, s3_url, "fsdp", resumed=SAVE_EVERY)
    lines = run(tmp_path, s3_url, tmp_path / "final.pt", "--kind", "fsdp")
    assert lines[0] == f"resumed {step}", lines[:3]
    assert_identical(final_ref, tmp_path / "final.pt")
