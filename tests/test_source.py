"""Source: one read feeds the hash and the upload; a change to the file while it is read is detected by its bytes,
not refused for metadata that moves without them (a hard link added or removed moves only the ctime)."""

from __future__ import annotations

import os

import google_crc32c
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cloudckpt import source
from cloudckpt.errors import SourceChangedError
from cloudckpt.source import MemorySource, Source


@pytest.fixture
def not_racy(monkeypatch):
    """Treat every file as written long before its read, so only the ctime path can re-read it."""
    monkeypatch.setattr(source, "RACY_SECONDS", 0.0)


def _read_all(src: Source) -> bytes:
    return b"".join(src.blocks(4096))


def test_a_link_added_and_removed_during_the_read_is_not_a_change(tmp_path, not_racy):
    path = tmp_path / "model.weights.h5"
    path.write_bytes(os.urandom(50_000))
    with Source(path) as src:
        data = _read_all(src)
        before = os.stat(path).st_ctime_ns
        os.link(path, tmp_path / "staged")  # what staging, and a new version renamed over the name, do to the inode
        os.unlink(tmp_path / "staged")
        assert os.stat(path).st_ctime_ns != before, "this file system did not move the ctime"
        src.check_unchanged()
        assert src.crc32c() == google_crc32c.Checksum(data).digest().hex()


def test_bytes_changed_behind_a_restored_mtime_are_still_a_change(tmp_path, not_racy):
    path = tmp_path / "model.weights.h5"
    path.write_bytes(os.urandom(50_000))
    with Source(path) as src:
        _read_all(src)
        st = os.stat(path)
        with open(path, "r+b") as f:  # same size, one byte flipped, the mtime put back: only the ctime tells
            f.seek(1000)
            byte = f.read(1)
            f.seek(1000)
            f.write(bytes([byte[0] ^ 0xFF]))
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert os.stat(path).st_mtime_ns == st.st_mtime_ns
        with pytest.raises(SourceChangedError, match="bytes changed"):
            src.check_unchanged()


def test_a_size_change_during_the_read_is_a_change(tmp_path, not_racy):
    path = tmp_path / "w.bin"
    path.write_bytes(b"x" * 10_000)
    with Source(path) as src:
        _read_all(src)
        with open(path, "ab") as f:
            f.write(b"more")
        with pytest.raises(SourceChangedError, match="size or modification time"):
            src.check_unchanged()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(chunks=st.lists(st.binary(max_size=300), max_size=8),
       moves=st.lists(st.tuples(st.sampled_from(["read", "seek"]), st.integers(-1, 700)), max_size=25))
def test_a_memory_source_reads_hashes_and_counts_like_a_file_of_its_bytes(tmp_path, chunks, moves):
    """Any reads and seeks (clients retrying a part seek back): MemorySource gives the bytes, the progress and, once
    read to the end, the crc32c that a Source over a file of the same bytes gives."""
    data = b"".join(chunks)
    path = tmp_path / "same.bin"
    path.write_bytes(data)
    moved: dict[str, list[int]] = {"file": [], "memory": []}
    with Source(path, sha256=True, progress=moved["file"].append) as f, \
            MemorySource(chunks, "mem", sha256=True, progress=moved["memory"].append) as m:
        assert m.size == f.size == len(data)
        for op, n in moves:
            if op == "read":
                assert m.read(n) == f.read(n)
            else:
                assert m.seek(max(n, 0)) == f.seek(max(n, 0))
            assert m.tell() == f.tell()
        m.seek(0)
        f.seek(0)
        assert _read_all(m) == _read_all(f) == data
        assert m.crc32c() == f.crc32c() == google_crc32c.Checksum(data).digest().hex()
        assert m.sha256() == f.sha256()
        assert m.changed() is None
    assert moved["memory"] == moved["file"]
    assert m.closed
