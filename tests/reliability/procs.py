"""Starting and killing real writer processes (the API writer in ``writer.py``, the ``cloudckpt`` CLI)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

WRITER = Path(__file__).with_name("writer.py")
ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Outcome:
    """What a writer process said before it ended, and how it ended (negative returncode: killed by that signal)."""

    returncode: int
    lines: list[str] = field(default_factory=list)
    stderr: str = ""

    @property
    def committed(self) -> list[tuple[str, float]]:
        out = []
        for line in self.lines:
            if line.startswith("COMMITTED "):
                _, cid, loss = line.split(" ", 2)
                out.append((cid, float(loss)))
        return out

    @property
    def killed(self) -> bool:
        return self.returncode == -signal.SIGKILL


def writer_cmd(url: str, *args: str) -> list[str]:
    return [sys.executable, str(WRITER), url, *args]


def cli_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "cloudckpt", *args]


def env_with(**extra: str | None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("CLOUDCKPT_FAILPOINT", None)
    for k, v in extra.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    return env


def draining(p: subprocess.Popen, timeout: float) -> Future[tuple[str, str]]:
    """``p.communicate(timeout)`` in a thread of its own, started now: a child whose pipes the test would otherwise
    read only later (after another child ends) never blocks on a full pipe meanwhile."""
    pool = ThreadPoolExecutor(1, thread_name_prefix="drain")
    fut = pool.submit(p.communicate, timeout=timeout)
    pool.shutdown(wait=False)
    return fut


def run(cmd: list[str], *, env: dict | None = None, timeout: float = 120) -> Outcome:
    """Run to the end (a failpoint may SIGKILL it); collect its lines."""
    p = subprocess.run(cmd, env=env or env_with(), capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    return Outcome(p.returncode, p.stdout.splitlines(), p.stderr)


def run_and_kill(cmd: list[str], delay: float, *, env: dict | None = None, ready: str | None = "READY",
                 timeout: float = 60) -> Outcome:
    """Start ``cmd``, wait for its ``ready`` line (if any), then SIGKILL it after ``delay`` seconds."""
    p = subprocess.Popen(cmd, env=env or env_with(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         cwd=ROOT)
    lines: list[str] = []
    try:
        if ready is not None:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                line = p.stdout.readline()
                if not line:
                    break
                lines.append(line.rstrip("\n"))
                if line.startswith(ready):
                    break
            else:
                raise TimeoutError(f"{cmd}: no {ready} line within {timeout}s")
        time.sleep(delay)
        if p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
        out, err = p.communicate(timeout=timeout)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    lines += out.splitlines()
    return Outcome(p.returncode, lines, err)
