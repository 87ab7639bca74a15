"""The index as a head with sealed segments: a long run reads, restores, verifies, prunes and collects like a short
one; a missing or altered segment is an IntegrityError; an index of the earlier format is read and converted.

Small thresholds (``$CLOUDCKPT_INDEX_HEAD_MAX`` / ``$CLOUDCKPT_INDEX_SEGMENT_MAX``) make a few pushes seal several
segments. The property at the end replays random pushes, prunes and discards through the pure index changes and
compares every result with retention applied to one plain list.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cloudckpt import CheckpointStore, IntegrityError
from cloudckpt.changes import commit_checkpoint, discard_checkpoints, prune_checkpoints
from cloudckpt.layout import segment_key
from cloudckpt.manifest import CheckpointEntry, FileEntry, Index, best_of, dump, parse_index
from cloudckpt.retention import Record, Retention
from cloudckpt.segments import Sealing, decode, full_view, seal


@pytest.fixture
def small(monkeypatch):
    """Seal when the head passes 4 checkpoints; segments of at most 3."""
    monkeypatch.setenv("CLOUDCKPT_INDEX_HEAD_MAX", "4")
    monkeypatch.setenv("CLOUDCKPT_INDEX_SEGMENT_MAX", "3")


def head_doc(store: CheckpointStore) -> dict:
    data, _ = store.backend.read_index()
    return json.loads(data)


def push_run(store: CheckpointStore, tmp_path: Path, n: int, **policy) -> list[CheckpointEntry]:
    out = []
    for i in range(n):
        src = tmp_path / f"src{i}" / "w.bin"
        src.parent.mkdir(parents=True, exist_ok=True)
        src.write_bytes(f"weights {i}".encode() * 50)
        loss = abs(i - 3) + 0.5  # the best is epoch 3: sealed once the run is long
        out.append(store.push(src.parent, epoch=i, metrics={"val_loss": loss}, monitor="val_loss", **policy))
    return out


def test_a_sealed_run_lists_resolves_pulls_and_verifies(store_url, tmp_path, small):
    with CheckpointStore(store_url) as store:
        pushed = push_run(store, tmp_path, 12)
    doc = None
    with CheckpointStore(store_url) as fresh:  # a cold reader, as the CLI is
        doc = head_doc(fresh)
        assert doc["schema_version"] == 2 and len(doc["segments"]) >= 3 and len(doc["checkpoints"]) <= 4
        assert [c.id for c in fresh.list()] == [c.id for c in pushed]
        assert fresh.get("best").id == pushed[3].id and fresh.get("latest").id == pushed[-1].id
        assert fresh.get(1).id == pushed[1].id and fresh.get(pushed[0].id) == pushed[0]
        pulled = fresh.pull(pushed[1].id, to=tmp_path / "out1")
        assert (pulled.path / "w.bin").read_bytes() == b"weights 1" * 50
        best = fresh.pull("best", to=tmp_path / "outb")
        assert best.entry.id == pushed[3].id and (best.path / "w.bin").read_bytes() == b"weights 3" * 50
        assert all(r.ok for r in fresh.verify(all=True)) and len(fresh.verify(all=True)) == 12


def test_gc_keeps_sealed_checkpoints_and_referenced_segments(store_url, tmp_path, small):
    with CheckpointStore(store_url) as store:
        push_run(store, tmp_path, 10)
        stray = segment_key("0" * 64)
        store.backend.write_bytes(stray, b"{}")  # a segment of a lost compare-and-swap
        before = {o.rel for o in store.backend.list_objects()}
        report = store.gc(min_age=0)
        assert report.deleted == [stray]
        assert {o.rel for o in store.backend.list_objects()} == before - {stray}
        assert all(r.ok for r in store.verify(all=True))


def sealed_object(store: CheckpointStore) -> str:
    return segment_key(head_doc(store)["segments"][0]["sha256"])


@pytest.mark.parametrize("damage", ["tamper", "remove"])
def test_a_missing_or_altered_segment_is_an_integrity_error(local_url, tmp_path, small, damage):
    with CheckpointStore(local_url) as store:
        pushed = push_run(store, tmp_path, 10)
        key = sealed_object(store)
    path = Path(local_url) / key
    if damage == "tamper":
        path.write_bytes(path.read_bytes().replace(b"w.bin", b"x.bin"))
    else:
        path.unlink()
    with CheckpointStore(local_url) as fresh:
        assert fresh.get("latest").id == pushed[-1].id  # the head alone still resolves
        for call in (fresh.list, lambda: fresh.get(pushed[0].id), lambda: fresh.gc(min_age=0),
                     lambda: fresh.verify(all=True)):
            with pytest.raises(IntegrityError, match="tampered|missing|does not hold"):
                call()
        assert (Path(local_url) / pushed[0].id).is_dir()  # gc refused: nothing deleted


def test_retention_reaches_into_segments_and_keeps_best_and_latest(store_url, tmp_path, small):
    with CheckpointStore(store_url) as store:
        pushed = push_run(store, tmp_path, 11)
        assert len(head_doc(store)["segments"]) >= 2  # the best and most of what goes are sealed
        pruned = store.prune(keep_best=1, keep_last=2)
        kept = [pushed[3].id, pushed[-2].id, pushed[-1].id]
        assert {c.id for c in pruned} == {c.id for c in pushed} - set(kept)
        assert [c.id for c in store.list()] == kept
        assert store.get("best").id == pushed[3].id and store.get("latest").id == pushed[-1].id
        assert not any(o.rel.startswith(pushed[0].id + "/") for o in store.backend.list_objects())
        assert all(r.ok for r in store.verify(all=True))


def test_an_index_of_the_earlier_format_is_read_then_converted(local_url, tmp_path, monkeypatch):
    with CheckpointStore(local_url) as store:
        pushed = push_run(store, tmp_path, 6)
        doc = head_doc(store)
    assert doc["schema_version"] == 1 and "segments" not in doc  # what cloudckpt before segments wrote and reads
    monkeypatch.setenv("CLOUDCKPT_INDEX_HEAD_MAX", "4")
    with CheckpointStore(local_url) as store:
        assert [c.id for c in store.list()] == [c.id for c in pushed]
        pushed += push_run(store, tmp_path / "more", 1)
        doc = head_doc(store)
        assert doc["schema_version"] == 2 and doc["segments"]
        assert [c.id for c in store.list()] == [c.id for c in pushed]


# --- the property: the pure changes over head + segments == retention over one plain list ---------------------------

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
keeps = st.tuples(st.none() | st.integers(0, 3), st.none() | st.integers(0, 12), st.none() | st.integers(1, 3))
push = st.tuples(st.just("push"), st.integers(0, 9), st.one_of(st.none(), st.floats(0, 3), st.sampled_from([1.0])),
                 st.integers(0, 9).map(lambda i: i == 0), st.sampled_from([None, None, None, "a", "b"]),
                 st.sampled_from([None, None, "min", "max"]),
                 st.just((None, None, None)) | st.just((None, None, None)) | keeps)
ops = st.lists(st.one_of(
    push, push, push, push, push,
    st.tuples(st.just("prune"), st.none() | st.integers(0, 3), st.none() | st.integers(0, 20),
              st.none() | st.integers(1, 3)),
    st.tuples(st.just("discard"), st.integers(0, 40)),
), min_size=8, max_size=60)


class Blobs:
    """Segment objects by digest, read back through the same check the store applies."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}

    def load(self, ref):
        return decode(ref, self.data[ref.sha256])

    def write(self, index: Index, change, sealing: Sealing) -> Index:
        for s in change.segments:
            self.data[s.ref.sha256] = s.data
        index, made = seal(change.index, sealing, self.load)
        for s in made:
            self.data[s.ref.sha256] = s.data
        return parse_index(dump(index))  # through the bytes, as a reader gets it


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=ops, head_max=st.integers(2, 5), segment_max=st.integers(1, 4))
def test_segments_prune_exactly_what_one_list_would(ops, head_max, segment_max):
    sealing, blobs = Sealing(head_max, segment_max), Blobs()
    index, model, run = Index(), [], Retention()
    for n, op in enumerate(ops):
        if op[0] == "push":
            _, epoch, value, pinned, monitor, mode, (kb, kl, ke) = op
            if kb is not None and not (monitor or run.monitor):
                kb = None
            entry = CheckpointEntry(id=f"ckpt-{n:04d}-{n:08x}", epoch=epoch, created=T0 + timedelta(seconds=n),
                                    metrics={} if value is None else {"a": value, "b": -value}, pinned=pinned,
                                    files=(FileEntry(path="w", size=1, crc32c="00000000"),), size=1)
            policy = Retention(monitor=monitor, mode=mode, keep_best=kb, keep_last=kl, keep_every=ke)
            run = policy.over(run)
            change = commit_checkpoint(index, entry, policy, prune=True, busy=frozenset(), load=blobs.load)
            model.append(entry)
            rules = run
        elif op[0] == "prune":
            _, kb, kl, ke = op
            keep = Retention(keep_best=kb if run.monitor else None, keep_last=kl, keep_every=ke)
            change = prune_checkpoints(index, keep if keep.keeps_some else None, busy=frozenset(), load=blobs.load)
            rules = Retention(monitor=run.monitor, mode=run.mode, keep_best=keep.keep_best, keep_last=kl,
                              keep_every=ke) if keep.keeps_some else run
        else:
            ids = {c.id for c in model[op[1]::3]}
            change = discard_checkpoints(index, ids, busy=frozenset(), load=blobs.load)
            rules = None
        best = best_of(tuple(model), run.objective)
        always = {model[-1].id, best} - {None} if model else set()
        if rules is None:
            gone = {c.id for c in model if c.id in ids and not c.pinned} - always
        else:
            gone = rules.plan([Record(c.id, c.epoch, c.step, c.metrics, c.pinned) for c in model], always=always)
        assert {c.id for c in change.pruned} == gone
        model = [c for c in model if c.id not in gone]
        if change.index is not None:
            index = blobs.write(index, change, sealing)
        view = full_view(index, blobs.load)
        assert [c.id for c in view.checkpoints] == [c.id for c in model]
        assert index.best == best_of(tuple(model), run.objective)
        assert index.latest == (model[-1].id if model else None)
        if model:
            assert index.resolve("best" if index.best else "latest").id in (index.best, index.latest)
            assert len(index.checkpoints) <= max(head_max, 1)


def test_the_bench_writes_runs_as_commits_leave_them(monkeypatch):
    """bench/index_scale.py writes big runs directly: the same head and segments as commit after commit."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent))
    from bench.index_scale import _entries, build_run

    sealing, blobs, index = Sealing(6, 7), {}, Index()
    for e in _entries(61):
        change = commit_checkpoint(index, e, Retention(monitor="val_loss"), prune=True, busy=frozenset(),
                                   load=lambda r: blobs[r.sha256])
        index, made = seal(change.index, sealing, lambda r: blobs[r.sha256])
        blobs.update({m.ref.sha256: m.entries for m in made})
    built, made = build_run(61, sealing)
    assert len(built.segments) > 1 and {m.ref.sha256 for m in made} == {r.sha256 for r in index.segments}
    assert dump(built) == dump(index.model_copy(update={"applied": (), "seq": built.seq}))
