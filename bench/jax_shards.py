"""Keras on JAX, two processes, ModelParallel with the Dense kernels split across them: the training-thread stall
per save and the bytes each process moves, sharded saves (this tree) against the gather (an older cloudckpt tree,
``--baseline-src``, e.g. a checkout from before issue 22's item 4).

Each variant runs the digits job of ``tests/support/keras_job.py`` as two real processes (jax.distributed on the
CPU, gloo), saving every 5 steps to a local store until step 20 (4 saves); the stall is CloudCheckpoint's own
``stall_seconds`` (Keras' save decision, and the save: the gather and Keras' file, or the shards' copy, upload and
commit). Bytes per process: what it uploaded (sharded: its log line; gather: process 0 the whole checkpoint's
objects) and what it received over the collectives to gather (the other process's half of every split variable).
``keras.callbacks.OrbaxCheckpoint`` is not measured unless orbax is installed (it is not in cloudckpt's extras).

Usage: ``python -m bench.jax_shards --baseline-src /path/to/older/tree [--hidden 2048] [--reps 2]``; prints a
Markdown table and writes ``bench/results/jax_shards/results.json``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
JOB = ROOT / "tests" / "support" / "keras_job.py"
SAVED = re.compile(r"process (\d) stored \d+ shards \((\d+) bytes\)")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_pair(src: Path, work: Path, hidden: int) -> dict:
    """Two processes of the model-parallel job with ``src`` first on the path; their stalls and logs."""
    port, procs = _port(), []
    env = {**os.environ, "PYTHONPATH": str(src), "KERAS_BACKEND": "jax", "PYTHONUNBUFFERED": "1",
           "JAX_COMPILATION_CACHE_DIR": str(work.parent / "jax-cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    for i in range(2):
        d = work / f"p{i}"
        d.mkdir(parents=True)
        procs.append(subprocess.Popen(
            [sys.executable, str(JOB), "--epochs", "1", "--remote", str(work / "store"), "--weights-only",
             "--save-freq", "5", "--shuffle", "--filepath", "ckpt/m.weights.h5", "--hidden", str(hidden),
             "--model-parallel", "--jax-processes", f"127.0.0.1:{port},2,{i}", "--stop-at", "20",
             "--keep-last", "10"], cwd=d, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    out = [p.communicate(timeout=900) for p in procs]
    for p, (_, e) in zip(procs, out, strict=True):
        if p.returncode != 0:
            raise RuntimeError(f"job failed ({p.returncode}): {e[-2000:]}")
    stalls = [json.loads(re.search(r"^STALLS (.*)$", o, re.M).group(1)) for o, _ in out]
    return {"stalls": stalls, "err": [e for _, e in out]}


def measure(variants: dict[str, tuple[Path, bool]], hidden: int, reps: int) -> dict[str, dict]:
    """Each variant ``name: (source tree, sharded)``, ``reps`` times, interleaved (load hits both alike)."""
    from cloudckpt.store import CheckpointStore

    acc = {name: {"stall": [], "uploaded": [0.0, 0.0], "saves": 0} for name in variants}
    for r in range(reps):
        for name, (src, sharded) in variants.items():
            a = acc[name]
            work = Path(tempfile.mkdtemp(prefix="bench-jax-shards-")) / f"rep{r}"
            got = run_pair(src, work, hidden)
            a["stall"] += [s for per in got["stalls"] for s in per]
            entries = CheckpointStore(str(work / "store")).list()
            a["saves"] += len(entries)
            if sharded:
                for e in got["err"]:
                    for proc, n in SAVED.findall(e):
                        a["uploaded"][int(proc)] += int(n)
            else:
                a["uploaded"][0] += sum(e.size for e in entries)
    return {name: {"stall_ms_median": 1000 * statistics.median(a["stall"]), "stall_ms_max": 1000 * max(a["stall"]),
                   "uploaded_per_save": [u / max(a["saves"], 1) for u in a["uploaded"]], "saves": a["saves"]}
            for name, a in acc.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--baseline-src", type=Path, required=True, help="a cloudckpt tree that gathers (older)")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--reps", type=int, default=2)
    args = p.parse_args(argv)
    kernel_floats = 64 * args.hidden + args.hidden * 10  # the split variables: kernels, times Adam's two slots
    split = 3 * 4 * kernel_floats
    rows = measure({"gather (baseline)": (args.baseline_src.resolve(), False), "shards (this tree)": (ROOT, True)},
                   args.hidden, args.reps)
    rows["gather (baseline)"]["gathered_per_process"] = split // 2
    rows["shards (this tree)"]["gathered_per_process"] = 0
    orbax = importlib.util.find_spec("orbax") is not None
    out = ROOT / "bench" / "results" / "jax_shards"
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"hidden": args.hidden, "split_bytes": split, "rows": rows,
                                                  "orbax_measured": False, "orbax_installed": orbax}, indent=1))
    print(f"| variant (hidden {args.hidden}, split variables {split / 2**20:.2f} MiB) | stall median / max (ms) | "
          f"uploaded per save p0 / p1 (KiB) | gathered per process per save (KiB) |")
    print("|---|---|---|---|")
    for name, r in rows.items():
        u0, u1 = r["uploaded_per_save"]
        print(f"| {name} | {r['stall_ms_median']:.0f} / {r['stall_ms_max']:.0f} | {u0 / 1024:.0f} / {u1 / 1024:.0f} "
              f"| {r['gathered_per_process'] / 1024:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
