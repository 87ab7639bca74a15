"""Measurement 7: how ``ls`` and one commit scale with the number of checkpoints in a run's index.

Big indexes are built directly (an :class:`cloudckpt.manifest.Index` of N one-file entries written with the
backend's ``write_index``), not by pushing N times. ``ls`` is ``list()`` on a fresh store (download + parse +
validate the index, as ``cloudckpt ls`` does); a commit is ``push`` of a 1 KiB file by a long-lived store, as a
training writer is (upload, manifest, compare-and-swap of the index).
"""

from __future__ import annotations

import statistics
import time
from datetime import datetime, timedelta, timezone

from .common import Ctx, Section, log, make_file


def build_index(n: int):
    from cloudckpt.manifest import CheckpointEntry, FileEntry, Index, RunPolicy

    t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
    entries = tuple(
        CheckpointEntry(id=f"ckpt-e{i:06d}-{i:08x}", epoch=i, step=i * 100, created=t0 + timedelta(minutes=i),
                        metrics={"val_loss": 1.0 / (i + 1), "loss": 2.0 / (i + 1)},
                        files=(FileEntry(path="model.weights.h5", size=123_456_789, crc32c=f"{i:08x}"),),
                        size=123_456_789, writer="bench:1:abcdef01")
        for i in range(n))
    return Index(run=RunPolicy(monitor="val_loss", mode="min"), checkpoints=entries, latest=entries[-1].id,
                 best=entries[-1].id, seq=n)


def _measure(url: str, n: int, reps: int, tiny) -> tuple[list[float], list[float], int]:
    from cloudckpt import CheckpointStore
    from cloudckpt.manifest import dump

    with CheckpointStore(url) as store:
        data = dump(build_index(n))
        _, token = store.backend.read_index()
        store.backend.write_index(data, token)
        ls, commit = [], []
        for r in range(reps):
            with CheckpointStore(url) as reader:  # a fresh reader, as `cloudckpt ls` is: no cached index
                t0 = time.perf_counter()
                rows = reader.list()
                ls.append(time.perf_counter() - t0)
            assert len(rows) == n + r
            t0 = time.perf_counter()
            store.push(tiny, epoch=n + r, metrics={"val_loss": 5.0})
            commit.append(time.perf_counter() - t0)
    return ls, commit, len(data)


def run(ctx: Ctx) -> list[Section]:
    tiny = make_file(ctx.scratch / "index" / "tiny.bin", 1024)
    reps = max(3, ctx.sizes.reps)
    out = []
    for kind in ("local", "s3", "gcs"):
        t_start = time.monotonic()
        sec = Section(f"index_{kind}", f"7. Index scale on {kind}: ls and one commit vs checkpoints in the index",
                      "s", target="flat or close to it")
        for n in ctx.sizes.index_counts:
            if kind == "local":
                url = str(ctx.scratch / "index" / f"run-{n}")
            else:
                url = f"{'s3' if kind == 's3' else 'gs'}://{ctx.bucket(kind)}/run"
            ls, commit, nbytes = _measure(url, n, reps, tiny)
            sec.variant(f"ls @ {n}").samples.extend(ls)
            sec.variant(f"commit @ {n}").samples.extend(commit)
            sec.variant(f"ls @ {n}").extra["index_bytes"] = nbytes
            log.info("  %s n=%d: ls %.3fs, commit %.3fs, index %d KiB", kind, n, statistics.median(ls),
                     statistics.median(commit), nbytes // 1024)
        lo, hi = ctx.sizes.index_counts[0], ctx.sizes.index_counts[-1]
        ls_growth = sec.variant(f"ls @ {hi}").median / sec.variant(f"ls @ {lo}").median
        commit_growth = sec.variant(f"commit @ {hi}").median / sec.variant(f"commit @ {lo}").median
        sec.ratio = round(commit_growth, 2)
        sec.ratio_desc = f"commit time @ {hi} / @ {lo}"
        sec.met = commit_growth <= 2.0  # "close to flat": a commit at most twice as long at the largest index
        sec.params = {"ls_growth": round(ls_growth, 2), "commit_growth": round(commit_growth, 2),
                      "bytes_per_entry": round(sec.variant(f"ls @ {hi}").extra["index_bytes"] / hi)}
        sec.notes.append(f"ls grows {ls_growth:.1f}x and a commit {commit_growth:.1f}x from {lo} to {hi} checkpoints; "
                         "the index is one JSON document, so both are O(N) in its size "
                         f"(~{sec.params['bytes_per_entry']} bytes per one-file checkpoint).")
        sec.seconds = round(time.monotonic() - t_start, 1)
        out.append(sec)
    tiny.unlink()
    return out
