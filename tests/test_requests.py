"""Requests per checkpoint, counted at a real HTTP proxy in front of each store's server (moto, fake-gcs-server,
Azurite): a push writes one object per file too big to ride inline, plus the manifest and the index, and reads no
stored object back (no HEAD, no properties or block-list GET) when the upload's answer proves it. Small files ride
inside the manifest (``inline_small``): a pull and a verify materialize and check them like stored files, and an
inline content that differs from the index is refused with an IntegrityError."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from urllib.parse import unquote

import pytest
from reliability.faultproxy import FaultProxy
from support import servers
from support.shaping_proxy import ShapingProxy

from cloudckpt import CheckpointStore, IntegrityError
from cloudckpt.layout import manifest_key

KiB = 1024


def keras_shaped(root: Path) -> Path:
    """What the Keras callback pushes: the user's weights file and ``cloudckpt_state/`` (state.json, variables.npz)."""
    (root / "cloudckpt_state").mkdir(parents=True)
    (root / "model.weights.h5").write_bytes(os.urandom(1200 * KiB))  # Azure: 2 blocks of 1 MiB; one PUT elsewhere
    (root / "cloudckpt_state" / "state.json").write_bytes(b'{"format": 2, "epoch": 3}' * 40)
    (root / "cloudckpt_state" / "variables.npz").write_bytes(os.urandom(12 * KiB))
    return root


@pytest.fixture(params=["s3", "gcs", "az"])
def counted(request, monkeypatch):
    """``(url, requests seen)`` for a fresh run on one store whose every HTTP request passes a counting proxy."""
    kind = request.param
    server = request.getfixturevalue(f"{'azure' if kind == 'az' else kind}_server")
    url = request.getfixturevalue(f"{kind}_url")
    seen: list[tuple[str, str]] = []
    upstream = server.endpoint.rsplit("/", 1)[0] if kind == "az" else server.endpoint
    with FaultProxy(upstream, on_request=lambda method, target: seen.append((method, unquote(target)))) as proxy:
        if kind == "s3":
            monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
            monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy.endpoint)
        elif kind == "gcs":
            monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.endpoint)
        else:
            monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING",
                               servers.azure_connection_string(f"{proxy.endpoint}/{servers.AZURITE_ACCOUNT}"))
        yield url, seen


def _writes(seen: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(m, t) for m, t in seen if m in ("PUT", "POST")]


@pytest.mark.parametrize("shape", ["keras", "plain"])
def test_a_push_writes_one_object_per_stored_file_plus_two_and_reads_none_back(counted, shape, tmp_path):
    url, seen = counted
    with CheckpointStore(url, block_size=1024 * KiB) if url.startswith("az://") else CheckpointStore(url) as store:
        store.claim()  # a fenced writer, as the Keras callback is: its fence is checked on the index it reads anyway
        store.push(keras_shaped(tmp_path / "warm"), epoch=0, inline_small=True)  # the conditional-write probe: once
        seen.clear()
        src = keras_shaped(tmp_path / "c1") if shape == "keras" else tmp_path / "c1" / "model.weights.h5"
        if shape == "plain":
            src.parent.mkdir()
            src.write_bytes(os.urandom(1200 * KiB))
        entry = store.push(src, epoch=1, inline_small=shape == "keras")
    stored = [f.path for f in entry.files if not f.inline]
    assert stored == ["model.weights.h5"]
    if shape == "keras":
        assert sorted(f.path for f in entry.files if f.inline) == ["cloudckpt_state/state.json",
                                                                     "cloudckpt_state/variables.npz"]
    methods = Counter(m for m, _ in seen)
    writes = _writes(seen)
    if url.startswith("az://"):  # the weights in 1 MiB blocks: its Put Blocks are parts of one object's write
        assert sum("comp=block&" in t + "&" for _, t in writes) == 2
        writes = [(m, t) for m, t in writes if "comp=block&" not in t + "&"]
    assert len(writes) <= len(stored) + 2, seen
    assert methods["HEAD"] == 0, seen
    reads = [t for m, t in seen if m == "GET" and entry.id in t]
    assert not reads, f"stored objects read back after their upload: {reads}"
    # the index, read once (conditionally: this writer holds it). fake-gcs-server's media links name its own
    # address, so a GCS media download would bypass the proxy: there the metadata reads are what is counted
    assert methods["GET"] == 1, seen


def _first_index_read(url: str, tmp_path: Path, seen: Callable[[], list[tuple[str, str]]]) -> list[tuple[str, str]]:
    """The requests a new store makes for ``index.json`` when it reads the run's latest checkpoint."""
    src = tmp_path / "c1"
    src.mkdir()
    (src / "model.weights.h5").write_bytes(os.urandom(100 * KiB))
    with CheckpointStore(url) as store:
        entry = store.push(src, epoch=1)
    before = len(seen())
    with CheckpointStore(url) as store:
        assert store.get("latest").id == entry.id
    return [(m, t) for m, t in seen()[before:] if "index.json" in t]


def test_a_new_store_reads_the_index_in_one_request_on_every_store(counted, tmp_path):
    """What every pull, ``ls`` and restore starts with, a round trip to a cloud each: a fresh store's first read of
    the index is one GET."""
    url, seen = counted
    index_requests = _first_index_read(url, tmp_path, lambda: seen)
    assert [m for m, _ in index_requests] == ["GET"], index_requests


def test_on_gcs_the_first_index_read_is_one_request_counting_downloads_from_media_links(monkeypatch, tmp_path):
    """On a fake-gcs-server whose media links name the counting proxy (a download made from an object's metadata
    goes around the shared server's proxy): the index was read with a metadata GET, then a download of exactly that
    generation; it is one download now, its generation from the same answer's headers."""
    port = servers.free_port()
    server = servers.start_fake_gcs(external_url=f"http://127.0.0.1:{port}")
    try:
        with ShapingProxy(server.endpoint, port=port) as proxy:
            monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.endpoint)
            servers.make_gcs_bucket("counted")
            index_requests = _first_index_read("gs://counted/runs/r1", tmp_path,
                                               lambda: [(r.method, unquote(r.target)) for r in proxy.stats.requests])
    finally:
        server.stop()
    assert [m for m, _ in index_requests] == ["GET"], index_requests


def test_inline_files_pull_and_verify_like_stored_ones_and_a_tampered_one_is_refused(local_url, tmp_path):
    src = keras_shaped(tmp_path / "src")
    with CheckpointStore(local_url) as store:
        entry = store.push(src, epoch=1, inline_small=True)
        inline = [f.path for f in entry.files if f.inline]
        assert inline and not any((Path(local_url) / entry.id / p).exists() for p in inline)
        pulled = store.pull("latest", to=tmp_path / "out").path
        for f in entry.files:
            assert (pulled / f.path).read_bytes() == (src / f.path).read_bytes()
        assert all(r.ok for r in store.verify(entry.id))

        manifest_path = Path(local_url) / manifest_key(entry.id)
        doc = json.loads(manifest_path.read_bytes())
        data = bytearray(base64.b64decode(doc["inline"][inline[0]]))
        data[5] ^= 0xFF  # same size, other bytes
        doc["inline"][inline[0]] = base64.b64encode(bytes(data)).decode()
        manifest_path.write_text(json.dumps(doc))
        with pytest.raises(IntegrityError, match="inline content checksum mismatch"):
            store.pull("latest", to=tmp_path / "refused")
        assert not (tmp_path / "refused").exists()
        assert not store.verify(entry.id)[0].ok
        proc = subprocess.run([sys.executable, "-m", "cloudckpt", "pull", "latest", "--remote", local_url, "--to",
                               str(tmp_path / "cli")], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 4 and "inline content" in proc.stderr and not (tmp_path / "cli").exists()

        del doc["inline"][inline[0]]  # an inline file the manifest does not carry
        manifest_path.write_text(json.dumps(doc))
        with pytest.raises(IntegrityError, match="inline"):
            store.pull("latest", to=tmp_path / "refused")


def test_entries_without_inline_files_are_written_as_before(local_url, tmp_path):
    """An index and manifest with no inline file carry no ``inline`` key: older readers read them unchanged."""
    src = keras_shaped(tmp_path / "src")
    with CheckpointStore(local_url) as store:
        entry = store.push(src, epoch=1)
    assert not any(f.inline for f in entry.files)
    assert b'"inline"' not in (Path(local_url) / "index.json").read_bytes()
    assert b'"inline"' not in (Path(local_url) / manifest_key(entry.id)).read_bytes()
