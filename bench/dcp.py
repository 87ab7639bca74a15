"""Measurement 10 (issue 22): PyTorch Distributed Checkpoint (DCP) through ``cloudckpt.torch.dcp`` against DCP's own
writers and s3torchconnector's, on moto's S3 server; 4 ranks (torchrun, gloo, CPU) holding DTensor shards.

- Save: wall time of one ``dcp.save`` of every rank's shards, barrier to barrier (every rank's bytes stored, the
  commit or ``.metadata`` done): CloudStorageWriter (S3) vs DCP's ``FileSystemWriter`` on local disk, DCP's
  ``FsspecWriter`` over s3fs and s3torchconnector's ``S3StorageWriter`` (when installed: ``pip install
  s3torchconnector``; else reported as skipped). Target: <= 1.0x the fastest object-store writer. Each writer with
  its defaults (one file per rank; FileSystemWriter and FsspecWriter one thread, S3StorageWriter one thread,
  CloudStorageWriter 8 transfer workers).
- Stall: ``dcp.async_save`` through CloudStorageWriter, until the call returns, vs the device-to-host copy alone
  (each rank's shards cloned into new CPU memory); the slowest rank's figure. Target: <= 1.1x.
- Load with resharding 4 -> 2 (a 2-rank job loads what the 4 ranks saved) vs FsspecReader and S3StorageReader.
  Target: <= 1.0x the fastest object-store reader.
- The commit's own cost (the coordinator's ``finish``: metadata object, manifest, one index compare-and-swap,
  retention keep-last 2) for 2, 8 and 32 ranks' worth of items (64 tensors, each sharded over every rank), in this
  process with synthetic rank results. Target: the slowest within 1.5x of the fastest.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from typing import Any

from .common import ROOT, Ctx, Section, guarded, interleaved, log, ratio

RANKS, LOAD_RANKS = 4, 2
COMMIT_RANKS = (2, 8, 32)
COMMIT_TENSORS = 64


def _torchrun(ctx: Ctx, n: int, *args: str) -> dict[str, Any]:
    out = ctx.scratch / f"dcp-{args[0]}.json"
    extra = os.environ.get("CLOUDCKPT_BENCH_S3TC_PATH", "")  # where s3torchconnector was installed, if not in the venv
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), extra, os.environ.get("PYTHONPATH", ""))
                                                       if p)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n), "-m",
           "bench.dcp_child", *args, "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"torchrun {args[0]} failed: {proc.stderr[-1500:]}")
    return json.loads(out.read_text())


def _s3tc() -> bool:
    extra = os.environ.get("CLOUDCKPT_BENCH_S3TC_PATH")
    if extra and extra not in sys.path:
        sys.path.append(extra)
    return importlib.util.find_spec("s3torchconnector") is not None


def _section(sid: str, title: str, samples: dict[str, list[float]], ours: str, others: list[str], *, tid: str,
             target: str, limit: float, params: dict[str, Any]) -> Section:
    sec = Section(sid, title, "s", params=params)
    for name, values in samples.items():
        sec.variant(name).samples.extend(values)
    r, best = ratio(sec, ours, [o for o in others if o in samples])
    if r is not None:
        sec.ratio, sec.ratio_desc = round(r, 3), f"time vs fastest ({best})"
    for name in samples:
        if name != ours:
            other, _ = ratio(sec, ours, [name])
            if other is not None:
                sec.other_ratios[f"time vs {name}"] = round(other, 3)
    meds = "; ".join(f"{n} {sec.variant(n).median:.3f} s" for n in samples)
    sec.add_target(tid, target, f"{sec.ratio}x ({meds})", value=sec.ratio, limit=limit)
    return sec


def transfers(ctx: Ctx) -> list[Section]:
    """Save, async stall and 4 -> 2 load: two torchrun jobs."""
    from .dcp_child import CLOUD, CLOUD_R, FSSPEC, FSSPEC_R, S3TC, S3TC_R

    mb, reps = ctx.sizes.dcp_rank_mb, ctx.sizes.reps
    bucket = ctx.bucket("s3")
    s3tc = _s3tc()
    base = ["--endpoint", ctx.s3_endpoint, "--bucket", bucket, "--scratch", str(ctx.scratch), "--mb", str(mb),
            "--reps", str(reps), *(["--s3tc"] if s3tc else [])]
    t0 = time.monotonic()
    saved = _torchrun(ctx, RANKS, "save", *base)
    params = {"ranks": RANKS, "MiB_per_rank": mb, "reps": reps, "s3torchconnector": s3tc}
    stores = [FSSPEC, S3TC]
    save = _section("dcp_save", f"DCP save, {RANKS} ranks x {mb} MiB to moto", saved["save"], CLOUD, stores,
                    tid="dcp save", target="<= 1.0x the fastest object-store DCP writer", limit=1.0, params=params)
    stall = Section("dcp_async_stall", f"DCP async_save stall, {RANKS} ranks x {mb} MiB", "s", params=params)
    for name, values in saved["stall"].items():
        stall.variant(name).samples.extend(values)
    r, _ = ratio(stall, "async_save returns", ["copy alone (clone)"])
    stall.ratio, stall.ratio_desc = (round(r, 3) if r else None), "stall vs the device-to-host copy alone"
    stall.add_target("dcp stall", "<= 1.1x the device-to-host copy alone",
                     f"{stall.ratio}x ({stall.variant('async_save returns').median:.3f} vs "
                     f"{stall.variant('copy alone (clone)').median:.3f} s)", value=stall.ratio, limit=1.1)
    save.seconds = stall.seconds = round(time.monotonic() - t0, 1)
    t0 = time.monotonic()
    loaded = _torchrun(ctx, LOAD_RANKS, "load", *base, "--save-world", str(RANKS), "--kept", str(saved["kept"]))
    load = _section("dcp_load", f"DCP load resharded {RANKS} -> {LOAD_RANKS} ranks, {RANKS * mb} MiB", loaded["load"],
                    CLOUD_R, [FSSPEC_R, S3TC_R], tid="dcp load",
                    target="<= 1.0x the fastest object-store DCP reader", limit=1.0, params=params)
    load.seconds = round(time.monotonic() - t0, 1)
    if not s3tc:
        for sec in (save, load):
            sec.notes.append("s3torchconnector: skipped, not installed")
    return [save, stall, load]


def commit_cost(ctx: Ctx) -> Section:
    """The coordinator's finish for 2, 8 and 32 ranks' worth of items, interleaved, on moto."""
    import google_crc32c
    import torch
    from torch.distributed.checkpoint.metadata import (
        ChunkStorageMetadata,
        Metadata,
        MetadataIndex,
        TensorProperties,
        TensorStorageMetadata,
    )
    from torch.distributed.checkpoint.storage import WriteResult

    from cloudckpt import layout
    from cloudckpt.distributed_commit import forget_job_stores, job_store
    from cloudckpt.manifest import FileEntry
    from cloudckpt.torch.dcp import CloudStorageWriter, _Stored
    from cloudckpt.torch.dcp_format import StoredItem

    sec = Section("dcp_commit", f"DCP commit (finish) for {', '.join(map(str, COMMIT_RANKS))} ranks' items", "s",
                  params={"ranks": COMMIT_RANKS, "tensors": COMMIT_TENSORS, "retention": "keep_last=2"})
    url = f"s3://{ctx.bucket('s3')}/commit"
    rows, cols, item = 64, 64, 64 * 64 * 4
    crc = google_crc32c.Checksum(b"x").digest().hex()

    def finish(n: int) -> float:
        writer = CloudStorageWriter(url, step=0, keep_last=2)
        store = job_store(url, claim=True, **writer._opts)  # the store finish uses
        writer.cid, writer.began = layout.new_checkpoint_id(None, 0), store.keeper.seq_floor()
        sd_md, results = {}, []
        for t in range(COMMIT_TENSORS):
            sd_md[f"layer{t}.weight"] = TensorStorageMetadata(
                TensorProperties(dtype=torch.float32), torch.Size([rows * n, cols]),
                [ChunkStorageMetadata(torch.Size([r * rows, 0]), torch.Size([rows, cols])) for r in range(n)])
        for r in range(n):
            name = f"__{r}_0.distcp"
            store.backend.write_bytes(layout.object_key(writer.cid, name), b"x")  # the rank's object exists
            obj = FileEntry(path=name, size=COMMIT_TENSORS * item, crc32c=crc)
            results.append([WriteResult(index=MetadataIndex(fqn, torch.Size([r * rows, 0])), size_in_bytes=item,
                                        storage_data=_Stored(writer.cid, StoredItem(
                                            fqn=fqn, offset=[r * rows, 0], file=name, start=t * item, length=item,
                                            crc32c=crc), obj))
                            for t, fqn in enumerate(sd_md)])
        t0 = time.perf_counter()
        writer.finish(Metadata(state_dict_metadata=sd_md), results)
        return time.perf_counter() - t0

    try:
        interleaved(ctx.sizes.reps * 2, {f"{n} ranks ({n * COMMIT_TENSORS} items)": (lambda n=n: finish(n))
                                        for n in COMMIT_RANKS}, section=sec, warmup=True)
    finally:
        forget_job_stores()
    meds = [v.median for v in sec.variants if v.median]
    sec.ratio = round(max(meds) / min(meds), 3) if meds else None
    sec.ratio_desc = "slowest / fastest median"
    sec.add_target("dcp commit", "flat in the number of ranks: slowest <= 1.5x fastest",
                   f"{sec.ratio}x ({'; '.join(f'{v.name} {v.median * 1000:.0f} ms' for v in sec.variants)})",
                   value=sec.ratio, limit=1.5)
    return sec


def run(ctx: Ctx) -> list[Section]:
    if importlib.util.find_spec("torch") is None:
        return [Section("dcp_save", "DCP", "s", skipped="torch is not installed")]
    log.info("dcp: %d ranks x %d MiB (%s)", RANKS, ctx.sizes.dcp_rank_mb, f"{RANKS * ctx.sizes.dcp_rank_mb} MiB")
    out = []
    try:
        out.extend(transfers(ctx))
    except Exception as exc:  # keep the commit figures
        log.exception("dcp transfers failed")
        out.append(Section("dcp_save", "DCP save/load", "s", error=f"{type(exc).__name__}: {exc}"[:500]))
    out.append(guarded("dcp_commit", "DCP commit", lambda: commit_cost(ctx)))
    return out

