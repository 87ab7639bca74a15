"""Index writes whose answer is lost (issue 10, items 2 and 7c), each interleaving pinned exactly.

The store carries the write out, another writer moves, then the answer is lost (:mod:`.lostanswer`, on the real
store). The retry must learn that its write happened instead of re-applying it: a commit pruned meanwhile is never
added again, no other writer's acknowledged commit is pruned because of it, a newer writer's claim is never undone,
and whatever the unanswered write pruned is deleted at once, not left for ``gc``.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from cloudckpt import CheckpointStore, StaleWriterError

from .faultproxy import FaultProxy
from .invariants import check_run, listed_objects
from .lostanswer import lose_answers
from .procs import ROOT, Outcome, env_with, writer_cmd


def _src(tmp_path: Path, name: str) -> Path:
    d = tmp_path / "src" / name
    d.mkdir(parents=True)
    (d / "model.bin").write_bytes(name.encode() + os.urandom(64))
    return d


def _stored(store: CheckpointStore) -> set[str]:
    return {o.rel for o in store.backend.list_objects()}


@pytest.mark.parametrize("kind", ["local", "s3", "gcs", "az"])
def test_lost_commit_answer_with_a_second_writer_never_resurrects_a_pruned_checkpoint(kind, request, tmp_path):
    """A commits X (keep-last 1, pruning Y0); before A hears back, B commits Y1 and prunes X; A's answer is lost.
    A's push is acknowledged (committed, then pruned by B's retention); Y1 stays listed and readable."""
    url = request.getfixturevalue(f"{kind}_url")
    with CheckpointStore(url) as a, CheckpointStore(url) as b:
        y0 = b.push(_src(tmp_path, "y0"), epoch=0, keep_last=1)
        b_moves = []
        lost = lose_answers(a, after=lambda: b_moves.append(b.push(_src(tmp_path, "y1"), epoch=2, keep_last=1)))
        x = a.push(_src(tmp_path, "x"), epoch=1, keep_last=1)
        y1 = b_moves[0]
        assert lost.lost == 1
        index = b.index()
        assert [c.id for c in index.checkpoints] == [y1.id], f"x={x.id} y0={y0.id} y1={y1.id}"
        assert index.latest == y1.id
        assert all(r.ok for r in b.verify(all=True))
        assert b.pull("latest", to=tmp_path / "pulled").entry.id == y1.id
        # Y0 (pruned by A's unanswered write) and X (pruned by B) are deleted without gc
        assert _stored(b) == listed_objects(index)
    check_run(url)


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_lost_commit_answer_deletes_what_its_retention_pruned(kind, request, tmp_path):
    url = request.getfixturevalue(f"{kind}_url")
    with CheckpointStore(url) as a:
        first = a.push(_src(tmp_path, "a1"), epoch=1, keep_last=1)
        lost = lose_answers(a)
        second = a.push(_src(tmp_path, "a2"), epoch=2, keep_last=1)
        assert lost.lost == 1
        index = a.index()
        assert [c.id for c in index.checkpoints] == [second.id]
        assert not any(rel.startswith(first.id + "/") for rel in _stored(a)), "the pruned checkpoint was left to gc"
        assert _stored(a) == listed_objects(index)


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_lost_prune_answer_reports_and_deletes_what_it_pruned(kind, request, tmp_path):
    url = request.getfixturevalue(f"{kind}_url")
    with CheckpointStore(url) as a:
        ids = [a.push(_src(tmp_path, f"p{i}"), epoch=i).id for i in range(3)]
        lost = lose_answers(a)
        pruned = a.prune(keep_last=1)
        assert lost.lost == 1
        assert sorted(c.id for c in pruned) == sorted(ids[:2])
        index = a.index()
        assert [c.id for c in index.checkpoints] == ids[2:]
        assert _stored(a) == listed_objects(index)


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_lost_claim_answer_never_fences_the_newer_claimer(kind, request, tmp_path):
    """A's claim is written, B claims after it, A's answer is lost: B stays the writer and A is the one fenced."""
    url = request.getfixturevalue(f"{kind}_url")
    with CheckpointStore(url) as a, CheckpointStore(url) as b:
        a.push(_src(tmp_path, "first"), epoch=0)
        b_lease = []
        lose_answers(a, after=lambda: b_lease.append(b.claim()))
        a_lease = a.claim()
        assert (a_lease.generation, b_lease[0].generation) == (1, 2)
        b.push(_src(tmp_path, "by-b"), epoch=1)  # the newer claimer still writes
        with pytest.raises(StaleWriterError):
            a.push(_src(tmp_path, "by-a"), epoch=2)
        index = b.index()
        assert index.writer.id == b.keeper.writer_id and index.writer.generation == 2
        assert [c.epoch for c in index.checkpoints] == [0, 1]


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_a_write_that_never_reached_the_store_is_applied_on_retry(kind, request, tmp_path):
    url = request.getfixturevalue(f"{kind}_url")
    with CheckpointStore(url) as a, CheckpointStore(url) as b:
        b_ids = []
        lose_answers(a, times=2, happen=False,
                     after=lambda: b_ids.append(b.push(_src(tmp_path, f"b{len(b_ids)}"), epoch=9).id))
        x = a.push(_src(tmp_path, "x"), epoch=1)
        assert [c.id for c in a.list()] == [*b_ids, x.id]
    check_run(url)


def test_unknowable_outcome_is_an_error_and_still_deletes_what_it_pruned(local_url, tmp_path, monkeypatch):
    """With its record pushed out of the index by other writers, A can't tell whether its write happened: the push
    fails with a clear error instead of re-adding X, and Y0, which the unanswered write pruned, is deleted."""
    from cloudckpt import commit

    monkeypatch.setattr(commit, "MAX_APPLIED", 2)
    with CheckpointStore(local_url) as a, CheckpointStore(local_url) as b, CheckpointStore(local_url) as c:
        y0 = b.push(_src(tmp_path, "y0"), epoch=0, keep_last=1)

        def others() -> None:
            b.push(_src(tmp_path, "b1"), epoch=2, keep_last=1)
            c.push(_src(tmp_path, "c1"), epoch=3, keep_last=1)

        lose_answers(a, after=others)
        with pytest.raises(commit.OutcomeUnknownError, match="unknown") as err:
            a.push(_src(tmp_path, "x"), epoch=1, keep_last=1)
        assert err.value.exit_code == 1 and [e.id for e in err.value.gone] == [y0.id]
        index = c.index()
        assert [e.epoch for e in index.checkpoints] == [3]
        assert _stored(c) == listed_objects(index)
    check_run(local_url)


@pytest.mark.parametrize("writers", [2, 3])
def test_writer_processes_racing_through_lost_index_answers_on_s3(writers, s3_url, s3_server, tmp_path, full,
                                                                  figures):
    """The issue's reproduction, randomized: 2 or 3 writer processes push to one S3 run with keep-last 1 while half
    of the index writes are carried out by the server and their answer dropped (a proxy resets the connection).
    Every run ends readable: every listed checkpoint verifies, latest pulls, nothing unlisted is left behind."""
    rounds = 12 if full else 5

    def index_put(m: str, t: str) -> bool:
        return m == "PUT" and t.split("?")[0].endswith("/index.json")

    with FaultProxy(s3_server.endpoint, rates={"drop_after": 0.5}, fault_filter=index_put, seed=writers) as proxy:
        env = env_with(AWS_ENDPOINT_URL=proxy.endpoint, AWS_ENDPOINT_URL_S3=proxy.endpoint)
        go = tmp_path / "go"
        procs = [subprocess.Popen(writer_cmd(s3_url, "--rounds", str(rounds), "--seed", str(i), "--max-bytes", "512",
                                             "--keep-last", "1", "--wait-file", str(go)),
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
                 for i in range(writers)]
        for p in procs:
            assert p.stdout.readline().startswith("READY")
        go.touch()
        outs = []
        for p in procs:
            out, err = p.communicate(timeout=600)
            outs.append(Outcome(p.returncode, out.splitlines(), err))
        dropped = proxy.faults["drop_after"]
    assert all(o.returncode == 0 for o in outs), [o.stderr[-2000:] for o in outs]
    assert dropped > 0
    state = check_run(s3_url)  # every listed checkpoint verifies, latest pulls, gc finds exactly the listed objects
    acked = {cid: loss for o in outs for cid, loss in o.committed}
    listed = [c.id for c in state.index.checkpoints]
    assert set(listed) <= set(acked) and len(acked) == writers * rounds
    assert state.index.best == min(acked, key=acked.get), "the best acknowledged checkpoint was lost"
    assert state.gc_deleted == [], f"pruned objects were left to gc: {state.gc_deleted}"
    figures["faults_injected"][f"s3-lost-index-answers/{writers}-writers"] += dropped
    figures["races"][f"s3/lost-answer-rounds/{writers}-writers"] += writers * rounds


def test_applied_records_stay_bounded_old_indexes_read_and_hostile_ones_are_refused(local_url, tmp_path):
    """An index without ``applied`` (written before it existed) reads and gains it on the next write; the records
    stay at MAX_APPLIED however many sessions write; malformed records are an IntegrityError."""
    import json

    from cloudckpt import IntegrityError, commit
    from cloudckpt.manifest import INDEX_NAME, MAX_APPLIED_READ, parse_index

    with CheckpointStore(local_url) as a:
        a.push(_src(tmp_path, "first"), epoch=0)
    path = Path(local_url) / INDEX_NAME
    raw = json.loads(path.read_bytes())
    del raw["applied"]
    path.write_text(json.dumps(raw))  # as an older cloudckpt wrote it
    for i in range(commit.MAX_APPLIED + 5):
        with CheckpointStore(local_url) as s:
            s.push(_src(tmp_path, f"s{i}"), epoch=i + 1, keep_last=2)
    index = parse_index(path.read_bytes())
    assert len(index.applied) == commit.MAX_APPLIED
    assert len({r.writer for r in index.applied}) == commit.MAX_APPLIED
    assert [r.seq for r in index.applied] == sorted(r.seq for r in index.applied) and index.applied[-1].seq == index.seq
    good = json.loads(path.read_bytes())
    for bad in ({"writer": "../x", "op": 1, "seq": 1}, {"writer": "ab" * 4, "op": 0, "seq": 1},
                {"writer": "ab" * 4, "op": 1, "seq": -1}, {"writer": "ab" * 4, "op": "1", "seq": 1}):
        with pytest.raises(IntegrityError, match="applied"):
            parse_index(json.dumps({**good, "applied": [bad]}).encode())
    with pytest.raises(IntegrityError, match="applied"):
        parse_index(json.dumps({**good, "applied": [good["applied"][0]] * (MAX_APPLIED_READ + 1)}).encode())
