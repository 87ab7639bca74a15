"""A writer process for the crash and race suites: pushes checkpoints to a run through the Python API.

Run as ``python writer.py URL [options]``. It prints ``READY`` once imported, then one line per event, flushed at
once so a parent that SIGKILLs it knows exactly what was acknowledged before the kill:
``COMMITTED <id>`` after ``push`` returned, ``PRUNED <n>`` after a prune, ``GC <n>`` after a gc,
``CLAIMED <generation>``, and ``FENCED`` (exit 6) when a newer writer superseded it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

from cloudckpt import CheckpointStore, StaleWriterError
from cloudckpt.errors import CloudCkptError


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def make_checkpoint(root: Path, rnd: random.Random, max_bytes: int, big: int) -> Path:
    """A directory of 1-3 files of random sizes; with ``big`` > 0, sometimes one file of ``big`` bytes."""
    d = Path(tempfile.mkdtemp(dir=root))
    for i in range(rnd.randint(1, 3)):
        size = rnd.randint(0, max_bytes)
        sub = d / "shard" if i == 2 else d
        sub.mkdir(exist_ok=True)
        (sub / f"part-{i}.bin").write_bytes(rnd.randbytes(size))
    if big and rnd.random() < 0.25:
        (d / "big.bin").write_bytes(rnd.randbytes(big))
    return d


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("url")
    ap.add_argument("--rounds", type=int, default=10**9)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep-last", type=int, default=None)
    ap.add_argument("--keep-best", type=int, default=None)
    ap.add_argument("--max-bytes", type=int, default=64 * 1024)
    ap.add_argument("--big", type=int, default=0, help="bytes of an occasional large (multipart) file")
    ap.add_argument("--prune-every", type=int, default=0)
    ap.add_argument("--gc-every", type=int, default=0)
    ap.add_argument("--prune-now", type=int, default=None, help="prune(keep_last=N) before pushing")
    ap.add_argument("--gc-now", action="store_true", help="gc(min_age=0) before pushing")
    ap.add_argument("--claim", action="store_true", help="claim the run (fence earlier writers) first")
    ap.add_argument("--wait-file", default=None, help="wait for this file to exist before the first push")
    ap.add_argument("--options", default="{}", help="storage options as JSON")
    ap.add_argument("--tolerate-condemned", action="store_true",
                    help="a push gc condemned on every upload says REFUSED and the writer goes on")
    args = ap.parse_args()
    rnd = random.Random(args.seed)
    opts = json.loads(args.options)
    work = Path(tempfile.mkdtemp(prefix="rel-writer-"))
    try:
        return write(args, rnd, opts, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def write(args: argparse.Namespace, rnd: random.Random, opts: dict, work: Path) -> int:
    with CheckpointStore(args.url, budget=60, workers=4, **opts) as store:
        if args.claim:
            say(f"CLAIMED {store.claim().generation}")
        say("READY")
        if args.prune_now is not None:
            say(f"PRUNED {len(store.prune(keep_last=args.prune_now))}")
        if args.gc_now:
            say(f"GC {len(store.gc(min_age=0).deleted)}")
        if args.wait_file:
            while not os.path.exists(args.wait_file):
                time.sleep(0.001)
        try:
            for n in range(1, args.rounds + 1):
                src = make_checkpoint(work, rnd, args.max_bytes, args.big)
                loss = rnd.random()
                try:
                    entry = store.push(src, epoch=n, step=n * 10, metrics={"val_loss": loss}, monitor="val_loss",
                                       mode="min", keep_last=args.keep_last, keep_best=args.keep_best)
                except CloudCkptError as exc:
                    if not (args.tolerate_condemned and type(exc).__name__ == "CheckpointCondemnedError"):
                        raise
                    say(f"REFUSED {exc}")
                    continue
                finally:
                    shutil.rmtree(src, ignore_errors=True)  # pushed or refused: a killed writer leaves one at most
                say(f"COMMITTED {entry.id} {loss!r}")
                if args.prune_every and n % args.prune_every == 0:
                    say(f"PRUNED {len(store.prune())}")
                if args.gc_every and n % args.gc_every == 0:
                    say(f"GC {len(store.gc(min_age=0).deleted)}")
        except StaleWriterError as exc:
            say(f"FENCED {exc}")
            return 6
        say(f"DONE conflicts={store.keeper.conflicts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
