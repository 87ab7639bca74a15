"""Byte progress: push, pull and verify advance the bar as bytes stream (several times for a one-file checkpoint,
summing to its size, on every store), verify gets a bar, and the CLI draws one on a terminal (a pseudo-terminal)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios
import threading

import pytest

from cloudckpt import CheckpointStore
from cloudckpt import store as store_module
from cloudckpt.backends import local as local_backend

SIZE = 9 * 2**20 + 12345  # one file, above GCS's 8 MiB single-request limit: several blocks on every store


@pytest.fixture
def bars(monkeypatch):
    """Record every progress bar the store opens: its description, total and the advances it got."""
    seen: list[dict] = []
    lock = threading.Lock()

    @contextlib.contextmanager
    def recording(total, desc, enabled=None):
        bar = {"desc": desc, "total": total, "steps": []}
        seen.append(bar)

        def advance(n):
            with lock:
                bar["steps"].append(n)

        yield advance

    monkeypatch.setattr(store_module, "byte_progress", recording)
    monkeypatch.setattr(local_backend, "BLOCK", 256 * 1024)  # the local copy's block: small, like the clouds' chunks
    # a ranged pull advances once per range as it lands (cloudckpt/fetch.py): 1 MiB ranges, not 8, for this ~9 MiB file
    monkeypatch.setenv("CLOUDCKPT_RANGE_SIZE", str(2**20))
    return seen


def test_push_pull_and_verify_advance_by_bytes_while_streaming(store_url, bars, tmp_path):
    src = tmp_path / "model.weights.h5"
    src.write_bytes(os.urandom(SIZE))
    opts = {"chunk_size": 256 * 1024} if store_url.startswith("gs://") else {}  # GCS: resumable, 256 KiB chunks
    with CheckpointStore(store_url, workers=2, **opts) as store:
        entry = store.push(src, epoch=1)
        store.pull("latest", to=tmp_path / "out")
        (result,) = store.verify("latest")
    assert result.ok
    assert [b["desc"].split()[0] for b in bars] == ["push", "pull", "verify"]
    for bar in bars:
        assert bar["total"] == entry.size == SIZE
        assert sum(bar["steps"]) == SIZE, bar["desc"]
        positive = [n for n in bar["steps"] if n > 0]
        assert len(positive) >= 3, f"{bar['desc']}: {len(positive)} advances for a one-file checkpoint"
        assert max(positive) < SIZE


def test_cli_draws_byte_bars_on_a_terminal(local_url, tmp_path):
    src = tmp_path / "model.weights.h5"
    src.write_bytes(os.urandom(SIZE))
    out = {}
    for args in (["push", str(src), "--remote", local_url], ["verify", "--remote", local_url]):
        main, child = pty.openpty()
        fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a 120-column terminal
        env = dict(os.environ)
        proc = subprocess.Popen([sys.executable, "-m", "cloudckpt", *args], stdout=subprocess.PIPE, stderr=child,
                                env=env)
        os.close(child)
        chunks = []
        while True:
            try:
                data = os.read(main, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        proc.wait(timeout=120)
        os.close(main)
        assert proc.returncode == 0
        out[args[0]] = b"".join(chunks).decode(errors="replace")
    assert "push ckpt-" in out["push"], out["push"]
    assert "verify ckpt-" in out["verify"], out["verify"]
