"""Measurement 5: peak memory added by pushing a big checkpoint, in a fresh process.

Each figure is the kernel's RSS high-water mark (``VmHWM`` in ``/proc/<pid>/status``, read every 5 ms until the
child exits) of a fresh process. "Added" = push process minus an idle process of the same kind that imports the
same code and talks to the same server (``cloudckpt ls`` for the CLI; an s3fs ``ls`` for s3fs).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .common import Ctx, MiB, Section, fmt_bytes, log, make_file

S3FS_IDLE = "import s3fs,sys; fs=s3fs.S3FileSystem(); fs.ls(sys.argv[1])"
S3FS_PUT = ("import s3fs,sys; fs=s3fs.S3FileSystem(); fs.ls(sys.argv[1]); "
            "fs.put_file(sys.argv[2], sys.argv[1]+'/raw.bin')")
API_IDLE = "import sys; from cloudckpt import CheckpointStore; CheckpointStore(sys.argv[1]).list()"
API_PUSH = ("import sys; from cloudckpt import CheckpointStore; s=CheckpointStore(sys.argv[1]); s.list(); "
            "s.push(sys.argv[2])")


def _hwm(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_rss(argv: list[str], poll: float = 0.005) -> tuple[int, float]:
    """Run ``argv`` to completion; return (its RSS high-water mark in bytes, wall seconds). Raises on failure.

    The kernel's VmHWM of the child is read every few ms until it exits: it is a high-water mark, so a spike between
    two reads is still seen by the next one. (``wait4``'s ``ru_maxrss`` can't be used: Linux carries the parent's
    high-water mark across the child's exec.)
    """
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as errf:
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=errf)
        peak = 0
        while proc.poll() is None:
            got = _hwm(proc.pid)
            if got:
                peak = max(peak, got)
            time.sleep(poll)
        errf.seek(0)
        err = errf.read().decode(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[:3]}... exited {proc.returncode}: {err[-2000:]}")
    return peak, time.perf_counter() - t0


GCS = "cloudckpt push (gcs)"


def _cli() -> list[str] | None:
    exe = Path(sys.executable).with_name("cloudckpt")
    if exe.exists():
        return [str(exe)]
    try:
        import cloudckpt.cli  # noqa: F401
    except ImportError:
        return None
    return [sys.executable, "-m", "cloudckpt"]


def run(ctx: Ctx) -> list[Section]:
    import boto3

    from cloudckpt import CheckpointStore

    size = ctx.sizes.memory
    sec = Section("memory", f"5. Peak memory added by pushing {fmt_bytes(size)} (S3; GCS beside it)", "MiB",
                  target="<= 128 MiB over an idle CLI process")
    t_start = time.monotonic()
    src = make_file(ctx.scratch / "memory" / "big.weights.h5", size)
    small = make_file(ctx.scratch / "memory-small" / "small.bin", 1024)
    bucket = ctx.bucket("s3")
    url = f"s3://{bucket}/run"
    with CheckpointStore(url) as store:
        store.push(small, epoch=0)  # so that the idle `ls` has a run to list
    client = boto3.client("s3")
    cli = _cli()
    gcs_url = f"gs://{ctx.bucket('gcs')}/run"
    with CheckpointStore(gcs_url) as store:
        store.push(small, epoch=0)

    def ours(to: str) -> tuple[list[str], list[str]]:
        if cli:
            return cli + ["ls", "--remote", to], cli + ["push", str(src), "--remote", to, "--epoch", "1"]
        return [sys.executable, "-c", API_IDLE, to], [sys.executable, "-c", API_PUSH, to, str(src)]

    how = "cloudckpt CLI (`cloudckpt push` vs `cloudckpt ls`)" if cli else "python -c with the API (no CLI)"
    pairs = {
        "cloudckpt push": ours(url),
        "s3fs put_file": ([sys.executable, "-c", S3FS_IDLE, bucket],
                          [sys.executable, "-c", S3FS_PUT, bucket, str(src)]),
        GCS: ours(gcs_url),
    }
    for name, (idle_argv, push_argv) in pairs.items():
        idle, _ = peak_rss(idle_argv)
        v = sec.variant(name)
        try:
            busy, secs = _push_rss(name, push_argv, raw=name == "s3fs put_file")
        except RuntimeError as e:  # a raw client that fails twice costs its own row only
            v.extra["error"] = str(e)[-600:]
            sec.notes.append(f"{name}: failed twice, not measured ({str(e)[-200:]})")
            _delete_big(client, bucket, min_size=size)
            continue
        v.samples.append(round((busy - idle) / MiB, 1))
        v.extra.update(idle_MiB=round(idle / MiB, 1), push_MiB=round(busy / MiB, 1), push_seconds=round(secs, 2))
        log.info("  %-40s idle %.0f MiB, push %.0f MiB, added %.0f MiB (%.1fs)", name, idle / MiB, busy / MiB,
                 (busy - idle) / MiB, secs)
        if name == GCS:
            with CheckpointStore(gcs_url) as store:
                store.prune(keep_last=1)  # fake-gcs-server holds objects in RAM
        else:
            _delete_big(client, bucket, min_size=size)
    shutil.rmtree(src.parent, ignore_errors=True)
    shutil.rmtree(small.parent, ignore_errors=True)
    added = sec.variant("cloudckpt push").median
    sec.ratio = added
    sec.ratio_desc = "MiB added over idle (cloudckpt)"
    gcs_added = sec.variant(GCS).median
    s3fs_added = sec.variant("s3fs put_file").median
    s3fs = f"+{s3fs_added} MiB" if s3fs_added is not None else "failed, not measured"
    met = [sec.add_target("memory (S3)", f"push of {fmt_bytes(size)} adds <= 128 MiB of RSS over an idle process",
                          f"+{added} MiB (s3fs put_file: {s3fs})", value=added, limit=128.0)["met"]]
    if gcs_added is not None:
        met.append(sec.add_target("memory (GCS)", f"push of {fmt_bytes(size)} adds <= 128 MiB of RSS over an idle "
                                  "process", f"+{gcs_added} MiB", value=gcs_added, limit=128.0)["met"])
    sec.met = all(met)
    sec.notes.append(f"to GCS (fake-gcs-server): {gcs_added} MiB added; google-cloud-storage holds one resumable "
                     "chunk in memory (cloudckpt's is 64 MiB)")
    sec.params = {"bytes": size, "how": how,
                  "measure": "VmHWM of the child process (/proc/<pid>/status), read every 5 ms"}
    sec.seconds = round(time.monotonic() - t_start, 1)
    return [sec]


def _push_rss(name: str, argv: list[str], *, raw: bool) -> tuple[int, float]:
    """peak_rss of a push; a raw client's failure (s3fs against moto under load: a part fails, then its
    AbortMultipartUpload gets NoSuchUpload) is retried once and logged. cloudckpt's own push is never retried here."""
    try:
        return peak_rss(argv)
    except RuntimeError as e:
        if not raw:
            raise
        log.warning("  %s failed, once more: %s", name, str(e)[-300:])
        return peak_rss(argv)


def _delete_big(client, bucket: str, *, min_size: int) -> None:
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        keys = [{"Key": o["Key"]} for o in page.get("Contents", []) if o["Size"] >= min_size]
        if keys:
            client.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})
