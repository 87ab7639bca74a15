"""Measurement 8: checksum cost per GB, and the thread it runs on.

The file is read once beforehand so that every algorithm reads from the page cache: what is timed is the hashing
(plus the copy out of the cache, which every uploader pays anyway). The second part pushes a file through a
:class:`~cloudckpt.CheckpointStore` and records the name of every thread that computed a checksum.
"""

from __future__ import annotations

import hashlib
import threading
import time
import zlib
from pathlib import Path

from .common import Ctx, Section, fmt_bytes, interleaved, log, make_file

BLOCK = 8 * 2**20


def _stream(path: Path, update) -> None:
    with open(path, "rb", buffering=0) as f:
        while block := f.read(BLOCK):
            update(block)


def _zlib(path: Path) -> None:
    crc = 0
    with open(path, "rb", buffering=0) as f:
        while block := f.read(BLOCK):
            crc = zlib.crc32(block, crc)


def checksum_threads(ctx: Ctx, path: Path) -> list[str]:
    """Names of the threads that hashed bytes during a push and a verified pull called from this thread: a push hashes
    the bytes it sends as ``Source`` reads them, a pull hashes what ``HashingWriter`` writes."""
    from cloudckpt import CheckpointStore
    from cloudckpt.checksum import HashingWriter
    from cloudckpt.source import Source

    seen: set[str] = set()
    spied = [(Source, "read"), (Source, "readinto"), (HashingWriter, "write")]
    originals = [getattr(cls, name) for cls, name in spied]

    def spy(real):
        def call(*args, **kwargs):
            seen.add(threading.current_thread().name)
            return real(*args, **kwargs)
        return call

    for (cls, name), real in zip(spied, originals):
        setattr(cls, name, spy(real))
    try:
        with CheckpointStore(str(ctx.scratch / "checksum-run")) as store:
            store.push(path, epoch=1)
            store.pull("latest", to=ctx.scratch / "checksum-pulled")
    finally:
        for (cls, name), real in zip(spied, originals):
            setattr(cls, name, real)
    return sorted(seen)


def run(ctx: Ctx) -> list[Section]:
    from cloudckpt.checksum import file_checksums

    t_start = time.monotonic()
    size = ctx.sizes.checksum
    path = make_file(ctx.scratch / "checksum" / "blob.bin", size)
    _stream(path, lambda b: None)  # warm the page cache
    sec = Section("checksum", f"8. Checksum cost ({fmt_bytes(size)} from the page cache, one thread)", "s",
                  target="cheap, and never on the training thread")
    runs = {
        "crc32c (cloudckpt.checksum)": lambda: (file_checksums(path), None)[1],
        "crc32c + sha256 (push --sha256)": lambda: (file_checksums(path, sha256=True), None)[1],
        "sha256 (hashlib)": lambda: _stream(path, hashlib.sha256().update),
        "zlib.crc32": lambda: _zlib(path),
        "read only": lambda: _stream(path, lambda b: None),
    }
    interleaved(max(3, ctx.sizes.reps), runs, section=sec)
    for v in sec.variants:
        v.extra["s_per_GB"] = round(v.median / (size / 1e9), 3)
        v.extra["GBps"] = round(size / 1e9 / v.median, 2)
    threads = checksum_threads(ctx, path)
    crc = sec.variant("crc32c (cloudckpt.checksum)")
    sec.ratio = crc.extra["s_per_GB"]
    sec.ratio_desc = "crc32c seconds per GB"
    on_caller = threading.current_thread().name in threads
    sec.met = sec.add_target(
        "checksum", "crc32c never on the caller's (training) thread",
        f"ran on {', '.join(threads) or 'no thread seen'}; the caller {threading.current_thread().name!r} "
        f"{'among them' if on_caller else 'never'}; crc32c {crc.extra['s_per_GB']} s/GB",
        value=float(on_caller), limit=0.0)["met"]
    sec.params = {"bytes": size, "threads_that_ran_checksums": threads}
    sec.notes.append(
        f"Checksums ran on threads {threads} during a push and a verified pull called from thread "
        f"{threading.current_thread().name!r}: the store's I/O pool (Source reads on upload, HashingWriter on "
        "download), never the caller's thread. In training, CloudCheckpoint hands the push to its uploader, so the "
        "training thread never hashes.")
    log.info("  checksum threads: %s", threads)
    path.unlink()
    sec.seconds = round(time.monotonic() - t_start, 1)
    return [sec]
