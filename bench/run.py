"""Run cloudckpt's benchmarks side by side against the raw clients and Keras, on real servers on 127.0.0.1.

Usage::

    make bench                               # full run (~15 min), results in bench/results/full/
    make bench BENCH_ARGS="--quick"          # CI-sized run (< 1 min): proves the harness works (no frameworks group)
    .venv/bin/python -m bench.run --only push,restore --out /tmp/b   # from the repository root

Starts moto's S3 server (answering a ranged GET from the range alone, as S3 does:
``tests/support/moto_ranges.py``) and fake-gcs-server in their own processes, runs every comparison with interleaved
repetitions (A, B, C, A, B, C...), prints a Markdown table and writes ``results.json`` (every sample, the machine,
the load) and ``results.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if __package__ != "bench":  # run as a file, the bench and tests.support packages would not be importable
    sys.exit("run the benchmarks from the repository root: python -m bench.run [--quick] (or make bench)")
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from tests.support import servers  # noqa: E402  (the storage servers the test suite runs, shared)

from . import checksums, dcp, frameworks, index_scale, memory, report, training, transfers  # noqa: E402
from . import requests as request_counts  # noqa: E402
from .common import Ctx, Section, Sizes, code_version, log, machine  # noqa: E402

GROUPS = {
    "push": transfers, "restore": transfers,  # one module measures both (same file, same servers)
    "memory": memory, "index": index_scale, "checksum": checksums, "training": training, "frameworks": frameworks,
    "requests": request_counts, "overhead": training.overhead, "dcp": dcp,
}
ORDER = ["checksum", "index", "requests", "push", "memory", "training", "overhead", "frameworks", "dcp"]
FULL_ONLY = {"frameworks", "dcp"}  # not in a plain --quick run (CI's); `--quick --only frameworks` runs it at 10 MB
ALONE_ONLY = {"overhead"}  # measurement 2 alone, only when --only names it (``training`` includes it)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes, few repetitions (CI): proves the harness works; "
                   "leaves out the frameworks group unless --only names it")
    p.add_argument("--out", type=Path, help="where results.json/.md/.png go (default bench/results/<full|quick>)")
    p.add_argument("--only", default="", help=f"comma-separated subset of: {', '.join(ORDER)}")
    p.add_argument("--reps", type=int, help="repetitions per comparison (default 3, GCS pushes 4, epoch-overhead "
                   "fits 6, quick 2)")
    p.add_argument("--scratch", type=Path, help="directory for temporary files (default: a new temp dir)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the servers and clean up when terminated
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("cloudckpt", "botocore", "boto3", "s3transfer", "urllib3", "google", "gcsfs", "s3fs", "fsspec",
                  "lightning"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)  # "pool is full" notes under parallel parts
    sizes = Sizes.quick() if args.quick else Sizes()
    if args.reps:
        sizes.reps = sizes.gcs_reps = sizes.overhead_reps = args.reps
    wanted = [g.strip() for g in args.only.split(",") if g.strip()] or [
        g for g in ORDER if g not in ALONE_ONLY and not (args.quick and g in FULL_ONLY)]
    unknown = set(wanted) - set(GROUPS)
    if unknown:
        raise SystemExit(f"unknown --only group(s): {sorted(unknown)}; choose from {ORDER}")
    args.out = args.out or HERE / "results" / ("quick" if args.quick else "full")
    args.out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="cloudckpt-bench-", dir=args.scratch))
    load_start = os.getloadavg()
    started = time.time()
    s3 = servers.start_moto(ranges=True)  # ranged GETs served from the range alone, as S3 does (pulls are ranged)
    gcs = servers.start_fake_gcs()
    servers.apply_env(servers.s3_env(s3.endpoint))
    servers.apply_env(servers.gcs_env(gcs.endpoint))
    ctx = Ctx(scratch=scratch, sizes=sizes, quick=args.quick, s3_endpoint=s3.endpoint, gcs_endpoint=gcs.endpoint,
              s3_pid=s3.proc.pid, gcs_pid=gcs.proc.pid)
    sections: list[Section] = []
    done: set[object] = set()
    try:
        for group in [g for g in ORDER if g in wanted or (g == "push" and "restore" in wanted)]:
            module = GROUPS[group]
            if module in done:
                continue
            done.add(module)
            log.info("== %s (load %.2f)", group, os.getloadavg()[0])
            try:
                sections.extend(module.run(ctx))
            except Exception as exc:  # keep the other groups' results
                log.exception("group %s failed", group)
                sections.append(Section(group, group, "s", error=f"{type(exc).__name__}: {exc}"[:500]))
    finally:
        s3.stop()
        gcs.stop()
        shutil.rmtree(scratch, ignore_errors=True)
    load_end = os.getloadavg()
    doc = {
        "mode": "quick" if args.quick else "full",
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "seconds": round(time.time() - started, 1),
        "load": {"start": load_start, "end": load_end},
        "machine": machine(),
        "code": code_version(),
        "sizes": vars(sizes),
        "servers": {"s3": "moto server (python -m moto.server), own process",
                    "gcs": "fake-gcs-server (Go), memory backend, own process"},
    }
    table = report.table(sections)
    report.write_json(args.out / "results.json", doc, sections)
    (args.out / "results.md").write_text(report.markdown(sections))
    m = doc["machine"]
    title = (f"cloudckpt benchmarks ({doc['mode']}, {doc['started']}): {m['cpu']}, {m['cores_logical']} cores, "
             f"{m['ram_gib']} GiB RAM, Python {m['python']}; load {load_start[0]:.2f} -> {load_end[0]:.2f}")
    report.plot(args.out / "results.png", sections, title)
    print(table)
    print()
    print(report.summary(sections))
    print()
    print(report.targets_table(sections))
    print(f"\n{title}\nwrote {args.out / 'results.json'}, results.md, results.png in {doc['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
