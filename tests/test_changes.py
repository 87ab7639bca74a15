"""The index changes (cloudckpt/changes.py) and the run layout (cloudckpt/layout.py): pure, no store needed."""

from __future__ import annotations

import pytest

from cloudckpt import layout
from cloudckpt.changes import commit_checkpoint, prune_checkpoints
from cloudckpt.manifest import CheckpointEntry, FileEntry, Index, RunPolicy, utcnow
from cloudckpt.retention import Objective, Retention
from cloudckpt.store import BusySet


def entry(epoch: int, loss: float | None = None) -> CheckpointEntry:
    return CheckpointEntry(id=layout.new_checkpoint_id(epoch, None), epoch=epoch, created=utcnow(),
                           metrics={} if loss is None else {"loss": loss},
                           files=(FileEntry(path="w.bin", size=1, crc32c="00000000"),), size=1)


def test_a_commit_returns_the_new_index_and_exactly_what_it_pruned():
    index = Index()
    a, b, c = entry(1, 0.1), entry(2, 0.5), entry(3, 0.9)
    for e in (a, b):
        index = commit_checkpoint(index, e, Retention(monitor="loss", keep_last=1), prune=True,
                                  busy=frozenset()).index or index
    assert [x.id for x in index.checkpoints] == [a.id, b.id]  # a is the best, b the latest
    change = commit_checkpoint(index, c, Retention(), prune=True, busy=frozenset())
    assert change.index is not None and change.pruned == (b,)
    assert [x.id for x in change.index.checkpoints] == [a.id, c.id]
    held = commit_checkpoint(index, c, Retention(), prune=True, busy={b.id})
    assert held.pruned == () and held.index is not None and len(held.index.checkpoints) == 3
    assert commit_checkpoint(change.index, c, Retention(), prune=True, busy=frozenset()).index is None  # already in


def test_prune_rules_replace_the_runs_keep_settings_and_the_run_still_ranks():
    es = [entry(i, loss) for i, loss in enumerate((0.9, 0.1, 0.5, 0.7), start=1)]
    index = Index(run=RunPolicy(monitor="loss", keep_best=2)).with_checkpoint(es[0])
    for e in es[1:]:
        index = index.with_checkpoint(e)
    assert prune_checkpoints(index, None, busy=frozenset()).pruned == (es[0],)
    only_last = prune_checkpoints(index, Retention(keep_last=1), busy=frozenset())
    assert only_last.pruned == (es[0], es[2])  # the best (0.1) and the latest stay; the run's keep_best=2 is off
    assert prune_checkpoints(Index(), None, busy=frozenset()).index is None


def test_one_definition_of_better():
    lower, higher = Objective("loss", "min"), Objective("acc", "max")
    assert lower.better(0.1, 0.2) and not lower.better(0.2, 0.2) and lower.better(0.3, None)
    assert higher.better(0.9, 0.5) and not higher.better(float("nan"), 0.5) and not higher.better(None, None)
    assert lower.ranked([{"loss": 0.2}, {"loss": 0.1}, {}, {"loss": 0.1}], lambda m: m) == [{"loss": 0.1}] * 2 + [
        {"loss": 0.2}]
    with pytest.raises(ValueError):
        Objective("loss", "lowest")  # type: ignore[arg-type]


def test_generated_ids_have_the_shape_gc_and_the_index_accept():
    for epoch, step in ((None, None), (3, None), (None, 7), (12, 345)):
        cid = layout.new_checkpoint_id(epoch, step)
        assert layout.is_generated_id(cid) and layout.is_checkpoint_id(cid)
    for name in layout.RESERVED_IDS:
        assert not layout.is_checkpoint_id(name)
    assert layout.checkpoint_keys("c", ["a", "b/c"]) == ["c/a", "c/b/c", f"c/{layout.MANIFEST_NAME}"]


def test_the_local_store_locks_a_reserved_name(tmp_path):
    from cloudckpt.backends.local import LocalBackend

    backend = LocalBackend(str(tmp_path))
    backend.write_index(b"{}", None)
    assert (tmp_path / layout.LOCK_NAME).exists() and layout.LOCK_NAME in layout.RESERVED_IDS
    assert [o.rel for o in backend.list_objects()] == [layout.INDEX_NAME]


def test_the_busy_set_holds_an_id_until_its_last_holder_leaves():
    busy = BusySet()
    with busy.holding("a"):
        with busy.holding("a"):
            pass
        assert busy.ids() == {"a"}  # a second pull of the same checkpoint ending doesn't expose the first one
    assert busy.ids() == frozenset()
