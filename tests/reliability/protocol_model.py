"""What the run may look like after each step of :mod:`.explorer`, and the promises checked on every transition.

From the store itself (read by a separate, ungated backend): the index parses; every listed checkpoint's objects
exist; a removed id is never listed again; every removal is one retention allows (so an acknowledged commit
disappears only by retention); latest is the last commit and best the best ever committed; each operation changes
the index at most once (an update is never applied twice); a writer whose lease was superseded never changes the
index; no delete (gc's included) names a listed object; a push or prune that returned has deleted what its index
write pruned; a push that returned was listed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cloudckpt.manifest import Index, best_of
from cloudckpt.retention import Record, plan_prune

from .invariants import listed_objects

if TYPE_CHECKING:
    from .explorer import Op, Writer


def _listing(index: Index) -> dict:
    """What an index says of the run, without gc's protocol records (condemned, reserved) and the write's stamp."""
    return index.model_dump(exclude={"condemned", "horizon", "reserved", "seq", "applied", "schema_version"})


def _records(index: Index, entries) -> list[Record]:
    return [Record(c.id, c.epoch, c.step, c.metrics, c.pinned) for c in entries]


class Model:
    """What the run may look like next, learnt from what was observed so far; asserts on every transition."""

    def __init__(self) -> None:
        self.index: Index | None = None
        self.ever_added: set[str] = set()
        self.ever_removed: set[str] = set()
        self.last_added: str | None = None
        self.best: tuple[float, str] | None = None
        self.acked: set[str] = set()
        self.refs: set[str] = set()  # the segment keys the index references now (the explorer sets them)

    def transition(self, new: Index | None, by: Writer, call: str | None, lease: Any = None) -> None:
        """``new`` is the index after ``by``'s ``call`` (None: the op's start), made holding ``lease``."""
        old = self.index
        if new is None:
            assert old is None, "the index disappeared"
            return
        if old is not None and new == old:
            return
        assert call == "write_index", f"the index changed during {call!r} of {by and by.name}"
        if old is not None and _listing(new) == _listing(old):
            self.index = new  # gc condemned, or a push reserved its id: nothing listed changed
            return
        o_ids = [c.id for c in old.checkpoints] if old else []
        n_ids = [c.id for c in new.checkpoints]
        added = [i for i in n_ids if i not in o_ids]
        removed = [i for i in o_ids if i not in n_ids]
        assert not set(added) & self.ever_removed, f"{by.name} listed again the pruned {set(added) & self.ever_removed}"
        assert len(added) <= 1 and n_ids == [i for i in o_ids if i not in removed] + added, (o_ids, n_ids)
        if lease is not None and old is not None:
            assert old.writer is not None and (old.writer.id, old.writer.generation) == (lease.id, lease.generation), \
                f"{by.name} (generation {lease.generation}) wrote after {old.writer} superseded it"
        if removed:
            merged = (old.checkpoints if old else ()) + tuple(new.get(i) for i in added)
            run = new.run
            policy = run.retention.policy()
            always = {merged[-1].id if added else old.latest, best_of(merged, run.retention.objective)} - {None}
            allowed = plan_prune(_records(new, merged), policy, always=always)
            assert set(removed) <= allowed, f"{by.name} removed {set(removed) - allowed}, which retention keeps"
        by.op.removed |= set(removed)
        by.op.writes += 1
        assert by.op.writes <= by.op.updates, f"{by.name}'s {by.op.kind} was applied {by.op.writes} times"
        self.ever_added |= set(added)
        self.ever_removed |= set(removed)
        for cid in added:
            self.last_added = cid
            entry = new.get(cid)
            value = entry.metrics.get(new.run.monitor or "")
            if value is not None and (self.best is None or value < self.best[0]):
                self.best = (value, cid)
        if new.checkpoints:
            assert new.latest == self.last_added, f"latest is {new.latest}, the last commit was {self.last_added}"
            if self.best is not None:
                assert new.best == self.best[1], f"best is {new.best}, the best ever committed is {self.best}"
        self.index = new

    def check_objects(self, stored: set[str]) -> None:
        if self.index is not None:
            missing = (listed_objects(self.index) | self.refs) - stored
            assert not missing, f"listed objects are missing: {sorted(missing)}"

    def check_delete(self, rels: list[str], by: Writer) -> None:
        if self.index is not None:
            hit = set(rels) & (listed_objects(self.index) | self.refs)
            assert not hit, f"{by.name} ({by.op.kind}) deletes listed objects {sorted(hit)}"

    def check_finished(self, op: Op, stored: set[str]) -> None:
        if op.error is not None:
            return
        left = {rel for rel in stored if rel.split("/", 1)[0] in op.removed}
        assert not left, f"a {op.kind} that returned left what it pruned to gc: {sorted(left)}"
        if op.kind in ("push", "dcp"):
            assert op.result.id in self.ever_added, f"{op.kind} of {op.result.id} returned but was never listed"
            self.acked.add(op.result.id)
