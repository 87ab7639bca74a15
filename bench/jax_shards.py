"""Keras on JAX, two processes, ModelParallel with the Dense kernels split across them: the training-thread stall
per save and the bytes each process moves, sharded saves (this tree) against the gather (an older cloudckpt tree,
``--baseline-src``, e.g. a checkout from before issue 22's item 4) and against Keras' own
``keras.callbacks.OrbaxCheckpoint`` on a local folder.

Each variant runs the digits job of ``tests/support/keras_job.py`` as two real processes (jax.distributed on the
CPU, gloo), saving every 5 steps until step 20 (4 saves). The stall is the callback's time on the training thread at
each save point: CloudCheckpoint's own ``stall_seconds`` (Keras' save decision, and the save: the gather and Keras'
file, or the shards' copy, upload and commit), and for OrbaxCheckpoint its ``_save_checkpoint`` timed the same way
(the state tree, and Orbax's save call: it waits for the previous save, copies the arrays to the host and starts the
background write; the write itself is on Orbax's threads, as the gather's upload is on CloudCheckpoint's uploader).
Bytes per process: what it stored (sharded: its log line; gather: process 0 the whole checkpoint's objects; Orbax:
the sizes of the files it wrote in the step's folder, ``ocdbt.process_<i>`` and ``process_<i>`` files to process i,
the metadata and merged manifest to process 0, Orbax's primary host) and what it received over the collectives to
gather (the other process's half of every split variable; none for the shards and Orbax). OrbaxCheckpoint saves
the whole state (weights and optimizer, as CloudCheckpoint's weights plus its resume state), every checkpoint kept,
into one folder shared by both processes (Orbax's layout: process 0 merges the manifests and renames the folder).

Orbax needs ``orbax-checkpoint`` (not in cloudckpt's extras): importable from the venv, or installed apart, e.g.
``pip install --no-deps --target DIR orbax-checkpoint etils msgpack tensorstore aiofiles humanize simplejson
prometheus_client uvloop zipp`` and ``CLOUDCKPT_BENCH_ORBAX_PATH=DIR``; else its row is reported as skipped.

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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
JOB = ROOT / "tests" / "support" / "keras_job.py"
SAVED = re.compile(r"process (\d) stored \d+ shards \((\d+) bytes\)")
ORBAX = "OrbaxCheckpoint (Keras)"
ORBAX_PATH = os.environ.get("CLOUDCKPT_BENCH_ORBAX_PATH", "")  # where orbax-checkpoint was installed, if not the venv


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def orbax_importable() -> bool:
    """Whether orbax-checkpoint imports in the jobs' environment (the venv, then ``CLOUDCKPT_BENCH_ORBAX_PATH``)."""
    if ORBAX_PATH and ORBAX_PATH not in sys.path:
        sys.path.append(ORBAX_PATH)
    try:
        return importlib.util.find_spec("orbax.checkpoint") is not None
    except ImportError:
        return False


def orbax_bytes(folder: Path) -> tuple[list[int], int]:
    """Bytes each process wrote per committed step folder of an Orbax directory (summed), and the steps' count."""
    written, steps = [0, 0], 0
    for step in folder.iterdir():
        if not step.name.isdigit():
            continue  # a step Orbax did not finalize (its tmp name)
        steps += 1
        for f in step.rglob("*"):
            if f.is_file():
                m = re.search(r"process_(\d+)", str(f.relative_to(step)))
                written[int(m.group(1)) if m else 0] += f.stat().st_size
    return written, steps


def run_pair(src: Path, work: Path, hidden: int, orbax: bool = False) -> dict:
    """Two processes of the model-parallel job with ``src`` first on the path (``orbax``: saving with
    OrbaxCheckpoint into ``work/orbax``); their stalls and logs."""
    port, procs = _port(), []
    path = os.pathsep.join(p for p in (str(src), ORBAX_PATH if orbax else "") if p)
    env = {**os.environ, "PYTHONPATH": path, "KERAS_BACKEND": "jax", "PYTHONUNBUFFERED": "1",
           "JAX_COMPILATION_CACHE_DIR": str(work.parent / "jax-cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    for i in range(2):
        d = work / f"p{i}"
        d.mkdir(parents=True)
        procs.append(subprocess.Popen(
            [sys.executable, str(JOB), "--epochs", "1", "--remote", str(work / "store"), "--weights-only",
             "--save-freq", "5", "--shuffle", "--filepath", "ckpt/m.weights.h5", "--hidden", str(hidden),
             "--model-parallel", "--jax-processes", f"127.0.0.1:{port},2,{i}", "--stop-at", "20",
             "--keep-last", "10", *(["--orbax", str(work / "orbax")] if orbax else [])],
            cwd=d, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    with ThreadPoolExecutor(2) as pool:  # both read as they write: a full pipe would stall the pair's collectives
        out = list(pool.map(lambda p: p.communicate(timeout=900), procs))
    for p, (_, e) in zip(procs, out, strict=True):
        if p.returncode != 0:
            raise RuntimeError(f"job failed ({p.returncode}): {e[-2000:]}")
    stalls = [json.loads(re.search(r"^STALLS (.*)$", o, re.M).group(1)) for o, _ in out]
    waits = [float(m.group(1)) for o, _ in out if (m := re.search(r"^ORBAX_WAIT (\S+)$", o, re.M))]
    prev = [json.loads(m.group(1)) for o, _ in out if (m := re.search(r"^ORBAX_WAITS_IN_SAVES (.*)$", o, re.M))]
    return {"stalls": stalls, "err": [e for _, e in out], "final_waits": waits, "prev_waits": prev}


def measure(variants: dict[str, tuple[Path, str]], hidden: int, reps: int) -> dict[str, dict]:
    """Each variant ``name: (source tree, kind)`` (kind: ``gather``, ``shards`` or ``orbax``), ``reps`` times,
    interleaved (load hits them alike)."""
    from cloudckpt.store import CheckpointStore

    acc = {name: {"stall": [], "uploaded": [0.0, 0.0], "saves": 0, "final_wait": [], "prev_wait": []}
           for name in variants}
    for r in range(reps):
        for name, (src, kind) in variants.items():
            a = acc[name]
            work = Path(tempfile.mkdtemp(prefix="bench-jax-shards-")) / f"rep{r}"
            got = run_pair(src, work, hidden, orbax=kind == "orbax")
            a["stall"] += [s for per in got["stalls"] for s in per]
            a["final_wait"] += got["final_waits"]
            a["prev_wait"] += [w for per in got["prev_waits"] for w in per]
            if kind == "orbax":
                written, steps = orbax_bytes(work / "orbax")
                a["saves"] += steps
                a["uploaded"] = [u + w for u, w in zip(a["uploaded"], written, strict=True)]
                continue
            entries = CheckpointStore(str(work / "store")).list()
            a["saves"] += len(entries)
            if kind == "shards":
                for e in got["err"]:
                    for proc, n in SAVED.findall(e):
                        a["uploaded"][int(proc)] += int(n)
            else:
                a["uploaded"][0] += sum(e.size for e in entries)
    return {name: {"stall_ms_median": 1000 * statistics.median(a["stall"]), "stall_ms_max": 1000 * max(a["stall"]),
                   "stall_ms": [1000 * s for s in a["stall"]],
                   "uploaded_per_save": [u / max(a["saves"], 1) for u in a["uploaded"]], "saves": a["saves"],
                   **({"final_wait_ms": [1000 * w for w in a["final_wait"]],
                       "of_stall_waiting_previous_save_ms": [1000 * w for w in a["prev_wait"]],
                       "stall_ms_median_less_wait": 1000 * statistics.median(
                           s - w for s, w in zip(a["stall"], a["prev_wait"], strict=True))}
                      if a["final_wait"] else {})}
            for name, a in acc.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--baseline-src", type=Path, required=True, help="a cloudckpt tree that gathers (older)")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--reps", type=int, default=2)
    args = p.parse_args(argv)
    kernel_floats = 64 * args.hidden + args.hidden * 10  # the split variables: kernels, times Adam's two slots
    split = 3 * 4 * kernel_floats
    orbax = orbax_importable()
    variants = {"gather (baseline)": (args.baseline_src.resolve(), "gather"), "shards (this tree)": (ROOT, "shards")}
    if orbax:
        variants[ORBAX] = (ROOT, "orbax")
    rows = measure(variants, args.hidden, args.reps)
    rows["gather (baseline)"]["gathered_per_process"] = split // 2
    rows["shards (this tree)"]["gathered_per_process"] = 0
    if orbax:
        rows[ORBAX]["gathered_per_process"] = 0
    out = ROOT / "bench" / "results" / "jax_shards"
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"hidden": args.hidden, "split_bytes": split, "rows": rows,
                                                  "orbax_measured": orbax}, indent=1))
    print(f"| variant (hidden {args.hidden}, split variables {split / 2**20:.2f} MiB) | stall median / max (ms) | "
          f"stored per save p0 / p1 (KiB) | gathered per process per save (KiB) |")
    print("|---|---|---|---|")
    for name, r in rows.items():
        u0, u1 = r["uploaded_per_save"]
        print(f"| {name} | {r['stall_ms_median']:.0f} / {r['stall_ms_max']:.0f} | {u0 / 1024:.0f} / {u1 / 1024:.0f} "
              f"| {r['gathered_per_process'] / 1024:.0f} |")
    if not orbax:
        print(f"| {ORBAX} | skipped: orbax-checkpoint not importable (see CLOUDCKPT_BENCH_ORBAX_PATH) | | |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
