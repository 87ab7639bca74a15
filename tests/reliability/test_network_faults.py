"""Network faults: every push commits and verifies through a proxy that breaks 20% of the HTTP requests, and the
HTTP attempts per logical operation stay bounded (the clients' retries and ours don't multiply into dozens).

The :class:`~faultproxy.FaultProxy` sits in front of moto's S3 server / fake-gcs-server; clients find it through
``AWS_ENDPOINT_URL(_S3)`` / ``STORAGE_EMULATOR_HOST`` (set per test, restored after). A logical operation at the proxy
is one ``(method, path)`` — one object's upload, its HEAD check, the manifest write, the index read or its CAS — within
one push; its attempts are botocore's (3, "standard" mode) times ours (``retry.run``: 4) at most, so
:data:`ATTEMPT_BOUND` is 12; an index CAS that lost its answer is re-read and found committed, not rewritten blindly.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from cloudckpt import CheckpointStore

from .faultproxy import FaultProxy
from .invariants import check_run

ATTEMPT_BOUND = 12  # botocore standard mode (3) x cloudckpt retry.run (4); documented in the module docstring
S3_RATES = {"500": 0.03, "503": 0.04, "429": 0.02, "reset": 0.03, "drop_after": 0.03, "stall": 0.02, "truncate": 0.03}
GCS_RATES = {"500": 0.04, "503": 0.04, "429": 0.03, "reset": 0.03, "drop_after": 0.03, "truncate": 0.03}
S3_OPTIONS = {"config_kwargs": {"read_timeout": 1.0, "connect_timeout": 1.0}, "part_size": 5 * 2**20}


@pytest.fixture
def s3_proxy(s3_server, monkeypatch):
    with FaultProxy(s3_server.endpoint, seed=11, stall=2.0) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy.endpoint)
        yield proxy


@pytest.fixture
def gcs_proxy(gcs_server, monkeypatch):
    with FaultProxy(gcs_server.endpoint, seed=12) as proxy:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.endpoint)
        yield proxy


def _checkpoint(root: Path, rnd: random.Random, i: int, big: bool) -> Path:
    d = root / f"c{i}"
    (d / "opt").mkdir(parents=True)
    (d / "model.weights.h5").write_bytes(rnd.randbytes(rnd.randint(1, 300_000)))
    (d / "opt" / "state.bin").write_bytes(rnd.randbytes(rnd.randint(0, 20_000)))
    if big:
        (d / "big.bin").write_bytes(rnd.randbytes(6 * 2**20))  # multipart with 5 MiB parts
    return d


def _pushes_survive(url, proxy, rates, n, tmp_path, figures, samples, kind, options, big_every):
    rnd = random.Random(5)
    acked = []
    with CheckpointStore(url, budget=120, **options) as store:
        for i in range(n):
            src = _checkpoint(tmp_path, rnd, i, big=big_every and i % big_every == big_every - 1)
            proxy.set_rates(rates)
            proxy.reset_counts()
            entry = store.push(src, epoch=i, metrics={"val_loss": rnd.random()}, monitor="val_loss", keep_last=4)
            acked.append(entry.id)
            samples[f"http_attempts_per_operation/{kind}"].extend(proxy.requests.values())
            worst = max(proxy.requests.values())
            assert worst <= ATTEMPT_BOUND, f"push {i}: {proxy.requests.most_common(3)}"
            assert all(r.ok for r in store.verify(entry.id)), f"push {i} does not verify through the faults"
    proxy.set_rates({})
    state = check_run(url, **options)
    listed = [c.id for c in state.index.checkpoints]
    assert acked[-4:] == listed[-4:] and set(listed) <= set(acked)
    for k, v in proxy.faults.items():
        figures["faults_injected"][f"{kind}/{k}"] += v
    figures["pushes_through_faults"][kind] += n
    assert sum(proxy.faults.values()) > 0
    return acked


def test_s3_pushes_commit_and_verify_at_20_percent_faults(s3_url, s3_proxy, tmp_path, full, figures, samples):
    _pushes_survive(s3_url, s3_proxy, S3_RATES, 60 if full else 6, tmp_path, figures, samples, "s3",
                    S3_OPTIONS, big_every=3)
    assert s3_proxy.faults["stall"] + s3_proxy.faults["drop_after"] > 0


def test_gcs_pushes_commit_and_verify_at_20_percent_faults(gcs_url, gcs_proxy, tmp_path, full, figures, samples):
    n = 20 if full else 4
    acked = _pushes_survive(gcs_url, gcs_proxy, GCS_RATES, n, tmp_path, figures, samples, "gcs", {}, big_every=0)
    assert len(acked) == n  # every push committed despite the faults


def test_s3_pull_through_faults_is_verified_and_all_or_nothing(s3_url, s3_proxy, tmp_path, figures):
    """Pulls at 20% faults (truncated answers included) restore exactly the committed bytes."""
    rnd = random.Random(8)
    with CheckpointStore(s3_url, budget=120, **S3_OPTIONS) as store:
        s3_proxy.set_rates({})
        src = _checkpoint(tmp_path, rnd, 0, big=False)
        store.push(src, epoch=1)
        s3_proxy.set_rates(S3_RATES)
        for i in range(6):
            out = store.pull("latest", to=tmp_path / f"r{i}")
            assert (out.path / "model.weights.h5").read_bytes() == (src / "model.weights.h5").read_bytes()
            assert (out.path / "opt" / "state.bin").read_bytes() == (src / "opt" / "state.bin").read_bytes()
    leftovers = [p.name for p in tmp_path.iterdir() if "cloudckpt-pull" in p.name or "cloudckpt-old" in p.name]
    assert not leftovers
    for k, v in s3_proxy.faults.items():
        figures["faults_injected"][f"s3-pull/{k}"] += v


def test_proxy_injects_what_it_says(s3_server):
    """The proxy itself: each fault kind reaches a plain HTTP client as that fault."""
    import http.client

    with FaultProxy(s3_server.endpoint, rates={"503": 1.0}) as proxy:
        host, port = proxy.endpoint.split("//")[1].split(":")
        c = http.client.HTTPConnection(host, int(port), timeout=5)
        c.request("GET", "/")
        r = c.getresponse()
        assert r.status == 503 and b"SlowDown" in r.read()
        proxy.set_rates({"reset": 1.0})
        c = http.client.HTTPConnection(host, int(port), timeout=5)
        with pytest.raises((ConnectionError, http.client.RemoteDisconnected)):
            c.request("GET", "/")
            c.getresponse()
        proxy.set_rates({"truncate": 1.0})
        c = http.client.HTTPConnection(host, int(port), timeout=5)
        c.request("GET", "/")
        with pytest.raises((http.client.IncompleteRead, ConnectionError)):
            c.getresponse().read()
        proxy.set_rates({})
        c = http.client.HTTPConnection(host, int(port), timeout=5)
        c.request("GET", "/")
        assert c.getresponse().status == 200
        assert proxy.faults == {"503": 1, "reset": 1, "truncate": 1} and proxy.forwarded == 2


@pytest.mark.parametrize("kind,where", [
    ("drop_after", lambda m, t: m == "PUT" and t.endswith("/index.json")),  # the index CAS went through, unanswered
    ("drop_after", lambda m, t: m == "POST" and "uploadId=" in t),  # multipart completed, unanswered
    ("drop_after", lambda m, t: m == "PUT" and "partNumber=" in t),  # a part stored, unanswered
    ("drop_after", lambda m, t: m == "PUT" and t.endswith("_cloudckpt_manifest.json")),
    ("truncate", lambda m, t: m == "GET" and t.endswith("/index.json")),
    ("stall", lambda m, t: m == "PUT" and t.endswith("/index.json")),
], ids=["index-cas", "multipart-complete", "upload-part", "manifest", "index-read", "index-stall"])
def test_s3_answer_lost_after_the_server_did_the_work(s3_url, s3_server, monkeypatch, tmp_path, kind, where, figures):
    """The one request that matters loses its answer (twice): the push still commits once, and verifies."""
    with FaultProxy(s3_server.endpoint, rates={kind: 1.0}, fault_filter=where, max_faults=2, stall=2.0) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy.endpoint)
        with CheckpointStore(s3_url, budget=60, **S3_OPTIONS) as store:
            src = _checkpoint(tmp_path, random.Random(1), 0, big=True)
            first = store.push(src, epoch=0)
            second = store.push(src, epoch=1)
            assert proxy.faults[kind] >= 1, "the targeted request never happened"
            assert [c.id for c in store.list()] == [first.id, second.id]
            assert all(r.ok for r in store.verify(all=True))
        figures["faults_injected"][f"s3-targeted/{kind}"] += proxy.faults[kind]
        check_run(s3_url, **S3_OPTIONS)
