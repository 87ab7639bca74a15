"""Measurements 3 and 4 (issue 14, target 5): push and verified restore, cloudckpt against the raw clients on the
same server (S3: boto3, s3fs, s5cmd, obstore, see :mod:`bench.s3_clients`; GCS: google-cloud-storage, gcsfs).

Every repetition runs every client once, interleaved; objects are deleted after each run (the servers keep them in
RAM). Besides wall time, each run records the CPU seconds the server process and this process used, which shows who
is the bottleneck (a server whose CPU time is close to the wall time is saturated).
"""

from __future__ import annotations

import os
import resource
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from . import s3_clients
from .common import Ctx, Section, cpu_seconds, fmt_bytes, guarded, interleaved, log, make_file, ratio

CKPT = "cloudckpt"
SAME_CHUNKS = "google-cloud-storage, cloudckpt's chunk size"
FULL_OBJECT = "cloudckpt, multipart_checksum=full_object"


def _self_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _timed(fn: Callable[[], None], server_pid: int | None, extra: dict) -> Callable[[], float]:
    """Wrap ``fn`` so that it returns its wall seconds and appends server/client CPU seconds to ``extra``."""

    def run() -> float:
        s0, c0 = cpu_seconds(server_pid), _self_cpu()
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        extra.setdefault("server_cpu_s", []).append(round(cpu_seconds(server_pid) - s0, 3))
        extra.setdefault("client_cpu_s", []).append(round(_self_cpu() - c0, 3))
        return dt

    return run


def _finish(sec: Section, size: int, ours: str, raw: list[str], *, tid: str, limit: float, what: str,
            also: tuple[str, ...] = ()) -> Section:
    """MB/s per variant; the ratio median(ours) / median(fastest of ``raw``) (a time ratio: <= ``limit`` is met),
    recorded as the section's ratio and as its target; ``also``: clients shown with their own ratio, no target."""
    for v in sec.variants:
        if v.median:
            v.extra["MBps"] = round(size / v.median / 1e6, 1)
    r, best = ratio(sec, ours, raw)
    for name in also:
        other, _ = ratio(sec, ours, [name])
        if other is not None:
            sec.other_ratios[f"time vs {name}"] = round(other, 3)
    if r is None:
        return sec
    sec.ratio = round(r, 3)
    sec.ratio_desc = f"time vs fastest ({best})"
    mine, theirs = sec.variant(ours).median, sec.variant(best).median
    others = "; ".join(f"{n} {sec.variant(n).median:.2f} s" for n in (*raw, *also) if n != best
                       and sec.variant(n).median)
    entry = sec.add_target(tid, f"{what} <= {limit:.1f}x the fastest of {', '.join(raw)} (median time)",
                           f"{fmt_bytes(size)}: {mine:.2f} vs {theirs:.2f} s ({best}): {r:.3f}x; {others}",
                           value=r, limit=limit)
    sec.met = entry["met"]
    return sec


# --- S3 --------------------------------------------------------------------------------------------------------


def _empty_s3_bucket(client, bucket: str) -> None:
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        if keys:
            client.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})


def _skipped_note(sec: Section, skipped: dict[str, str]) -> None:
    for name, why in skipped.items():
        sec.notes.append(f"{name}: skipped: {why}")
    if skipped:
        sec.params["skipped_clients"] = skipped


def push_s3(ctx: Ctx, src: Path) -> Section:
    import boto3

    from cloudckpt import CheckpointStore

    size = src.stat().st_size
    sec = Section("push_s3", f"3. Push {fmt_bytes(size)} to S3 (moto server)", "s",
                  target="<= 1.0x the fastest raw client's time (issue 14, target 5)")
    client = boto3.client("s3")
    bucket = ctx.bucket("s3")
    store = CheckpointStore(f"s3://{bucket}/run")

    def ours():
        store.push(src, epoch=1)

    raw, skipped = s3_clients.push_clients(ctx.s3_endpoint, bucket, src)
    # the option: the same push with S3's FULL_OBJECT multipart checksum instead of the default COMPOSITE, which
    # moto implements by copying the whole object twice and hashing it on one thread at CompleteMultipartUpload
    probe = CheckpointStore(f"s3://{bucket}/probe", multipart_checksum="full_object")
    raw[FULL_OBJECT] = lambda: (probe.push(src, epoch=1), None)[1]
    runs = {name: _timed(fn, ctx.s3_pid, sec.variant(name).extra) for name, fn in {CKPT: ours, **raw}.items()}
    interleaved(ctx.sizes.reps, runs, cleanup=lambda: _empty_s3_bucket(client, bucket), section=sec,
                warmup=not ctx.quick)
    profiles = _profiles(ctx, ctx.s3_pid, ours, lambda: _empty_s3_bucket(client, bucket))
    store.close()
    probe.close()
    _skipped_note(sec, skipped)
    sec.notes.append(f"{FULL_OBJECT!r} is not a client: cloudckpt's push with S3's FULL_OBJECT multipart checksum "
                     "(the store reports the whole object's crc32c, the manifest's) instead of the default "
                     "COMPOSITE (a crc32c of the parts' crc32cs), to show what moto's FULL_OBJECT implementation "
                     "costs (server_cpu_s); not counted.")
    sec.params.update({**profiles, "bytes": size, "cloudckpt_part_size": store.backend.part_size,
                       "cloudckpt_concurrency": store.backend.max_concurrency,
                       **{n: s3_clients.SETTINGS[n] for n in raw if n in s3_clients.SETTINGS},
                       "push": "cloudckpt: store.push (upload with per-part crc32c, whole-object check, manifest, "
                               "index compare-and-swap); raw clients: one upload"})
    counted = [n for n in (s3_clients.BOTO3_PUSH, s3_clients.S3FS_PUSH, s3_clients.S5CMD_PUSH) if n in raw]
    return _finish(sec, size, CKPT, counted, tid="5 push (S3)", limit=1.0, what="push",
                   also=(FULL_OBJECT, *(n for n in (s3_clients.OBSTORE_PUSH,) if n in raw)))


def restore_s3(ctx: Ctx, src: Path) -> Section:
    import boto3

    from cloudckpt import CheckpointStore

    size = src.stat().st_size
    sec = Section("restore_s3", f"4. Verified restore of {fmt_bytes(size)} from S3 (moto server)", "s",
                  target="<= 1.0x the fastest raw download + the same crc32c check (issue 14, target 5)")
    client = boto3.client("s3")
    bucket = ctx.bucket("s3")
    store = CheckpointStore(f"s3://{bucket}/run")
    entry = store.push(src, epoch=1)
    key = f"run/{entry.id}/{src.name}"
    out = ctx.scratch / "restore"
    out.mkdir(parents=True, exist_ok=True)
    raw, skipped = s3_clients.pull_clients(ctx.s3_endpoint, bucket, key, out, size=size,
                                           crc32c=entry.files[0].crc32c, extra=lambda n: sec.variant(n).extra)
    runs = {CKPT: _timed(_pull_split(store, out / "pulled", sec.variant(CKPT).extra), ctx.s3_pid,
                         sec.variant(CKPT).extra)}
    runs.update({name: _timed(fn, ctx.s3_pid, sec.variant(name).extra) for name, fn in raw.items()})
    interleaved(ctx.sizes.reps, runs, cleanup=lambda: _clear(out), section=sec)
    store.close()
    _empty_s3_bucket(client, bucket)
    _skipped_note(sec, skipped)
    sec.notes.append("The raw clients' downloads are one streamed GET each; cloudckpt's pull is 8 MiB ranges, 8 at "
                     "a time (cloudckpt/fetch.py), served from the range alone (tests/support/moto_ranges.py; stock "
                     "moto re-reads the whole object for every ranged GET, shared/NOTES.md).")
    sec.params.update({"bytes": size, **{n: s3_clients.SETTINGS[n] for n in raw if n in s3_clients.SETTINGS},
                       "verified pull": "cloudckpt: store.pull('latest') = index + manifest reads, ranged GETs "
                                        "hashed (crc32c) as they are written, size + crc32c compared with the "
                                        "manifest, atomic move into place; raw clients: download, then crc32c "
                                        "of the file (a second pass, verify_s) and its size compared with the "
                                        "source's"})
    counted = [n for n in (s3_clients.BOTO3_PULL, s3_clients.S3FS_PULL, s3_clients.S5CMD_PULL) if n in raw]
    return _finish(sec, size, CKPT, counted, tid="5 verified pull (S3)", limit=1.0, what="verified pull",
                   also=tuple(n for n in (s3_clients.OBSTORE_PULL,) if n in raw))


def _profiles(ctx: Ctx, server_pid: int | None, push: Callable[[], None], cleanup: Callable[[], None]) -> dict:
    """Full runs only: one more cloudckpt push with py-spy on the server, then one with py-spy on this process."""
    if ctx.quick:
        return {}
    from .profiling import profile

    out = {}
    for key, pid in (("server_profile", server_pid), ("client_profile", os.getpid())):
        if pid is not None:
            out[key] = profile(pid, push)
            cleanup()
    return out


def _pull_split(store, to: Path, extra: dict) -> Callable[[], None]:
    """store.pull("latest"), recording how many of its seconds went to the checksum pass over the downloaded file."""
    import cloudckpt.fetch as transfer  # where a pull hashes a whole file (sha256, or a store without ranges)

    def pull() -> None:
        spent: list[float] = []
        real = transfer.file_checksums

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return real(*args, **kwargs)
            finally:
                spent.append(time.perf_counter() - t0)

        transfer.file_checksums = timed
        try:
            store.pull("latest", to=to)
        finally:
            transfer.file_checksums = real
        extra.setdefault("verify_s", []).append(round(sum(spent), 3))

    return pull


def _clear(d: Path) -> None:
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True, exist_ok=True)


# --- GCS -------------------------------------------------------------------------------------------------------


def _gcs_clients():
    import gcsfs
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    client = storage.Client(project="cloudckpt-test", credentials=AnonymousCredentials())
    fs = gcsfs.GCSFileSystem(token="anon")
    return client, fs


def _empty_gcs_bucket(client, bucket: str) -> None:
    for blob in client.list_blobs(bucket):
        blob.delete()


def push_gcs(ctx: Ctx, src: Path) -> Section:
    from cloudckpt import CheckpointStore

    size = src.stat().st_size
    sec = Section("push_gcs", f"3. Push {fmt_bytes(size)} to GCS (fake-gcs-server)", "s",
                  target="<= 1.0x the faster raw client's time")
    client, fs = _gcs_clients()
    bucket = ctx.bucket("gcs")
    store = CheckpointStore(f"gs://{bucket}/run")
    b = client.bucket(bucket)

    runs = {
        CKPT: _timed(lambda: store.push(src, epoch=1), ctx.gcs_pid, sec.variant(CKPT).extra),
        "google-cloud-storage upload_from_filename": _timed(
            lambda: b.blob(f"raw/{uuid.uuid4().hex}").upload_from_filename(str(src)),
            ctx.gcs_pid, sec.variant("google-cloud-storage upload_from_filename").extra),
        "gcsfs put_file": _timed(lambda: fs.put_file(str(src), f"{bucket}/raw/{uuid.uuid4().hex}"),
                                 ctx.gcs_pid, sec.variant("gcsfs put_file").extra),
        SAME_CHUNKS: _timed(
            lambda: b.blob(f"raw/{uuid.uuid4().hex}",
                           chunk_size=store.backend.chunk_size).upload_from_filename(str(src)),
            ctx.gcs_pid, sec.variant(SAME_CHUNKS).extra),
    }
    interleaved(min(ctx.sizes.reps, ctx.sizes.gcs_reps), runs, cleanup=lambda: _empty_gcs_bucket(client, bucket),
                section=sec, warmup=not ctx.quick)
    # fake-gcs-server is a Go binary (py-spy reads Python stacks only): its CPU seconds per run are the evidence
    profiles = _profiles(ctx, None, lambda: store.push(src, epoch=1), lambda: _empty_gcs_bucket(client, bucket))
    store.close()
    sec.params = {**profiles, "bytes": size, "cloudckpt_chunk_size": store.backend.chunk_size,
                  "google-cloud-storage": "defaults (resumable, 100 MiB chunks)", "gcsfs": "defaults (50 MiB chunks)"}
    sec.notes.append(f"{SAME_CHUNKS!r} is google-cloud-storage with cloudckpt's resumable chunk size "
                     f"({store.backend.chunk_size // 2**20} MiB): fake-gcs-server's CPU time grows with the number "
                     "of chunks times the object size (see server_cpu_s), so the emulator favours few, large chunks; "
                     "it is shown for reference and not counted as 'the faster raw client'.")
    return _finish(sec, size, CKPT, ["google-cloud-storage upload_from_filename", "gcsfs put_file"],
                   tid="push (GCS)", limit=1.0, what="push")


def restore_gcs(ctx: Ctx, src: Path) -> Section:
    from cloudckpt import CheckpointStore

    size = src.stat().st_size
    sec = Section("restore_gcs", f"4. Verified restore of {fmt_bytes(size)} from GCS (fake-gcs-server)", "s",
                  target="<= 1.1x the faster raw download's time")
    client, fs = _gcs_clients()
    bucket = ctx.bucket("gcs")
    store = CheckpointStore(f"gs://{bucket}/run")
    entry = store.push(src, epoch=1)
    name = f"run/{entry.id}/{src.name}"
    out = ctx.scratch / "restore"
    b = client.bucket(bucket)

    runs = {
        CKPT: _timed(_pull_split(store, out / "pulled", sec.variant(CKPT).extra), ctx.gcs_pid, sec.variant(CKPT).extra),
        "gcsfs get_file": _timed(lambda: fs.get_file(f"{bucket}/{name}", str(out / "gcsfs.bin")),
                                 ctx.gcs_pid, sec.variant("gcsfs get_file").extra),
        "google-cloud-storage download_to_filename": _timed(
            lambda: b.blob(name).download_to_filename(str(out / "gcs.bin")),
            ctx.gcs_pid, sec.variant("google-cloud-storage download_to_filename").extra),
    }
    out.mkdir(parents=True, exist_ok=True)
    interleaved(ctx.sizes.reps, runs, cleanup=lambda: _clear(out), section=sec)
    store.close()
    _empty_gcs_bucket(client, bucket)
    sec.params = {"bytes": size, "checksums": "crc32c of every file verified after download"}
    return _finish(sec, size, CKPT, ["gcsfs get_file", "google-cloud-storage download_to_filename"],
                   tid="verified pull (GCS)", limit=1.1, what="verified pull (raw clients: download only)")


def run(ctx: Ctx) -> list[Section]:
    out = []
    for size, fns in ((ctx.sizes.transfer, (push_s3, restore_s3)), (ctx.sizes.gcs_transfer, (push_gcs, restore_gcs))):
        src = make_file(ctx.scratch / "transfer" / "model.weights.h5", size)
        for fn in fns:
            log.info("%s", fn.__name__)
            out.append(guarded(fn.__name__, fn.__name__, lambda fn=fn: fn(ctx, src)))
        src.unlink()
    return out
