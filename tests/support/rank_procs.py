"""The ranks of one job, each its own process started as torchrun starts them (RANK, WORLD_SIZE, MASTER_ADDR/PORT,
the TorchElastic variables in its environment), so a test holds each rank: it signals one and reads each one's exit
status (torchrun's agent would SIGTERM the other ranks as soon as one exits)."""

from __future__ import annotations

import queue
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from . import trainer_runs


def _rank_env(base: Mapping[str, str], rank: int, world: int, port: int) -> dict[str, str]:
    """What torchrun puts in a rank's environment (one node), OMP_NUM_THREADS=1 included unless it is set."""
    return {"OMP_NUM_THREADS": "1", **base, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
            "LOCAL_WORLD_SIZE": str(world), "GROUP_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
            "TORCHELASTIC_RUN_ID": f"test-{port}"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(job: str | Path, args: Sequence[str], *, world: int, env: Mapping[str, str] | None = None,
        timeout: float = 600) -> subprocess.CompletedProcess:
    """``python job args`` on ``world`` ranks, each started as torchrun starts it, without torchrun's agent process
    (whose own imports cost ~1.2 s of CPU per run: the suite is CPU-bound). As the agent does, the first rank to fail
    gets the others terminated. stdout and stderr: every rank's, in rank order; the return code: the first failed
    rank's (0 when all succeeded). A test that reads torchrun's own report (its "Root Cause") runs torchrun."""
    port = _free_port()
    base = env if env is not None else trainer_runs.env()
    with tempfile.TemporaryDirectory(prefix="ranks-") as d:
        outs = [open(Path(d) / f"{r}.out", "w+") for r in range(world)]  # noqa: SIM115 - read back below
        errs = [open(Path(d) / f"{r}.err", "w+") for r in range(world)]  # noqa: SIM115 - read back below
        procs = [subprocess.Popen([sys.executable, str(job), *args], stdout=outs[r], stderr=errs[r], text=True,
                                  env=_rank_env(base, r, world, port)) for r in range(world)]
        ended: queue.Queue[subprocess.Popen] = queue.Queue()
        for p in procs:
            threading.Thread(target=lambda p=p: (p.wait(), ended.put(p)), daemon=True).start()
        deadline, failed = time.monotonic() + timeout, None
        try:
            for _ in procs:
                p = ended.get(timeout=max(0.0, deadline - time.monotonic()))
                if p.returncode != 0 and failed is None:
                    failed = p
                    for other in procs:
                        if other.poll() is None:
                            other.terminate()
        except queue.Empty:
            for p in procs:
                p.kill()
            raise subprocess.TimeoutExpired([str(job), *args], timeout) from None
        text = []
        for f in (*outs, *errs):
            f.seek(0)
            text.append(f.read())
            f.close()
    return subprocess.CompletedProcess([str(job), *args], failed.returncode if failed else 0,
                                       "".join(text[:world]), "".join(text[world:]))


def spawn(job: str, args: Sequence[str], logs: Path, world: int = 2) -> list[subprocess.Popen]:
    """Start ``tests/support/<job> args`` on ``world`` ranks. Rank 0's stdout is a pipe; the other ranks' stdout and
    every rank's stderr go to ``logs/rank<r>.out|err``."""
    logs.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    procs = []
    for rank in range(world):
        env = _rank_env(trainer_runs.env(), rank, world, port)
        out = subprocess.PIPE if rank == 0 else open(logs / f"rank{rank}.out", "w")  # noqa: SIM115 - the child's
        err = open(logs / f"rank{rank}.err", "w")  # noqa: SIM115 - the child's
        procs.append(subprocess.Popen([sys.executable, str(trainer_runs.JOBS / job), *args], stdout=out, stderr=err,
                                      text=True, env=env))
        if rank:
            out.close()
        err.close()
    return procs


def sigterm_one_rank(job: str, args: Sequence[str], logs: Path, *, when: str, rank: int = 1,
                     timeout: float = 240) -> tuple[list[int], list[str], float]:
    """Run the job; once rank 0 prints the line ``when``, SIGTERM rank ``rank`` alone. Every rank's exit status and
    stdout, and the seconds from the signal to the last rank's exit. A rank still running ``timeout`` seconds after
    the start is killed (its status is then -9)."""
    procs = spawn(job, args, logs)
    killer = threading.Timer(timeout, lambda: [p.kill() for p in procs if p.poll() is None])
    killer.start()
    try:
        rank0 = procs[0].stdout
        assert rank0 is not None
        head = []
        for line in rank0:
            head.append(line)
            if line.strip() == when:
                break
        assert head and head[-1].strip() == when, head
        procs[rank].send_signal(signal.SIGTERM)
        sent = time.monotonic()
        outs = ["".join(head) + rank0.read()]
        codes = [p.wait() for p in procs]
        took = time.monotonic() - sent
    finally:
        killer.cancel()
    outs += [(logs / f"rank{r}.out").read_text() for r in range(1, len(procs))]
    return codes, outs, took


def stderr_of(logs: Path, rank: int) -> str:
    return (logs / f"rank{rank}.err").read_text()[-3000:]
