"""Errors are owned where they arise: each backend translates its client's errors at its boundary, ``retry.run``
turns what is left into one TransferError, so a caller of the public API sees only cloudckpt errors, whichever
store path failed. Real servers: moto and fake-gcs-server behind the fault proxy, which fails only the requests of
the path under test. Also: every store refuses unknown storage options, and opening a GCS store leaves
``os.environ`` as it was."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from reliability.faultproxy import FaultProxy

from cloudckpt import CheckpointStore
from cloudckpt.backends import open_backend
from cloudckpt.errors import CloudCkptError, ConfigurationError, TransferError

FAST_S3 = {"config_kwargs": {"retries": {"mode": "standard", "max_attempts": 1}}}  # our retries only: fast


def _ckpt(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "w.bin").write_bytes(os.urandom(2000))
    return root


def _orphan(store: CheckpointStore) -> None:
    store.backend.write_bytes("ckpt-e000009-deadbeef/w.bin", b"left by a crashed push")


# (path under test, which requests fail, the call that takes that path)
S3_PATHS = {
    "index read": (lambda m, t: m == "GET" and "index.json" in t, lambda s, src: s.list()),
    "write probe": (lambda m, t: m == "PUT" and "_cloudckpt_probe" in t, lambda s, src: s.push(src)),
    "manifest write": (lambda m, t: m == "PUT" and "manifest.json" in t, lambda s, src: s.push(src)),
    "manifest read": (lambda m, t: m == "GET" and "manifest.json" in t, lambda s, src: s.verify("latest")),
    "listing": (lambda m, t: m == "GET" and "list-type=2" in t, lambda s, src: s.gc(min_age=0)),
    "delete": (lambda m, t: m == "POST" and "delete" in t, lambda s, src: s.gc(min_age=0)),
}


@pytest.mark.parametrize("path", S3_PATHS)
def test_s3_failures_reach_the_caller_as_transfer_errors(path, s3_server, s3_url, tmp_path):
    failing, call = S3_PATHS[path]
    with FaultProxy(s3_server.endpoint, fault_filter=failing) as proxy:
        with CheckpointStore(s3_url, budget=1, endpoint_url=proxy.endpoint, **FAST_S3) as store:
            if path != "write probe":
                store.push(_ckpt(tmp_path / "c"), epoch=0)
                _orphan(store)
            proxy.set_rates({"500": 1.0})
            with pytest.raises(CloudCkptError) as info:
                call(store, _ckpt(tmp_path / "c"))
        assert isinstance(info.value, TransferError), repr(info.value)
        assert "InternalError" in str(info.value) and s3_url in str(info.value)
        assert proxy.faults["500"] >= 2, "a 500 is transient: retried before it is given up"


def test_s3_connection_resets_reach_the_caller_as_transfer_errors(s3_server, s3_url):
    with FaultProxy(s3_server.endpoint, rates={"reset": 1.0}) as proxy:
        with CheckpointStore(s3_url, budget=1, endpoint_url=proxy.endpoint, **FAST_S3) as store:
            with pytest.raises(TransferError):
                store.list()
        assert proxy.faults["reset"] >= 2


def _bad_request(failing):
    """An ``on_response`` that answers the failing requests with 400 Bad Request (JSON, as GCS words it)."""

    def rewrite(method: str, target: str, head: bytes, body: bytes) -> tuple[bytes, bytes]:
        if not failing(method, target):
            return head, body
        body = b'{"error": {"code": 400, "message": "Bad Request", "errors": [{"reason": "invalid"}]}}'
        return (b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n" % len(body)), body

    return rewrite


GCS_PATHS = {
    "index read": (lambda m, t: m == "GET" and "index.json" in t, lambda s: s.list()),
    "manifest read": (lambda m, t: m == "GET" and "manifest.json" in t, lambda s: s.verify("latest")),
    "listing": (lambda m, t: m == "GET" and "prefix=" in t, lambda s: s.gc(min_age=0)),
}


@pytest.mark.parametrize("path", GCS_PATHS)
def test_gcs_refusals_reach_the_caller_as_transfer_errors(path, gcs_server, gcs_url, tmp_path, monkeypatch):
    failing, call = GCS_PATHS[path]
    proxy = FaultProxy(gcs_server.endpoint)
    with proxy:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.endpoint)
        with CheckpointStore(gcs_url, budget=1) as store:
            store.push(_ckpt(tmp_path / "c"), epoch=0)
            proxy.on_response = _bad_request(failing)
            with pytest.raises(CloudCkptError) as info:
                call(store)
    assert isinstance(info.value, TransferError), repr(info.value)
    assert "BadRequest" in str(info.value) and gcs_url in str(info.value)


def test_every_store_refuses_unknown_storage_options(local_url, tmp_path):
    with pytest.raises(ConfigurationError, match="fsnyc"):
        CheckpointStore(local_url, fsnyc=False)
    with CheckpointStore(local_url, fsync=False) as store:  # a known one still works
        store.push(_ckpt(tmp_path / "c"))


@pytest.mark.parametrize("transport", ["sdk", "fsspec"])
def test_opening_a_gcs_store_leaves_the_environment_alone(transport, gcs_url, tmp_path, monkeypatch):
    monkeypatch.delenv("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", raising=False)
    before = dict(os.environ)
    backend = open_backend(gcs_url, {"transport": transport})
    assert dict(os.environ) == before
    with CheckpointStore(gcs_url, transport=transport, budget=30) as store:  # still works against the emulator
        entry = store.push(_ckpt(tmp_path / "c"))
        assert [c.id for c in store.list()] == [entry.id]
    assert [o.rel for o in backend.list_objects() if o.rel.endswith("w.bin")] == [f"{entry.id}/w.bin"]
    assert dict(os.environ) == before
