"""Parallel composite pushes to GCS (cloudckpt/backends/gcs_compose.py) on fake-gcs-server: parts sent in parallel
(wall time through a capped proxy shrinks with concurrency), the composed object's crc32c is the manifest's, and no
temporary part is left behind."""

from __future__ import annotations

import base64
import os
import time

import google_crc32c
import pytest
from support.shaping_proxy import ShapingProxy

from cloudckpt import CheckpointStore

MiB = 2**20


def _parts(store) -> list[str]:
    return [o.rel for o in store.backend.list_objects() if ".cloudckpt-part-" in o.rel]


@pytest.mark.parametrize("size, part, composes", [(6 * MiB, MiB, 1), (10 * MiB + 12345, 256 * 1024, 3)])
def test_a_composite_push_stores_the_manifests_crc32c_and_leaves_no_part(gcs_server, gcs_url, tmp_path, monkeypatch,
                                                                         size, part, composes):
    """6 parts composed at once; 41 parts: two composes of 32 and 9, then one of those two."""
    src = tmp_path / "model.bin"
    data = os.urandom(size)
    src.write_bytes(data)
    with ShapingProxy(gcs_server.endpoint) as proxy:  # no shaping: it counts the requests
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.endpoint)
        with CheckpointStore(gcs_url, composite_threshold=1, part_size=part) as store:
            entry = store.push(src, epoch=1)
            n = -(-size // part)
            requests = proxy.stats.requests
            assert len([r for r in requests if r.method == "POST" and r.target.endswith("uploadType=multipart")]) \
                == n + 1  # the parts (a multipart upload names its object in the body), and the manifest
            assert len([r for r in requests if "/compose" in r.target]) == composes
            deleted = [r for r in requests if r.method == "DELETE" and "cloudckpt-part-" in r.target]
            assert len(deleted) == n + composes - 1  # the parts and the intermediate composites
            blob = store.backend.bucket.get_blob(store.backend._name(f"{entry.id}/model.bin"))
            assert blob.size == size
            assert base64.b64decode(blob.crc32c).hex() == entry.files[0].crc32c == f"{google_crc32c.value(data):08x}"
            assert _parts(store) == []
            assert all(r.ok for r in store.verify(entry.id))
            assert (store.pull("latest", to=tmp_path / "out").path / "model.bin").read_bytes() == data


def test_composite_parts_go_up_in_parallel(gcs_server, gcs_url, tmp_path, monkeypatch):
    src = tmp_path / "model.bin"
    src.write_bytes(os.urandom(8 * MiB))
    times = {}
    with ShapingProxy(gcs_server.endpoint, rate=2e6) as proxy:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.endpoint)
        for concurrency in (1, 8):
            with CheckpointStore(gcs_url, composite_threshold=1, part_size=MiB, max_concurrency=concurrency) as store:
                proxy.reset_stats()
                t0 = time.monotonic()
                store.push(src, epoch=concurrency)
                times[concurrency] = time.monotonic() - t0
                uploads = [r for r in proxy.stats.requests if r.method == "POST" and "uploadType=multipart" in r.target]
                assert proxy.stats.sent_bytes >= 8 * MiB and len(uploads) >= 8  # 8 parts (+ manifest, index)
                assert _parts(store) == []
    assert times[1] >= 3 * times[8], times
