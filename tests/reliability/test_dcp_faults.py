"""PyTorch DCP saves and loads (cloudckpt.torch.dcp) through a proxy that breaks 20 % of every rank's requests.

Two real ranks under torchrun (gloo, CPU, FSDP2) talk to moto's S3 server through a :class:`~faultproxy.FaultProxy`:
errors (500, 503 SlowDown, 429), connection resets, stalls past the client's timeout, truncated answers, and answers
lost after the server did the work (``drop_after``: an upload, a multipart completion, the manifest, the coordinator's
index compare-and-swap carried out, its answer never arriving). What a save promises under it: it commits a
checkpoint whose every listed byte verifies, or it lists nothing and every rank raises a cloudckpt error (typed,
inside DCP's CheckpointException). A load returns bit-identical tensors or raises a typed error. The job goes on after
a failed save (``--keep-going``), as a training loop would.

Targeted: one request of one save or load goes wrong every time (refused: typed errors, nothing listed) or a few
times (its answer lost or cut short: committed once, or loaded bit-identical).

CI size: 4 saves and one 2-rank load at 20 %, 4 targeted saves, 3 targeted loads (``--full``: 12 saves at 20 %).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("torch.distributed.checkpoint")

from support import dcp_job, rank_procs, trainer_runs  # noqa: E402

from .faultproxy import FaultProxy  # noqa: E402
from .invariants import check_run  # noqa: E402

JOB = str(Path(dcp_job.__file__))
RATES = {"500": 0.03, "503": 0.03, "429": 0.02, "reset": 0.03, "drop_after": 0.05, "stall": 0.01, "truncate": 0.03}
OPTIONS = {"config_kwargs": {"read_timeout": 2.0, "connect_timeout": 2.0}, "budget": 120}
STORE_OPTIONS = {"config_kwargs": OPTIONS["config_kwargs"]}


def torchrun(n: int, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    """The job on ``n`` ranks, started as torchrun starts them (tests/support/rank_procs.py)."""
    return rank_procs.run(JOB, args, world=n, env=env, timeout=900)


@pytest.fixture
def proxied(s3_server, s3_url):
    """The run's URL and a proxy in front of moto; ``env`` sends the job's clients (every rank's) through it."""
    with FaultProxy(s3_server.endpoint, seed=22, stall=3.0) as proxy:
        env = {**trainer_runs.env(), "AWS_ENDPOINT_URL": proxy.endpoint, "AWS_ENDPOINT_URL_S3": proxy.endpoint}
        yield s3_url, proxy, env


def _outcomes(stdout: str) -> tuple[dict[int, str], dict[int, list[str]]]:
    """``saved`` step -> id and ``failed`` step -> error types, from rank 0's lines (every rank prints failures)."""
    saved, failed = {}, {}
    for line in stdout.splitlines():
        word, _, rest = line.partition(" ")
        if word == "saved":
            step, cid = rest.split()
            saved[int(step)] = cid
        elif word == "failed":
            step, *types = rest.split()
            failed.setdefault(int(step), []).extend(types)
    return saved, failed


def test_a_2_rank_save_and_load_through_20_percent_faults_commits_whole_or_lists_nothing(proxied, tmp_path, full,
                                                                                          figures):
    url, proxy, env = proxied
    out = tmp_path / "out"
    out.mkdir()
    steps = 12 if full else 4
    proxy.set_rates(RATES)
    proc = torchrun(2, env, "save", url, str(out), "--kind", "fsdp", "--steps", str(steps),
                    "--save-at", ",".join(map(str, range(1, steps + 1))), "--keep-last", "2", "--keep-going",
                    "--options", json.dumps(OPTIONS))
    assert proc.returncode == 0, proc.stderr[-4000:]
    saved, failed = _outcomes(proc.stdout)
    assert set(saved) | set(failed) == set(range(1, steps + 1)) and not set(saved) & set(failed), proc.stdout
    assert not any("untyped" in types for types in failed.values()), failed  # a failure is a cloudckpt error

    proxy.set_rates({})
    state = check_run(url, **STORE_OPTIONS)  # every listed checkpoint verifies; gc leaves exactly what is listed
    listed = {c.step: c.id for c in state.index.checkpoints} if state.index else {}
    assert set(listed) <= set(saved), (listed, failed)  # a failed save is never listed
    if saved:  # retention on what committed: the best (loss = step: the first) and the last 2
        keep = {min(saved)} | set(sorted(saved)[-2:])
        assert listed == {s: saved[s] for s in keep}, (listed, saved)

    proxy.set_rates(RATES)
    load = torchrun(2, env, "load", url, str(out), "--kind", "fsdp", "--keep-going", "--options", json.dumps(OPTIONS))
    assert load.returncode == 0, load.stderr[-4000:]
    results = [json.loads(p.read_text()) for p in sorted(out.glob("load-*.json"))]
    assert len(results) == 2, load.stdout
    for r in results:  # bit-identical to what was saved at the step it read, or a typed error
        assert r.get("equal") or ("error" in r and "untyped" not in r["error"]), r
        if r.get("equal"):
            assert r["step"] == max(listed), r
    for kind, n in proxy.faults.items():
        figures["faults_injected"][f"dcp-s3/{kind}"] += n
    figures["dcp_saves_through_faults"]["saved"] += len(saved)
    figures["dcp_saves_through_faults"]["failed"] += len(failed)
    figures["dcp_loads_through_faults"]["equal"] += sum(bool(r.get("equal")) for r in results)
    assert sum(proxy.faults.values()) > 0 and saved, (proxy.faults, failed)


STEP2 = "/ckpt-s0000000002-"  # the keys of step 2's checkpoint


@pytest.mark.parametrize("kind,where,commits", [
    ("503", lambda m, t: m == "PUT" and STEP2 in t and "/__1_0.distcp" in t, False),  # rank 1's upload refused
    ("drop_after", lambda m, t: m == "PUT" and STEP2 in t and "/__1_0.distcp" in t, True),  # stored, unanswered
    ("drop_after", lambda m, t: m == "PUT" and t.endswith("/index.json"), True),  # every index CAS: done, unanswered
    ("drop_after", lambda m, t: m == "PUT" and STEP2 in t and t.endswith("/dcp_metadata.json"), True),
], ids=["rank1-upload-refused", "rank1-upload-answer-lost", "index-cas-answer-lost", "metadata-answer-lost"])
def test_a_targeted_fault_on_one_ranks_request(proxied, tmp_path, kind, where, commits, figures):
    """One request of one save goes wrong every time (refused) or a few times (its answer lost after the server did
    the work): the save commits once and verifies, or every rank raises a typed error and the previous checkpoint
    stays the latest."""
    url, proxy, env = proxied
    proxy.rates, proxy.fault_filter = {kind: 1.0}, where
    proxy.max_faults = None if not commits else 3
    out = tmp_path / "out"
    out.mkdir()
    proc = torchrun(2, env, "save", url, str(out), "--kind", "fsdp", "--steps", "2", "--save-at", "1,2",
                    "--keep-going", "--options", json.dumps(OPTIONS))
    assert proc.returncode == 0, proc.stderr[-4000:]
    saved, failed = _outcomes(proc.stdout)
    assert proxy.faults[kind] >= 1, "the targeted request never happened"
    proxy.set_rates({})
    state = check_run(url, **STORE_OPTIONS)
    listed = [c.step for c in state.index.checkpoints]
    if commits:
        assert sorted(saved) == listed == [1, 2] and not failed, (proc.stdout, listed)
    else:
        assert sorted(saved) == listed == [1] and sorted(failed) == [2], (proc.stdout, listed)
        assert "untyped" not in failed[2] and len(failed[2]) >= 1, failed  # each rank: a cloudckpt error
        assert proc.stdout.count("failed 2 ") == 2, proc.stdout  # both ranks raised
    figures["faults_injected"][f"dcp-s3-targeted/{kind}"] += proxy.faults[kind]


@pytest.mark.parametrize("kind,where,loads", [
    ("503", lambda m, t: m == "GET" and t.split("?")[0].endswith("/__0_0.distcp"), False),  # rank 0's data refused
    ("truncate", lambda m, t: m == "GET" and t.split("?")[0].endswith("/__1_0.distcp"), True),  # bytes cut short
    ("drop_after", lambda m, t: m == "GET" and t.split("?")[0].endswith("/dcp_metadata.json"), True),
], ids=["data-refused", "data-truncated", "metadata-answer-lost"])
def test_a_2_rank_load_through_a_targeted_fault_is_bit_identical_or_typed(proxied, tmp_path, kind, where, loads,
                                                                           figures):
    """A checkpoint saved without faults; a 2-rank load whose reads of one object go wrong: every time (each
    rank that needs it raises a typed error) or twice (retried: bit-identical)."""
    url, proxy, env = proxied
    out = tmp_path / "out"
    out.mkdir()
    proc = torchrun(2, env, "save", url, str(out), "--kind", "fsdp", "--steps", "1", "--save-at", "1")
    assert proc.returncode == 0, proc.stderr[-4000:]
    proxy.rates, proxy.fault_filter, proxy.max_faults = {kind: 1.0}, where, None if not loads else 2
    load = torchrun(2, env, "load", url, str(out), "--kind", "fsdp", "--keep-going", "--options", json.dumps(OPTIONS))
    assert load.returncode == 0, load.stderr[-4000:]
    assert proxy.faults[kind] >= 1, "the targeted request never happened"
    results = [json.loads(p.read_text()) for p in sorted(out.glob("load-*.json"))]
    assert len(results) == 2, load.stdout
    if loads:
        assert all(r.get("equal") and r["step"] == 1 for r in results), results
    else:  # DCP gathers the ranks' read failures: each rank raises; every error is a cloudckpt one
        assert all("error" in r and "untyped" not in r["error"] for r in results), results
    figures["faults_injected"][f"dcp-s3-load/{kind}"] += proxy.faults[kind]
