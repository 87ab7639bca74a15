"""Sampling profiles of a running process (the S3/GCS server, or this one) with py-spy, summarised by function.

Used where a target is missed, to show what limits it: ``profile(pid, fn)`` samples ``pid`` while ``fn`` runs and
returns the functions where the samples landed (leaf frames, i.e. own time) with their share.
"""

from __future__ import annotations

import collections
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path


def py_spy() -> str | None:
    exe = Path(sys.executable).with_name("py-spy")
    return str(exe) if exe.exists() else shutil.which("py-spy")


def profile(pid: int, fn: Callable[[], None], *, top: int = 8, native: bool = False) -> dict:
    """Sample ``pid`` at 100 Hz while ``fn()`` runs; return ``{"samples", "wall_s", "top": [[function, share]]}``."""
    exe = py_spy()
    if exe is None:
        return {"error": "py-spy is not installed"}
    with tempfile.TemporaryDirectory(prefix="bench-prof-") as tmp:
        out = Path(tmp) / "stacks.txt"
        argv = [exe, "record", "--pid", str(pid), "--rate", "100", "--format", "raw", "--output", str(out),
                "--nonblocking", "--threads"] + (["--native"] if native else [])
        spy = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(1.0)  # let it attach
        t0 = time.perf_counter()
        try:
            fn()
        finally:
            wall = time.perf_counter() - t0
            spy.send_signal(signal.SIGINT)
            try:
                _, err = spy.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                spy.kill()
                _, err = spy.communicate()
        if not out.exists():
            return {"error": f"py-spy wrote nothing: {err.decode(errors='replace')[-300:]}"}
        return summarise(out.read_text(), top=top) | {"wall_s": round(wall, 2)}


def summarise(raw: str, *, top: int = 8) -> dict:
    """Leaf-function shares from py-spy's raw (collapsed) output: ``frame;frame;...;leaf count`` per line."""
    leaves: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        leaf = stack.split(";")[-1]
        leaves[_short(leaf)] += n
    if not total:
        return {"samples": 0, "top": []}
    return {"samples": total, "top": [[name, round(n / total, 3)] for name, n in leaves.most_common(top)]}


def _short(frame: str) -> str:
    """``func (path/to/module.py:123)`` -> ``func (module.py)``."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    file = where.rsplit("/", 1)[-1].split(":", 1)[0]
    return f"{name} ({file})" if file else name
