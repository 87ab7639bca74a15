"""Measurement 7: how resolving best/latest, ``ls`` and one commit scale with the number of checkpoints in a run.

Runs of N one-file checkpoints are written directly in the store's own format (:func:`build_run`: the head and the
sealed segments exactly as commits would have left them — the same :class:`cloudckpt.segments.Sealing` arithmetic
and encoding — checked against sealing commit by commit in ``tests/test_bench_quick.py``), not pushed N times.
Cold resolution is a fresh store (a new ``cloudckpt pull best`` / ``latest`` resolving its selector: read and parse
the head) calling ``get("best")`` / ``get("latest")``, construction included; ``ls`` is ``list()`` on a fresh store
(the head and every segment); a commit is ``push`` of a 1 KiB file by a long-lived store, as a training writer is
(upload, manifest, compare-and-swap of the head; its first, unrecorded push pays the conditional-write probe).

Target (issue 14, 3): cold best/latest resolution and one commit at 5,000 checkpoints cost at most 3x what they
cost at 20, per store, from the medians.
"""

from __future__ import annotations

import gc
import time
from datetime import datetime, timedelta, timezone

from .common import Ctx, Section, log, make_file

LO, HI, LIMIT = 20, 5_000, 3.0  # the target's sizes and bound
#: cold resolutions per size and store: about a millisecond each on a local store, where this machine's scheduling
#: noise (a few ms now and then under load) needs many samples for a stable median
RESOLVE_REPS = {"local": 41, "s3": 15, "gcs": 15}


def _entries(n: int):
    from cloudckpt.manifest import CheckpointEntry, FileEntry

    t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
    return [CheckpointEntry(id=f"ckpt-e{i:06d}-{i:08x}", epoch=i, step=i * 100, created=t0 + timedelta(minutes=i),
                            metrics={"val_loss": 1.0 / (i + 1), "loss": 2.0 / (i + 1)},
                            files=(FileEntry(path="model.weights.h5", size=123_456_789, crc32c=f"{i:08x}"),),
                            size=123_456_789, writer="bench:1:abcdef01")
            for i in range(n)]


def build_run(n: int, sealing=None):
    """The head and the segments (``NewSegment``s) that ``n`` commits with no retention leave under ``sealing``."""
    from cloudckpt.manifest import INDEX_VERSION, SCHEMA_VERSION, Index, RunPolicy, best_of
    from cloudckpt.segments import Sealing, encode

    sealing = sealing or Sealing.from_env()
    head = 0
    for _ in range(n):  # what sealing after each commit leaves in the head
        head += 1
        if head > sealing.head_max:
            head = sealing.head_max // 2
    entries = _entries(n)
    run = RunPolicy(monitor="val_loss", mode="min")
    sealed = entries[:n - head]
    made = [encode(sealed[i:i + sealing.segment_max], run.retention.objective)
            for i in range(0, len(sealed), sealing.segment_max)]
    index = Index(run=run, checkpoints=tuple(entries[n - head:]), segments=tuple(m.ref for m in made),
                  latest=entries[-1].id if entries else None, best=best_of(tuple(entries), run.retention.objective),
                  seq=n, schema_version=INDEX_VERSION if made else SCHEMA_VERSION)
    return index, made


def _write_run(url: str, n: int) -> int:
    from cloudckpt import CheckpointStore
    from cloudckpt.manifest import dump

    index, made = build_run(n)
    with CheckpointStore(url) as store:
        for seg in made:
            store.backend.write_bytes(seg.key, seg.data)
        data = dump(index)
        _, token = store.backend.read_index()
        store.backend.write_index(data, token)
    return len(data)


def _timed(fn) -> float:
    gc.collect()  # an earlier measurement's garbage is not collected inside this one
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _measure(sec: Section, urls: dict[int, str], reps: int, resolve_reps: int, tiny) -> None:
    """Every size's runs side by side: each round times every size (A, B, C, then C, B, A, ...), so drifting load
    hits all sizes alike."""
    from cloudckpt import CheckpointStore

    def cold(url: str, selector: str) -> None:
        with CheckpointStore(url) as reader:  # a fresh store, as a new `cloudckpt pull best` process has
            reader.get(selector)

    def ls(url: str, n: int) -> None:
        with CheckpointStore(url) as reader:
            assert len(reader.list()) >= n

    for n, url in urls.items():
        sec.variant(f"head bytes @ {n}").extra["bytes"] = _write_run(url, n)
    sizes = list(urls)
    for r in range(resolve_reps):
        for n in sizes if r % 2 == 0 else sizes[::-1]:
            url = urls[n]
            sec.variant(f"best @ {n}").samples.append(_timed(lambda: cold(url, "best")))  # noqa: B023
            sec.variant(f"latest @ {n}").samples.append(_timed(lambda: cold(url, "latest")))  # noqa: B023
            if r < max(3, reps):  # ls reads every segment: O(N), a few samples are enough
                sec.variant(f"ls @ {n}").samples.append(_timed(lambda: ls(url, n)))  # noqa: B023
    writers = {n: CheckpointStore(url) for n, url in urls.items()}  # long-lived, as a training writer's
    try:
        for n, store in writers.items():
            store.push(tiny, epoch=n, metrics={"val_loss": 5.0})  # warm-up: the conditional-write probe, connections
        for r in range(max(7, reps)):
            for n in sizes if r % 2 == 0 else sizes[::-1]:
                push = writers[n].push
                sec.variant(f"commit @ {n}").samples.append(
                    _timed(lambda: push(tiny, epoch=n + 1 + r, metrics={"val_loss": 5.0})))  # noqa: B023
    finally:
        for store in writers.values():
            store.close()


def _target(sec: Section, what: str, kind: str, top: int) -> None:
    lo, hi = sec.variant(f"{what} @ {LO}").median, sec.variant(f"{what} @ {top}").median
    growth = hi / lo if lo and hi else None
    measured = (f"{kind} {what}: {hi * 1e3:.1f} ms @ {top:,} vs {lo * 1e3:.1f} ms @ {LO} = {growth:.2f}x"
                if growth is not None else f"{kind} {what}: not measured")
    target = f"{what} @ {HI:,} checkpoints <= {LIMIT:g}x @ {LO}" + (f" (quick: @ {top:,})" if top != HI else "")
    add = getattr(sec, "add_target", None)  # bench.common's verdict helper, where it exists
    if add is not None:
        add("3 index", target, measured, value=growth, limit=LIMIT)
        return
    sec.params.setdefault("targets", []).append(
        {"id": "3 index", "target": target, "measured": measured, "met": growth is not None and growth <= LIMIT})


def run(ctx: Ctx) -> list[Section]:
    tiny = make_file(ctx.scratch / "index" / "tiny.bin", 1024)
    counts = sorted({LO, *ctx.sizes.index_counts})  # a full run has HI too; --quick stops short of it
    top = HI if HI in counts else counts[-1]
    out = []
    for kind in ("local", "s3", "gcs"):
        t_start = time.monotonic()
        sec = Section(f"index_{kind}", f"7. Index scale on {kind}: cold best/latest, ls and one commit vs "
                      "checkpoints in the run", "s", target=f"best, latest and a commit @ {HI:,} <= {LIMIT:g}x @ {LO}")
        urls = {n: str(ctx.scratch / "index" / f"{kind}-{n}") if kind == "local"
                else f"{'s3' if kind == 's3' else 'gs'}://{ctx.bucket(kind)}/run" for n in counts}
        _measure(sec, urls, ctx.sizes.reps, 5 if ctx.quick else RESOLVE_REPS[kind], tiny)
        for n in counts:
            log.info("  %s n=%d: best %.4fs, latest %.4fs, ls %.3fs, commit %.3fs", kind, n,
                     sec.variant(f"best @ {n}").median, sec.variant(f"latest @ {n}").median,
                     sec.variant(f"ls @ {n}").median, sec.variant(f"commit @ {n}").median)
        growth = {w: sec.variant(f"{w} @ {top}").median / sec.variant(f"{w} @ {LO}").median
                  for w in ("best", "latest", "ls", "commit")}
        for what in ("best", "latest", "commit"):
            _target(sec, what, kind, top)
        sec.ratio = round(max(growth["best"], growth["latest"], growth["commit"]), 2)
        sec.ratio_desc = f"largest of cold best, cold latest, commit: time @ {top:,} / @ {LO}"
        sec.met = sec.ratio <= LIMIT
        sec.params = {**sec.params, **{f"{w}_growth": round(g, 2) for w, g in growth.items()},
                      "head_bytes": {n: sec.variant(f"head bytes @ {n}").extra["bytes"] for n in counts}}
        sec.variants = [v for v in sec.variants if not v.name.startswith("head bytes")]
        sec.notes.append(f"from {LO} to {top:,} checkpoints: cold best {growth['best']:.2f}x, cold latest "
                         f"{growth['latest']:.2f}x, a commit {growth['commit']:.2f}x (the head only); ls "
                         f"{growth['ls']:.1f}x (reads every segment: O(N) by nature).")
        sec.seconds = round(time.monotonic() - t_start, 1)
        out.append(sec)
    tiny.unlink()
    return out
