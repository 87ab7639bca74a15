"""A server that stops answering mid-request ends a push or pull with TransferError once its budget is spent (every
backend sets connect/read timeouts); a GCS restore hashes the bytes itself when the server sends no hash header;
a test emulator that hangs is detected and restarted.

The fault proxy in front of moto / fake-gcs-server stalls chosen requests (it holds them far longer than the test
may take), strips the ``x-goog-hash`` header of downloads, or flips a byte of a download's body.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
import urllib.error
import urllib.request

import pytest
from reliability.faultproxy import FaultProxy
from support import servers

from cloudckpt import CheckpointStore
from cloudckpt.errors import IntegrityError, TransferError

MiB = 2**20
BUDGET = 6.0
TIMEOUTS = {"connect_timeout": 1, "read_timeout": 2}
# one attempt may still be running when the budget ends: botocore's 3 tries of one request (S3), or one request
# (GCS), each bounded by the timeouts above; plus the time to delete the partial upload and a margin for a busy CI
SLACK = 3 * (TIMEOUTS["connect_timeout"] + TIMEOUTS["read_timeout"]) + 10


class _LinksThroughProxy:
    """A response hook: fake-gcs-server names itself in the links it returns (``mediaLink``, resumable session
    URLs), which would send downloads past the proxy; point them at the proxy. ``then`` may rewrite further."""

    def __init__(self, upstream: str, then=None) -> None:
        self.upstream, self.then, self.proxy = upstream.encode(), then, None

    def __call__(self, method: str, target: str, head: bytes, body: bytes) -> tuple[bytes, bytes]:
        mine = self.proxy.endpoint.encode()
        head = head.replace(self.upstream, mine)
        if self.upstream in body:
            body = body.replace(self.upstream, mine)
            head = re.sub(rb"(?im)^content-length:[^\r\n]*", b"Content-Length: %d" % len(body), head)
        return self.then(method, target, head, body) if self.then else (head, body)


def _gcs_proxy(server, **kwargs) -> FaultProxy:
    links = _LinksThroughProxy(server.endpoint, kwargs.pop("on_response", None))
    proxy = FaultProxy(server.endpoint, on_response=links, **kwargs)
    links.proxy = proxy
    return proxy


@pytest.fixture
def proxied(request, monkeypatch):
    """``(url, proxy)`` for a fresh run on S3 or GCS with every request going through a fault proxy."""
    kind = request.param
    server = request.getfixturevalue(f"{kind}_server")
    url = request.getfixturevalue(f"{kind}_url")
    make = FaultProxy if kind == "s3" else _gcs_proxy
    with make(server.endpoint if kind == "s3" else server, stall=600.0) as proxy:
        if kind == "s3":
            monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
            monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy.endpoint)
        else:
            monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.endpoint)
        yield kind, url, proxy


def _ends_within(fn, limit: float) -> tuple[BaseException | None, float]:
    """Run ``fn`` in a thread; return its exception and how long it took; fail if it is still running at ``limit``."""
    out: dict = {}

    def run() -> None:
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            out["exc"] = exc

    t0 = time.monotonic()
    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(limit)
    elapsed = time.monotonic() - t0
    assert not worker.is_alive(), f"still waiting on a silent server after {elapsed:.0f}s (budget {BUDGET}s)"
    return out.get("exc"), elapsed


def _data_upload(kind: str):
    if kind == "s3":
        return lambda method, target: method == "PUT" and "model.bin" in target
    return lambda method, target: method == "POST" and "uploadType=resumable" in target  # the session initiation


def _data_download(kind: str):
    if kind == "s3":
        return lambda method, target: method == "GET" and "model.bin" in target
    return lambda method, target: method == "GET" and "alt=media" in target and "model.bin" in target


@pytest.mark.parametrize("proxied", ["s3", "gcs"], indirect=True)
def test_a_push_to_a_server_that_stops_answering_ends_within_its_budget(proxied, tmp_path):
    kind, url, proxy = proxied
    src = tmp_path / "model.bin"
    src.write_bytes(os.urandom(10 * MiB))  # multipart on S3, resumable on GCS (over 8 MiB)
    options = {**TIMEOUTS, **({"part_size": 5 * MiB} if kind == "s3" else {"chunk_size": 4 * MiB})}
    proxy.fault_filter = _data_upload(kind)
    proxy.set_rates({"stall": 1.0})
    with CheckpointStore(url, budget=BUDGET, **options) as store:
        exc, elapsed = _ends_within(lambda: store.push(src, epoch=1), BUDGET + SLACK)
        proxy.set_rates({})  # the server answers again: the same store pushes (nothing of the failed push is held)
        entry = store.push(src, epoch=2)
        assert [c.id for c in store.list()] == [entry.id] and all(r.ok for r in store.verify(entry.id))
    assert isinstance(exc, TransferError), repr(exc)
    assert proxy.faults["stall"] >= 1
    assert elapsed >= BUDGET * 0.5  # it did retry for (most of) its budget, not give up at the first silence


@pytest.mark.parametrize("proxied", ["s3", "gcs"], indirect=True)
def test_a_pull_from_a_server_that_stops_answering_ends_within_its_budget(proxied, tmp_path):
    kind, url, proxy = proxied
    src = tmp_path / "model.bin"
    src.write_bytes(os.urandom(2 * MiB))
    with CheckpointStore(url, budget=BUDGET, **TIMEOUTS) as store:
        store.push(src, epoch=1)
        proxy.fault_filter = _data_download(kind)
        proxy.set_rates({"stall": 1.0})
        exc, elapsed = _ends_within(lambda: store.pull("latest", to=tmp_path / "out"), BUDGET + SLACK)
    assert isinstance(exc, TransferError), repr(exc)
    assert proxy.faults["stall"] >= 1
    assert not (tmp_path / "out").exists()


def _strip_hash_and_flip_a_byte(method: str, target: str, head: bytes, body: bytes) -> tuple[bytes, bytes]:
    if method != "GET" or "alt=media" not in target or "model.bin" not in target or len(body) < 2:
        return head, body
    head = re.sub(rb"(?im)^x-goog-hash:[^\r\n]*\r\n", b"", head)
    middle = len(body) // 2
    return head, body[:middle] + bytes([body[middle] ^ 0xFF]) + body[middle + 1:]


def test_a_gcs_pull_hashes_the_bytes_itself_when_the_server_sends_no_hash(gcs_server, gcs_url, tmp_path, monkeypatch):
    src = tmp_path / "model.bin"
    src.write_bytes(os.urandom(3 * MiB))
    with CheckpointStore(gcs_url) as store:
        store.push(src, epoch=1)
    with _gcs_proxy(gcs_server, on_response=_strip_hash_and_flip_a_byte) as proxy:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.endpoint)
        with CheckpointStore(gcs_url) as store:
            with pytest.raises(IntegrityError):
                store.pull("latest", to=tmp_path / "out")
            assert not (tmp_path / "out").exists()
            assert not any(r.ok for r in store.verify("latest"))


def _answers(server, timeout: float) -> bool:
    try:
        urllib.request.urlopen(server.endpoint + server.probe, timeout=timeout).close()
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False
    return True


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/status") as f:
        return next(line for line in f if line.startswith("State:")).split()[1]


def test_a_hung_emulator_is_detected_and_restarted():
    server = servers.start_fake_gcs()
    try:
        os.kill(server.proc.pid, signal.SIGSTOP)  # alive, port open, never answers
        deadline = time.monotonic() + 10
        while "T" not in _state(server.proc.pid) and time.monotonic() < deadline:  # the stop lands asynchronously
            time.sleep(0.01)
        assert not _answers(server, 1)
        t0 = time.monotonic()
        server.revive()
        assert server.restarts == 1 and _answers(server, 5)
        assert time.monotonic() - t0 < 30
    finally:
        server.stop()
