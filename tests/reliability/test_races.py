"""Concurrency: writer processes racing on one run lose no index update; a superseded writer is fenced.

Two real processes push to the same run at the same time (compare-and-swap on the index: S3 and Azure If-Match, local
os.replace under flock). Every push that returned is listed at the end — counted one by one — and the lost races
they survived are reported. A writer that claimed the run is fenced with StaleWriterError (CLI/process exit 6) once a
newer writer claims it, and nothing it pushes after that is listed.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from cloudckpt import CheckpointStore, StaleWriterError

from .invariants import check_run
from .procs import ROOT, Outcome, draining, env_with, writer_cmd


def _start(url: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen(writer_cmd(url, *args), env=env_with(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=ROOT)


def _finish(p: subprocess.Popen, timeout: float = 300) -> Outcome:
    out, err = p.communicate(timeout=timeout)
    return Outcome(p.returncode, out.splitlines(), err)


def _finish_all(procs: list[subprocess.Popen], timeout: float = 300) -> list[Outcome]:
    """Every writer's output read as it comes (not one writer's after the other's end: the second would block on
    its full pipe, and the race would go on with one writer)."""
    outputs = [draining(p, timeout) for p in procs]
    return [Outcome(p.returncode, out.splitlines(), err) for p, (out, err) in
            zip(procs, (f.result() for f in outputs), strict=True)]


def _race(url: str, rounds_each: int, go: Path, *extra: str) -> list[Outcome]:
    procs = [_start(url, "--rounds", str(rounds_each), "--seed", str(i), "--max-bytes", "2048",
                    "--wait-file", str(go), *extra) for i in range(2)]
    for p in procs:
        assert p.stdout.readline().startswith("READY")
    go.touch()  # both start pushing at the same instant
    return _finish_all(procs)


@pytest.mark.parametrize("kind", ["local", "s3", "az"])
def test_two_writers_race_without_losing_an_update(kind, request, tmp_path, full, figures):
    url = request.getfixturevalue(f"{kind}_url")
    rounds_each = {"local": 500, "s3": 40, "az": 40}[kind] * (3 if full else 1)
    outs = _race(url, rounds_each, tmp_path / "go")
    for out in outs:
        assert out.returncode == 0, out.stderr[-3000:]
        assert len(out.committed) == rounds_each
    acked = [cid for out in outs for cid, _ in out.committed]
    state = check_run(url)
    listed = [c.id for c in state.index.checkpoints]
    assert sorted(listed) == sorted(acked), f"{len(set(acked) - set(listed))} acknowledged commits are not listed"
    assert len(listed) == 2 * rounds_each
    conflicts = sum(int(out.lines[-1].split("conflicts=")[1]) for out in outs)
    # each writer's own commits stay in its order in the index
    for out in outs:
        mine = [cid for cid in listed if cid in {c for c, _ in out.committed}]
        assert mine == [c for c, _ in out.committed]
    figures["races"][f"{kind}/rounds"] += 2 * rounds_each
    figures["races"][f"{kind}/lost_cas_retried"] += conflicts
    figures["races"][f"{kind}/updates_lost"] += len(set(acked) - set(listed))
    assert conflicts > 0 or kind in ("s3", "az"), "the writers never collided: the race proved nothing"


@pytest.mark.parametrize("kind", ["local", "s3", "az"])
def test_racing_writers_with_retention_keep_the_policy(kind, request, tmp_path, figures):
    """Both writers apply keep-last 4 in every commit: the end state is exactly the last 4 commits plus the best."""
    url = request.getfixturevalue(f"{kind}_url")
    rounds_each = {"local": 100, "s3": 25, "az": 25}[kind]
    outs = _race(url, rounds_each, tmp_path / "go", "--keep-last", "4")
    assert all(out.returncode == 0 for out in outs), [out.stderr[-2000:] for out in outs]
    state = check_run(url)
    acked = {cid: loss for out in outs for cid, loss in out.committed}
    listed = [c.id for c in state.index.checkpoints]
    assert set(listed) <= set(acked)
    best = min(acked, key=acked.get)
    assert state.index.best == best and best in listed, "the best checkpoint of the whole race was pruned"
    # the index is in commit order: the last 4 are what keep-last 4 keeps; anything else listed is the best
    assert set(listed) - set(listed[-4:]) <= {best} and len(listed) in (4, 5)
    figures["races"][f"{kind}/rounds-with-retention"] += 2 * rounds_each


@pytest.mark.parametrize("kind", ["local", "s3", "az"])
def test_superseded_writer_is_fenced(kind, request, tmp_path, figures):
    """Writer A claims the run and pushes in a loop; B claims it: A's next commit fails with StaleWriterError
    (exit 6), every commit A acknowledged before is listed, and nothing of A's lands after B's claim."""
    url = request.getfixturevalue(f"{kind}_url")
    a = _start(url, "--claim", "--max-bytes", "1024")
    try:
        assert a.stdout.readline().split() == ["CLAIMED", "1"]
        assert a.stdout.readline().startswith("READY")
        early = []
        while len(early) < 5:  # A has committed a few
            early.append(a.stdout.readline().rstrip("\n"))
        with CheckpointStore(url) as b:
            lease = b.claim()
            assert lease.generation == 2
            out_a = _finish(a, timeout=120)
            out_a.lines[:0] = early
            src = tmp_path / "b-src"
            src.mkdir()
            (src / "x").write_bytes(b"b")
            b_entry = b.push(src, epoch=999)
    finally:
        if a.poll() is None:
            a.kill()
            a.wait()
    assert out_a.returncode == 6 and out_a.lines[-1].startswith("FENCED"), out_a.stderr[-2000:]
    assert "superseded" in out_a.lines[-1]
    state = check_run(url)
    listed = [c.id for c in state.index.checkpoints]
    a_acked = [cid for cid, _ in out_a.committed]
    assert len(a_acked) >= 4
    assert [cid for cid in listed if cid != b_entry.id] == a_acked, "A's commits differ from what A acknowledged"
    assert listed[-1] == b_entry.id and state.index.writer.generation == 2
    # and in-process: the stale store object raises the typed error, which is also a RuntimeError
    with CheckpointStore(url) as old, CheckpointStore(url) as new:
        old.claim()
        new.claim()
        with pytest.raises(StaleWriterError):
            old.push(src)
        with pytest.raises(RuntimeError):
            old.prune(keep_last=1)
    figures["fenced"][kind] += 2
