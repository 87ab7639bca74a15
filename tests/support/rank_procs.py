"""The ranks of one job, each its own process started as torchrun starts them (RANK, WORLD_SIZE, MASTER_ADDR/PORT,
the TorchElastic variables in its environment), so a test holds each rank: it signals one and reads each one's exit
status (torchrun's agent would SIGTERM the other ranks as soon as one exits)."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from . import trainer_runs


def spawn(job: str, args: Sequence[str], logs: Path, world: int = 2) -> list[subprocess.Popen]:
    """Start ``tests/support/<job> args`` on ``world`` ranks. Rank 0's stdout is a pipe; the other ranks' stdout and
    every rank's stderr go to ``logs/rank<r>.out|err``."""
    logs.mkdir(parents=True, exist_ok=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(world):
        env = {**trainer_runs.env(), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
               "LOCAL_WORLD_SIZE": str(world), "GROUP_RANK": "0", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "TORCHELASTIC_RUN_ID": f"test-{port}"}
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
