"""Network faults on Azure (Azurite behind :class:`~faultproxy.FaultProxy`): pushes commit and verify through 20%
broken requests with bounded attempts, pulls restore exactly the committed bytes, and the requests that matter (the
index swap, Put Block, Put Block List) losing their answer after the store did the work still commit once.

Clients find the proxy through ``AZURE_STORAGE_CONNECTION_STRING`` (its ``BlobEndpoint``, set per test). The SDK
makes 3 attempts per request (``retry_total=2``) and ``retry.run`` 4 per operation: the same bound as on S3.
"""

from __future__ import annotations

import random

import pytest
import servers

from cloudckpt import CheckpointStore

from .faultproxy import FaultProxy
from .invariants import check_run
from .test_network_faults import ATTEMPT_BOUND, _checkpoint, _pushes_survive

AZ_RATES = {"500": 0.03, "503": 0.04, "429": 0.02, "reset": 0.03, "drop_after": 0.03, "stall": 0.02, "truncate": 0.03}
AZ_OPTIONS = {"read_timeout": 1.0, "connect_timeout": 1.0, "block_size": 4 * 2**20}  # 6 MiB: 2 blocks, as S3 parts


def _through(proxy: FaultProxy, monkeypatch) -> None:
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING",
                       servers.azure_connection_string(f"{proxy.endpoint}/{servers.AZURITE_ACCOUNT}"))


@pytest.fixture
def az_proxy(azure_server, monkeypatch):
    with FaultProxy(azure_server.endpoint.rsplit("/", 1)[0], seed=13, stall=2.0) as proxy:
        _through(proxy, monkeypatch)
        yield proxy


def test_az_pushes_commit_and_verify_at_20_percent_faults(az_url, az_proxy, tmp_path, full, figures, samples):
    n = 30 if full else 4
    acked = _pushes_survive(az_url, az_proxy, AZ_RATES, n, tmp_path, figures, samples, "az", AZ_OPTIONS, big_every=3)
    assert len(acked) == n and ATTEMPT_BOUND == 12
    assert az_proxy.faults["stall"] + az_proxy.faults["drop_after"] > 0


def test_az_pull_through_faults_is_verified_and_all_or_nothing(az_url, az_proxy, tmp_path, figures):
    rnd = random.Random(8)
    with CheckpointStore(az_url, budget=120, **AZ_OPTIONS) as store:
        az_proxy.set_rates({})
        src = _checkpoint(tmp_path, rnd, 0, big=True)
        store.push(src, epoch=1)
        az_proxy.set_rates(AZ_RATES)
        for i in range(4):
            out = store.pull("latest", to=tmp_path / f"r{i}")
            for rel in ("model.weights.h5", "opt/state.bin", "big.bin"):
                assert (out.path / rel).read_bytes() == (src / rel).read_bytes()
    assert not [p.name for p in tmp_path.iterdir() if "cloudckpt-pull" in p.name or "cloudckpt-old" in p.name]
    for k, v in az_proxy.faults.items():
        figures["faults_injected"][f"az-pull/{k}"] += v


@pytest.mark.parametrize("kind,where", [
    ("drop_after", lambda m, t: m == "PUT" and t.split("?")[0].endswith("/index.json")),  # the index swap, unanswered
    ("drop_after", lambda m, t: m == "PUT" and "comp=blocklist" in t),  # Put Block List done, unanswered
    ("drop_after", lambda m, t: m == "PUT" and "comp=block&" in t + "&"),  # a block staged, unanswered
    ("truncate", lambda m, t: m == "GET" and t.split("?")[0].endswith("/index.json")),
    ("stall", lambda m, t: m == "PUT" and t.split("?")[0].endswith("/index.json")),
], ids=["index-cas", "block-list", "put-block", "index-read", "index-stall"])
def test_az_answer_lost_after_the_server_did_the_work(az_url, azure_server, monkeypatch, tmp_path, kind, where,
                                                      figures):
    """The one request that matters loses its answer (twice): the push still commits once, and verifies."""
    with FaultProxy(azure_server.endpoint.rsplit("/", 1)[0], rates={kind: 1.0}, fault_filter=where, max_faults=2,
                    stall=2.0) as proxy:
        _through(proxy, monkeypatch)
        with CheckpointStore(az_url, budget=60, **AZ_OPTIONS) as store:
            src = _checkpoint(tmp_path, random.Random(1), 0, big=True)
            first = store.push(src, epoch=0)
            second = store.push(src, epoch=1)
            assert proxy.faults[kind] >= 1, "the targeted request never happened"
            assert [c.id for c in store.list()] == [first.id, second.id]
            assert all(r.ok for r in store.verify(all=True))
        figures["faults_injected"][f"az-targeted/{kind}"] += proxy.faults[kind]
        check_run(az_url, **AZ_OPTIONS)
