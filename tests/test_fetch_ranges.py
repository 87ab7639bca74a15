"""Parallel ranged pulls through a shaped network (tests/support/shaping_proxy.py) on S3, GCS and Azure: wall time
shrinks with concurrency, an interrupted pull resumes from the ranges that landed (counted by the proxy), a damaged
partial range is fetched again and never published, a connection reset in the middle of a range is retried."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import google_crc32c
import pytest
from support import servers
from support.shaping_proxy import Fault, ShapingProxy

from cloudckpt import cancel
from cloudckpt.backends import open_backend
from cloudckpt.entry import FileEntry
from cloudckpt.errors import IntegrityError
from cloudckpt.fetch import RangePool, fetch_file, part_path, sidecar_path
from cloudckpt.source import Source
from cloudckpt.transfer import download_verified

MiB = 2**20
SIZE = 8 * MiB
STEP = 1 * MiB
REPO = Path(__file__).resolve().parents[1]


def _upload(url: str, tmp_path: Path) -> tuple[bytes, FileEntry]:
    data = os.urandom(SIZE)
    src = tmp_path / "source.bin"
    src.write_bytes(data)
    backend = open_backend(url)
    with Source(src) as s:
        backend.upload(s, "ck/weights.bin")
        entry = FileEntry(path="weights.bin", size=s.size, crc32c=s.crc32c())
    return data, entry


def _proxied(kind: str, proxy: ShapingProxy) -> tuple[dict, dict]:
    """Storage options and environment that send a backend of ``kind`` through ``proxy``."""
    if kind == "s3":
        return {"endpoint_url": proxy.endpoint}, {}
    if kind == "gcs":
        return {}, {"STORAGE_EMULATOR_HOST": proxy.endpoint}
    return {"connection_string": servers.azure_connection_string(proxy.endpoint)}, {}


@pytest.fixture(params=["s3", "gcs", "az"])
def shaped(request, tmp_path):
    """``(kind, url, proxy, data, entry, open_proxied)``: an 8 MiB object on a real server and a shaping proxy in
    front of that server."""
    kind = request.param
    url = request.getfixturevalue(f"{kind}_url")
    server = request.getfixturevalue({"s3": "s3_server", "gcs": "gcs_server", "az": "azure_server"}[kind])
    data, entry = _upload(url, tmp_path)
    proxy = ShapingProxy(server.endpoint).start()
    options, env = _proxied(kind, proxy)

    def open_proxied():
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            return open_backend(url, dict(options))
        finally:  # the env is read when the client is made; the test's other clients talk to the server
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    yield kind, url, proxy, data, entry, open_proxied, options, env
    proxy.stop()


def _start(request) -> int:
    return int(request.range.split("=")[1].split("-")[0])


def _ranges_asked(proxy: ShapingProxy) -> list[int]:
    """The start offsets of the ranged GETs of the object the proxy saw, in order."""
    out = []
    for r in proxy.stats.requests:
        if r.method == "GET" and "weights.bin" in r.target and r.range:
            out.append(_start(r))
    return out


def _object_bytes(proxy: ShapingProxy) -> int:
    """Bytes of the object's answers the proxy sent (a client's metadata requests aside)."""
    return sum(r.body_bytes for r in proxy.stats.requests if "weights.bin" in r.target)


def test_wall_time_shrinks_with_concurrency(shaped, tmp_path):
    kind, url, proxy, data, entry, open_proxied, *_ = shaped
    backend = open_proxied()
    proxy.shape(rate=2e6, latency=0.03)
    times = {}
    for concurrency in (1, 8):
        dest = tmp_path / f"c{concurrency}" / "weights.bin"
        dest.parent.mkdir()
        proxy.reset_stats()
        t0 = time.monotonic()
        with RangePool(concurrency, STEP) as ranges:
            fetch_file(backend, "ck/weights.bin", entry, dest, ranges=ranges)
        times[concurrency] = time.monotonic() - t0
        assert dest.read_bytes() == data
        assert sorted(_ranges_asked(proxy)) == list(range(0, SIZE, STEP))  # every range once, nothing else
        assert _object_bytes(proxy) == SIZE
        assert not part_path(dest).exists() and not sidecar_path(dest).exists()
    assert times[1] >= 3 * times[8], times


def test_a_pull_of_16_ranges_at_once_keeps_its_connections(shaped, tmp_path, monkeypatch, caplog):
    """Every store client's HTTP pool is sized for the pull's concurrency: a range's connection is kept for the next
    range, never closed because the pool is full (requests and botocore keep 10 by default; a cloud would pay a TLS
    handshake for every range past them, and urllib3 logs a warning for each)."""
    kind, url, proxy, data, entry, open_proxied, *_ = shaped
    monkeypatch.setenv("CLOUDCKPT_CONCURRENCY", "16")
    backend = open_proxied()  # its pool is sized when the client is made
    proxy.shape(latency=0.05)  # the 16 ranges in flight overlap
    dest = tmp_path / "weights.bin"
    proxy.reset_stats()
    with caplog.at_level(logging.WARNING, logger="urllib3"), RangePool(16, SIZE // 64) as ranges:
        fetch_file(backend, "ck/weights.bin", entry, dest, ranges=ranges)
    assert dest.read_bytes() == data
    assert len(_ranges_asked(proxy)) == 64
    assert not [r for r in caplog.records if "pool is full" in r.getMessage()]
    if kind != "s3":  # moto's server speaks HTTP/1.0: it closes every connection after its answer
        assert proxy.stats.connections <= 16 + 2, f"{proxy.stats.connections} connections opened for 64 ranges"


CHILD = textwrap.dedent("""
    import json, os, sys
    from pathlib import Path
    from cloudckpt.backends import open_backend
    from cloudckpt.entry import FileEntry
    from cloudckpt.fetch import RangePool, fetch_file
    url, options, entry, dest = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]), Path(sys.argv[4])
    backend = open_backend(url, options)
    with RangePool(2, 2**20) as ranges:
        fetch_file(backend, "ck/weights.bin", FileEntry(**entry), dest, ranges=ranges)
    print("finished")
""")


def _kill_midway(url, options, env, entry, dest) -> None:
    """Run a pull in a process of its own and SIGKILL it once its sidecar lists 3 finished ranges."""
    child_env = {**os.environ, **env, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", CHILD, url, json.dumps(options), entry.model_dump_json(),
                             str(dest)], env=child_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if len(json.loads(sidecar_path(dest).read_text())["ranges"]) >= 3:
                    break
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.02)
        assert proc.poll() is None, proc.communicate()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def test_interrupted_pull_resumes_from_its_ranges(shaped, tmp_path):
    kind, url, proxy, data, entry, open_proxied, options, env = shaped
    proxy.shape(rate=1e6)  # 2 connections at 1 MB/s: the 8 MiB pull takes ~4 s, killed after 3 ranges
    dest = tmp_path / "out" / "weights.bin"
    dest.parent.mkdir()
    _kill_midway(url, options, env, entry, dest)
    assert not dest.exists()
    kept = {int(i) for i in json.loads(sidecar_path(dest).read_text())["ranges"]}
    assert 3 <= len(kept) < SIZE // STEP
    proxy.shape(rate=None)
    proxy.reset_stats()
    backend = open_proxied()
    with RangePool(4, STEP) as ranges:
        fetch_file(backend, "ck/weights.bin", entry, dest, ranges=ranges)
    assert dest.read_bytes() == data
    assert sorted(_ranges_asked(proxy)) == [i * STEP for i in range(SIZE // STEP) if i not in kept]
    assert _object_bytes(proxy) == SIZE - len(kept) * STEP  # only the missing part was fetched
    assert not part_path(dest).exists() and not sidecar_path(dest).exists()


def _partial(dest: Path, data: bytes, entry: FileEntry, ranges: dict[int, bytes]) -> None:
    """A partial pull as an earlier fetch leaves it: the ``.part`` file with some ranges written and the sidecar
    listing them with the crc32c of ``ranges[i]`` (what was written then)."""
    with open(part_path(dest), "wb") as f:
        f.truncate(len(data))
        for i, chunk in ranges.items():
            f.seek(i * STEP)
            f.write(chunk)
    sidecar_path(dest).write_text(json.dumps({
        "size": entry.size, "crc32c": entry.crc32c, "sha256": None, "range_size": STEP,
        "ranges": {str(i): f"{google_crc32c.value(c):08x}" for i, c in ranges.items()}}))


def test_damaged_partial_range_is_fetched_again(shaped, tmp_path):
    kind, url, proxy, data, entry, open_proxied, *_ = shaped
    dest = tmp_path / "weights.bin"
    _partial(dest, data, entry, {i: data[i * STEP:(i + 1) * STEP] for i in range(4)})
    with open(part_path(dest), "r+b") as f:  # a byte of range 2 changed on disk since it was listed
        f.seek(2 * STEP + 12345)
        f.write(bytes([data[2 * STEP + 12345] ^ 0xFF]))
    proxy.reset_stats()
    with RangePool(4, STEP) as ranges:
        fetch_file(open_proxied(), "ck/weights.bin", entry, dest, ranges=ranges)
    assert dest.read_bytes() == data
    assert sorted(_ranges_asked(proxy)) == [2 * STEP] + [i * STEP for i in range(4, SIZE // STEP)]


def test_partial_file_that_lies_is_never_published(shaped, tmp_path):
    """A sidecar that vouches for wrong bytes (its crc32c is of the wrong bytes): the whole-file check catches it,
    the partial file is dropped and the file fetched again from scratch."""
    kind, url, proxy, data, entry, open_proxied, *_ = shaped
    dest = tmp_path / "weights.bin"
    _partial(dest, data, entry, {0: data[:STEP], 1: os.urandom(STEP)})
    proxy.reset_stats()
    with RangePool(4, STEP) as ranges:
        fetch_file(open_proxied(), "ck/weights.bin", entry, dest, ranges=ranges)
    assert dest.read_bytes() == data
    assert _object_bytes(proxy) == SIZE - 2 * STEP + SIZE  # the rest, then all of it again


def test_object_that_differs_from_the_manifest_is_not_published(shaped, tmp_path):
    kind, url, proxy, data, entry, open_proxied, *_ = shaped
    dest = tmp_path / "weights.bin"
    wrong = entry.model_copy(update={"crc32c": f"{google_crc32c.value(data) ^ 1:08x}"})
    with RangePool(4, STEP) as ranges, pytest.raises(IntegrityError, match="checksum mismatch"):
        fetch_file(open_proxied(), "ck/weights.bin", wrong, dest, ranges=ranges)
    assert not dest.exists() and not part_path(dest).exists() and not sidecar_path(dest).exists()


@pytest.mark.parametrize("change", ["extended", "absurd size"])
def test_an_object_longer_or_shorter_than_its_entry_is_refused(shaped, tmp_path, change):
    """The index is input: an object someone extended after its commit (its first ``size`` bytes still match the
    checksums) is refused by the same GETs, as is an entry whose size (512 TiB) is far past the object's end. The
    latter costs a few GETs, not a 512 TiB sparse file or millions of queued ranges."""
    kind, url, proxy, data, entry, open_proxied, *_ = shaped
    if change == "extended":
        open_backend(url).write_bytes("ck/weights.bin", data + b"extra")
    else:
        entry = entry.model_copy(update={"size": 2**49})
    dest = tmp_path / "weights.bin"
    proxy.reset_stats()
    with RangePool(4, STEP) as ranges, pytest.raises(IntegrityError, match="longer|shorter"):
        fetch_file(open_proxied(), "ck/weights.bin", entry, dest, ranges=ranges)
    assert not dest.exists()
    assert len(proxy.stats.requests) <= 2 * 4 + SIZE // STEP


def test_reset_in_the_middle_of_a_range_is_retried(shaped, tmp_path, monkeypatch):
    kind, url, proxy, data, entry, open_proxied, *_ = shaped
    monkeypatch.setenv("CLOUDCKPT_RANGE_SIZE", str(STEP))
    cut = 3 * STEP
    proxy.add_fault(Fault(match=lambda r: bool(r.range) and r.range.startswith(f"bytes={cut}-"), after=100_000))
    proxy.reset_stats()
    with ThreadPoolExecutor(2) as pool:
        download_verified(open_proxied(), "ck", [entry], tmp_path, budget=120, pool=pool)
    assert (tmp_path / "weights.bin").read_bytes() == data
    cut_requests = [r for r in proxy.stats.requests if r.cut == "reset"]
    assert len(cut_requests) == 1 and cut_requests[0].body_bytes == 100_000
    # asked again: the whole range (S3, Azure: our retry) or from where it broke (google-cloud-storage resumes)
    again = [r for r in proxy.stats.requests if r.range and not r.cut and cut <= _start(r) < cut + STEP]
    assert len(again) == 1 and again[0].range.endswith(f"-{cut + STEP - 1}")
    others = sorted(a for a in _ranges_asked(proxy) if not cut <= a < cut + STEP)
    assert others == [a for a in range(0, SIZE, STEP) if a != cut]  # the other ranges once each
    assert SIZE <= _object_bytes(proxy) <= SIZE + 100_000


def test_a_generic_fsspec_store_is_pulled_in_ranges_too(tmp_path, monkeypatch):
    """Any fsspec store with ranged reads (here fsspec's in-memory filesystem) gets the same ranged, resumable pull."""
    data = os.urandom(3 * MiB + 777)
    src = tmp_path / "source.bin"
    src.write_bytes(data)
    backend = open_backend(f"memory://ranges-{os.getpid()}-{time.monotonic_ns()}/run")
    with Source(src) as s:
        backend.upload(s, "ck/weights.bin")
        entry = FileEntry(path="weights.bin", size=s.size, crc32c=s.crc32c())
    asked = []
    real = backend.read_range
    monkeypatch.setattr(backend, "read_range", lambda rel, start, length, **kw: (asked.append((start, length)),
                                                                                  real(rel, start, length, **kw))[1])
    dest = tmp_path / "out" / "weights.bin"
    dest.parent.mkdir()
    _partial(dest, data, entry, {0: data[:STEP], 2: data[2 * STEP:3 * STEP]})
    with RangePool(2, STEP) as ranges:
        fetch_file(backend, "ck/weights.bin", entry, dest, ranges=ranges)
    assert dest.read_bytes() == data
    assert sorted(asked) == [(STEP, STEP), (3 * STEP, 777)]  # only the ranges the partial file lacked


def test_a_stalled_range_is_abandoned_and_fetched_again(shaped, tmp_path, monkeypatch):
    """The answer to one range stops mid-way for longer than the read timeout: that range is asked again, the file
    completes and verifies."""
    kind, url, proxy, data, entry, open_proxied, options, env = shaped
    monkeypatch.setenv("CLOUDCKPT_RANGE_SIZE", str(STEP))
    cut = 5 * STEP
    fault = proxy.add_fault(Fault(match=lambda r: bool(r.range) and r.range.startswith(f"bytes={cut}-"),
                                  after=100_000, action="stall", seconds=4.0))
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        backend = open_backend(url, {**options, "read_timeout": 1})
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    with ThreadPoolExecutor(2) as pool:
        download_verified(backend, "ck", [entry], tmp_path / "out", budget=60, pool=pool)
    assert (tmp_path / "out" / "weights.bin").read_bytes() == data
    assert fault.fired == 1
    again = [r for r in proxy.stats.requests if r.range and cut <= _start(r) < cut + STEP]
    assert len(again) >= 2  # the stalled one, and at least one more for the same bytes


def test_a_range_runs_in_its_pulls_cancel_context():
    """A range is fetched on the range pool's thread in the context of the pull that asked for it: an interrupted
    pull's token stops its ranges too (they used to run without it and kept downloading after Ctrl-C)."""
    token = cancel.Token()
    token.cancel()
    with RangePool(concurrency=1) as pool:
        fut = cancel.bind(token).run(pool.submit, cancel.check)
        with pytest.raises(cancel.TransferCancelled):
            fut.result(timeout=30)
        assert pool.submit(cancel.check).result(timeout=30) is None  # another pull's ranges are not affected


def test_an_interrupted_range_pool_does_not_wait_for_ranges_in_flight():
    """Left by an interruption, the pool returns at once; a range in flight ends on its own."""
    started, release = threading.Event(), threading.Event()

    def in_flight() -> None:
        started.set()
        release.wait(30)

    pool = RangePool(concurrency=1)
    fut = pool.submit(in_flight)
    assert started.wait(30)
    with pytest.raises(KeyboardInterrupt):
        with pool:
            raise KeyboardInterrupt
    assert not fut.done()  # the pool did not wait for it
    release.set()
    fut.result(timeout=30)


@pytest.mark.parametrize("name,value", [("CLOUDCKPT_CONCURRENCY", "0"), ("CLOUDCKPT_CONCURRENCY", "many"),
                                        ("CLOUDCKPT_RANGE_SIZE", "1024")])
def test_a_bad_pull_setting_in_the_environment_is_a_configuration_error(monkeypatch, name, value):
    from cloudckpt.errors import ConfigurationError

    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigurationError, match=f"\\${name} must be an integer"):
        RangePool()


def test_the_connection_pool_follows_the_pulls_concurrency(monkeypatch):
    from cloudckpt.concurrency import http_pool_size

    monkeypatch.setenv("CLOUDCKPT_CONCURRENCY", "40")
    assert http_pool_size(8) == 42
    monkeypatch.setenv("CLOUDCKPT_CONCURRENCY", "2")
    assert http_pool_size(8) == 10 and http_pool_size(20) == 22


def test_a_range_is_written_whole_through_short_writes(tmp_path, monkeypatch):
    # pwrite may write less than asked (a signal, a full disk on some filesystems); the crc32c recorded for a range is
    # of the bytes it was given, so every one of them must be on disk or the file is published with a hole
    import cloudckpt.fetch as fetch

    real, calls = os.pwrite, []

    def short(fd, data, offset):
        calls.append(len(data))
        return real(fd, bytes(data)[:1000], offset)

    monkeypatch.setattr(fetch.os, "pwrite", short)
    data = os.urandom(3 * fetch.WRITE_SLICE + 17)
    path = tmp_path / "part"
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        fetch.write_at(fd, data, 5)
    finally:
        os.close(fd)
    assert path.read_bytes() == b"\0" * 5 + data
    assert max(calls) <= fetch.WRITE_SLICE  # in slices: one 4 MiB write cost ~4x the kernel time here
