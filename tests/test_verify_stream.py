"""verify and verify_readback stream the stored bytes through the hash: no copy in the temp directory (a RAM-backed
/tmp can't fill up), and a corrupted object is still found."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from cloudckpt import CheckpointStore


def test_verify_and_readback_create_no_temp_files(store_url, tmp_path):
    src = tmp_path / "ckpt"
    (src / "opt").mkdir(parents=True)
    (src / "model.weights.h5").write_bytes(os.urandom(3 * 2**20 + 7))
    (src / "opt" / "state.bin").write_bytes(os.urandom(1000))
    with CheckpointStore(store_url, workers=2, verify_readback=True) as store:
        with pytest.MonkeyPatch.context() as mp:
            for name in ("mkdtemp", "mkstemp", "TemporaryDirectory", "NamedTemporaryFile", "TemporaryFile"):
                mp.setattr(tempfile, name, _refuse)
            entry = store.push(src, epoch=1, sha256=True)  # verify_readback: every upload read back
            (result,) = store.verify("latest")
        assert result.ok, result.error
        assert result.id == entry.id


def _refuse(*args, **kwargs):
    raise AssertionError("a temporary file was created")


def test_streamed_verify_finds_a_corrupted_and_a_truncated_object(local_url, tmp_path):
    src = tmp_path / "ckpt"
    src.mkdir()
    (src / "a.bin").write_bytes(os.urandom(300_000))
    (src / "b.bin").write_bytes(os.urandom(300_000))
    with CheckpointStore(local_url) as store:
        first = store.push(src, epoch=1, sha256=True)
        second = store.push(src, epoch=2)
        stored = Path(local_url) / first.id / "a.bin"
        data = bytearray(stored.read_bytes())
        data[123_456] ^= 1
        stored.write_bytes(bytes(data))
        (Path(local_url) / second.id / "b.bin").write_bytes(os.urandom(1000))
        results = {r.id: r for r in store.verify(all=True)}
    assert not results[first.id].ok and "checksum mismatch" in results[first.id].error
    assert not results[second.id].ok and "1000 bytes, the index says 300000" in results[second.id].error
