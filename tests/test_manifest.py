"""Index and manifest schema: what parses, what is refused, selection, and speed-independent scale."""

from __future__ import annotations

import json

import pytest

from cloudckpt.errors import CheckpointNotFoundError, IntegrityError, UnsafePathError
from cloudckpt.manifest import CheckpointEntry, FileEntry, Index, check_relative_path, dump, parse_index, utcnow


def entry(cid: str, epoch: int, loss: float | None = None, paths=("w.bin",)) -> CheckpointEntry:
    files = tuple(FileEntry(path=p, size=3, crc32c="0badf00d") for p in paths)
    return CheckpointEntry(id=cid, epoch=epoch, created=utcnow(), metrics={} if loss is None else {"loss": loss},
                           files=files, size=3 * len(files))


@pytest.mark.parametrize("path", ["../x", "/etc/passwd", "a/../../b", "a//b", "./a", "a\\b", "C:/x", "a/\x00b", "",
                                  "_cloudckpt_manifest.json", ".cloudckpt.json", ".cloudckpt-tmp-x",
                                  "a/.cloudckpt-tmp-x"])
def test_unsafe_paths_are_refused(path):
    with pytest.raises(UnsafePathError):
        check_relative_path(path)


def test_roundtrip_and_best_latest_follow_updates():
    from cloudckpt.manifest import RunPolicy

    idx = Index().with_policy(RunPolicy(monitor="loss", mode="min"))
    for i, loss in enumerate([0.5, 0.2, 0.9]):
        idx = idx.with_checkpoint(entry(f"ckpt-{i:08x}", i, loss))
    again = parse_index(dump(idx))
    assert again == idx
    assert again.best == "ckpt-00000001" and again.latest == "ckpt-00000002"
    smaller = again.without({"ckpt-00000001", "ckpt-00000002"})
    assert smaller.best == "ckpt-00000000" and smaller.latest == "ckpt-00000000"
    assert smaller.seq == again.seq + 1
    assert again.resolve("1").id == "ckpt-00000001" and again.resolve("latest").id == "ckpt-00000002"
    with pytest.raises(CheckpointNotFoundError):
        again.resolve("7")


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.update(schema_version=4), "schema_version 4"),
    (lambda d: d.update(latest="ckpt-nothere"), "latest"),
    (lambda d: d["checkpoints"].append(dict(d["checkpoints"][0])), "twice"),
    (lambda d: d["checkpoints"][0].update(size=10**18), "size"),
    (lambda d: d["checkpoints"][0]["files"][0].update(size=-1), "size"),
    (lambda d: d["checkpoints"][0]["files"][0].update(crc32c="xyz"), "crc32c"),
    (lambda d: d["checkpoints"][0].update(epoch="3"), "epoch"),
    (lambda d: d["checkpoints"][0].update(files=[]), "no files"),
    (lambda d: d["checkpoints"][0]["files"].append({"path": "w.bin/x", "size": 0, "crc32c": "00000000"}),
     "also a directory"),
    (lambda d: d.update(extra_field=1), "extra"),
])
def test_malformed_indexes_are_integrity_errors(mutate, message):
    doc = json.loads(dump(Index().with_checkpoint(entry("ckpt-0000000a", 1))))
    mutate(doc)
    with pytest.raises(IntegrityError, match=message):
        parse_index(json.dumps(doc).encode())


@pytest.mark.parametrize("data", [b"", b"{", b"[]", b"null", b'{"checkpoints": 5}', b"\xff\xfe", b"[" * 100000])
def test_garbage_bytes_are_integrity_errors(data):
    with pytest.raises(IntegrityError):
        parse_index(data)
