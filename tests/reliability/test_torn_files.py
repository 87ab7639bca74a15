"""A file rewritten in place while it is pushed (same size, new bytes, as a trainer saving over it does) is never
committed torn: every push either fails with a typed error or commits a checkpoint that verifies and whose bytes
are one whole version of the file.

The deterministic cases rewrite the file at a fixed point of the upload: the fault proxy in front of the server
calls a hook when the first request carrying the file's bytes arrives (S3: part 1 of a multipart upload with one
part in flight; GCS: the first resumable chunk), before forwarding it, so the rest of the file is read after the
rewrite. The randomized cases rewrite at a random moment of the push, many rounds, on every store and transport.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from pathlib import Path

import pytest

from cloudckpt import CheckpointStore
from cloudckpt.errors import CloudCkptError

from .faultproxy import FaultProxy

MiB = 2**20


def _rewrite(path: Path, data: bytes) -> None:
    """Save over the file in place, in 1 MiB writes, as a framework's writer does."""
    with open(path, "r+b") as f:
        for i in range(0, len(data), MiB):
            f.write(data[i:i + MiB])


def _check_outcome(store: CheckpointStore, push, versions: tuple[bytes, ...], out: Path) -> str:
    """Run ``push``; return "refused" (a typed error) or which version was committed, after checking that the
    committed checkpoint verifies and holds exactly that version."""
    try:
        entry = push()
    except CloudCkptError as exc:
        assert "changed" in str(exc) or exc.__cause__ is not None, f"unclear error: {exc!r}"
        return "refused"
    reports = store.verify(entry.id)
    assert all(r.ok for r in reports), f"a listed checkpoint fails verify: {reports}"
    pulled = store.pull(entry.id, to=out)
    data = next(p for p in pulled.path.rglob("*") if p.is_file()).read_bytes()
    assert data in versions, "the committed bytes are not one version of the file (torn)"
    return f"v{versions.index(data)}"


class _RewriteOnce:
    """A proxy hook: the first request that ``matches`` rewrites ``path`` to ``data`` before it is forwarded."""

    def __init__(self, path: Path, data: bytes, matches) -> None:
        self.path, self.data, self.matches = path, data, matches
        self.fired = threading.Event()
        self._lock = threading.Lock()

    def __call__(self, method: str, target: str) -> None:
        with self._lock:
            if not self.fired.is_set() and self.matches(method, target):
                _rewrite(self.path, self.data)
                self.fired.set()


def _s3_part(method: str, target: str) -> bool:
    return method == "PUT" and "partNumber=" in target


def _gcs_chunk(method: str, target: str) -> bool:
    return method == "PUT" and "upload_id=" in target


@pytest.mark.parametrize("kind", ["s3", "gcs"])
def test_a_file_rewritten_mid_upload_is_never_committed_torn(kind, request, tmp_path, monkeypatch, figures):
    server = request.getfixturevalue(f"{kind}_server")
    url = request.getfixturevalue(f"{kind}_url")
    rnd = random.Random(7)
    a, b = rnd.randbytes(24 * MiB), rnd.randbytes(24 * MiB)
    src = tmp_path / "model.bin"
    src.write_bytes(a)
    hook = _RewriteOnce(src, b, _s3_part if kind == "s3" else _gcs_chunk)
    # one part / chunk in flight, so the bytes after the first request are read after the rewrite
    options = {"part_size": 5 * MiB, "max_concurrency": 1} if kind == "s3" else {"chunk_size": 4 * MiB}
    with FaultProxy(server.endpoint, on_request=hook) as proxy:
        if kind == "s3":
            monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
            monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy.endpoint)
        else:
            monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.endpoint)
        with CheckpointStore(url, **options) as store:
            outcome = _check_outcome(store, lambda: store.push(src, epoch=1), (a, b), tmp_path / "out")
    assert hook.fired.is_set(), "the rewrite never happened: the test proved nothing"
    figures["torn_file_pushes"][f"{kind}-mid-upload/{outcome}"] += 1
    assert outcome in ("v1", "refused")  # retried from a fresh read (v1), or a typed error; never torn


def _rounds(url: str, tmp_path: Path, n: int, options: dict, figures, label: str, caplog) -> list[str]:
    """``n`` pushes each racing an in-place rewrite; what each committed (v0, v1) or that it was refused."""
    rnd = random.Random(label)
    src = tmp_path / "model.bin"
    size = 12 * MiB
    with CheckpointStore(url, **options) as store:
        src.write_bytes(rnd.randbytes(size))
        t0 = time.monotonic()
        store.push(src, epoch=0)  # warm-up: how long a push takes here, to aim the rewrites inside it
        span = time.monotonic() - t0
        outcomes = []
        for i in range(n):
            a, b = rnd.randbytes(size), rnd.randbytes(size)
            src.write_bytes(a)
            rewriter = threading.Timer(rnd.uniform(0, 1.2 * span), _rewrite, (src, b))
            rewriter.start()
            caplog.clear()
            try:
                got = _check_outcome(store, lambda: store.push(src, epoch=i + 1), (a, b), tmp_path / f"out{i}")
            finally:
                rewriter.join()
            outcomes.append(got)
            figures["torn_file_pushes"][f"{label}/{got}"] += 1  # v0: before the rewrite, v1: after, or refused
            if any("changed while it was pushed" in r.getMessage() for r in caplog.records):
                figures["torn_file_pushes"][f"{label}/read-again-after-a-change"] += 1
        assert all(r.ok for r in store.verify(all=True)), "a listed checkpoint fails verify"
    return outcomes


@pytest.mark.parametrize("kind,options", [
    ("local", {}),
    ("s3", {"part_size": 5 * MiB}),
    ("gcs", {"chunk_size": 4 * MiB}),
    ("s3", {"transport": "fsspec"}),
    ("gcs", {"transport": "fsspec"}),
    ("az", {"block_size": 4 * MiB}),
], ids=["local", "s3", "gcs", "s3-fsspec", "gcs-fsspec", "az"])
def test_random_in_place_rewrites_during_push_never_commit_a_torn_file(kind, options, request, tmp_path, full,
                                                                       figures, caplog):
    url = request.getfixturevalue(f"{kind}_url")
    n = (40 if full else 8) if "transport" not in options and kind != "az" else (20 if full else 4)
    caplog.set_level(logging.WARNING, logger="cloudckpt.retry")
    got = _rounds(url, tmp_path, n, options, figures, f"{kind}{'-fsspec' if 'transport' in options else ''}", caplog)
    assert len(got) == n and set(got) <= {"v0", "v1", "refused"}, got  # each push: one whole version, or refused
