"""Stateful exploration of multi-rank commits (issue 22): the coordinator's commit of a checkpoint several ranks
stored (:mod:`cloudckpt.distributed_commit`, the path of ``cloudckpt.torch.dcp``) among other writers' pushes,
prunes, claims and gc, one store call at a time.

A move ``dcp`` starts a save of 2-4 ranks coordinated by an explorer writer (:mod:`.dcp_op`): the job's first save
claims the run (a later claim by another writer fences this job: its commits raise StaleWriterError), every rank
uploads its own object through a store of its own, one rank may fail (it removes what it stored; nothing is
committed), and the coordinator commits ONE checkpoint. Every call of every rank parks, so hypothesis interleaves
the ranks' uploads and the commit with the other writers, loses answers (the commit's index write carried out,
unanswered), and kills the job at any call (a lost rank ends the whole job under torchrun; a new process takes
the writer's place). Beside the checks of :mod:`.explorer` after every step (nothing listed lacks an object, no
pruned id listed again, retention, fencing, one index change per op, no delete of a listed object), every listed
checkpoint VERIFIES after every step (its objects' bytes read back against the manifest's crc32c).

CI size: local 40 examples x 40 steps, local with gc beside (min_age 0 or its clock ahead: the commit of a save
gc condemned is refused) 40 x 40, S3 (moto) 4 x 25. ``CLOUDCKPT_EXPLORE_DCP=full`` (or ``--full``): 300 x 80,
300 x 80, 30 x 40; ``CLOUDCKPT_EXPLORE_DCP=<examples>x<steps>`` sets the local sizes.
"""

from __future__ import annotations

import os
import uuid

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import invariant, precondition, rule, run_state_machine_as_test

from cloudckpt.errors import CheckpointCondemnedError, StaleWriterError

from .dcp_op import RankFailed
from .explorer import Crash, Explorer
from .test_explore import CommitProtocol, GcProtocol, exploring  # noqa: F401 (a fixture)

DCP_KINDS = ["dcp", "dcp", "dcp", "push", "prune", "claim", "gc"]
DCP_GC_KINDS = ["dcp", "dcp", "dcp", "push", "prune", "claim", "gc", "gc"]
FAILING = st.sampled_from([None, None, None, None, 0, 1])  # mostly every rank stores; sometimes one fails


def _verify_listed(ex: Explorer | None) -> None:
    """Every listed checkpoint verifies now (read by the explorer's ungated reader)."""
    if ex is None or ex.broken or not ex.every_step:
        return
    try:
        results = ex.reader.verify(all=True)
    except Exception as exc:  # noqa: BLE001 - no index yet is the only acceptable reason
        if type(exc).__name__ != "CheckpointNotFoundError":
            ex.broken = True
            raise
        return
    bad = [r for r in results if not r.ok]
    if bad:
        ex.broken = True
    assert not bad, f"listed checkpoints fail to verify: {bad}"
    ex.figures["explore_dcp"]["verifies"] += 1


class DcpProtocol(CommitProtocol):
    """As :class:`CommitProtocol`, with multi-rank saves drawn most often."""

    @precondition(lambda self: self.ex is not None and self.ex.idle())
    @rule(pick=st.integers(0, 2), kind=st.sampled_from(DCP_KINDS), loss=st.integers(0, 9), ranks=st.integers(2, 4),
          failing=FAILING)
    def start(self, pick: int, kind: str, loss: int, ranks: int, failing: int | None) -> None:
        self.ex.start(pick, kind, loss / 10, ranks=ranks, failing=failing)

    @invariant()
    def listed_checkpoints_verify(self) -> None:
        _verify_listed(self.ex)


class DcpGcProtocol(GcProtocol):
    """As :class:`GcProtocol` (gc at any point beside the writers), with multi-rank saves."""

    @precondition(lambda self: self.ex is not None and self.ex.idle())
    @rule(pick=st.integers(0, 2), kind=st.sampled_from(DCP_GC_KINDS), loss=st.integers(0, 9),
          ranks=st.integers(2, 4), failing=FAILING)
    def start(self, pick: int, kind: str, loss: int, ranks: int, failing: int | None) -> None:
        self.ex.start(pick, kind, loss / 10, ranks=ranks, failing=failing)

    @invariant()
    def listed_checkpoints_verify(self) -> None:
        _verify_listed(self.ex)


def size(full: bool, ci: tuple[int, int], big: tuple[int, int]) -> tuple[int, int]:
    """(examples, steps): ``$CLOUDCKPT_EXPLORE_DCP`` = ``full`` or ``<examples>x<steps>``, else ``--full``, else CI."""
    knob = os.environ.get("CLOUDCKPT_EXPLORE_DCP", "")
    if knob == "full" or (full and not knob):
        return big
    if knob:
        examples, steps = knob.lower().split("x")
        return int(examples), int(steps)
    return ci


def _explore(base, new_url, opts: dict, *, aging: bool, gc_live: bool, examples: int, steps: int, figures):
    before = dict(figures["explore_outcomes"])
    machine = type("DcpMachine", (base,), {"new_url": staticmethod(new_url), "opts": opts, "aging": aging,
                                           "figures": figures, "gc_live": gc_live})
    run_state_machine_as_test(machine, settings=settings(
        max_examples=examples, stateful_step_count=steps, deadline=None, database=None, print_blob=True,
        suppress_health_check=list(HealthCheck)))
    return {k: v - before.get(k, 0) for k, v in figures["explore_outcomes"].items() if v > before.get(k, 0)}


def test_explore_dcp_local(tmp_path, exploring, full, figures):  # noqa: F811
    examples, steps = size(full, (40, 40), (300, 80))
    seen = _explore(DcpProtocol, lambda: str(tmp_path / uuid.uuid4().hex / "run"), {"fsync": False}, aging=True,
                    gc_live=False, examples=examples, steps=steps, figures=figures)
    assert seen.get("dcp/ok", 0) > 0 and seen.get("dcp/Crash", 0) > 0, seen  # commits and lost ranks explored


def test_explore_dcp_gc_local(tmp_path, exploring, full, figures):  # noqa: F811
    examples, steps = size(full, (40, 40), (300, 80))
    seen = _explore(DcpGcProtocol, lambda: str(tmp_path / uuid.uuid4().hex / "run"), {"fsync": False},
                    aging=False, gc_live=True, examples=examples, steps=steps, figures=figures)
    assert seen.get("dcp/ok", 0) > 0 and sum(v for k, v in seen.items() if k.startswith("gc")) > 0, seen


def test_explore_dcp_s3(s3_url, exploring, full, figures):  # noqa: F811
    examples, steps = (30, 40) if full or os.environ.get("CLOUDCKPT_EXPLORE_DCP") == "full" else (4, 25)
    seen = _explore(DcpProtocol, lambda: f"{s3_url}/{uuid.uuid4().hex}", {}, aging=False, gc_live=False,
                    examples=examples, steps=steps, figures=figures)
    assert seen.get("dcp/ok", 0) > 0, seen


# --- directed interleavings of the same moves ---------------------------------------------------------------------

@pytest.fixture
def scripted(tmp_path, exploring, figures):  # noqa: F811
    ex = Explorer(str(tmp_path / "run"), {"fsync": False}, 2, 1, aging=True, work=tmp_path / "work", figures=figures)
    yield ex
    ex.close()


@pytest.fixture
def scripted_gc(tmp_path, exploring, figures):  # noqa: F811
    ex = Explorer(str(tmp_path / "run"), {"fsync": False}, 2, 1, aging=False, work=tmp_path / "work", figures=figures,
                  gc_live=True)
    yield ex
    ex.close()


def _save(ex: Explorer, w, loss: float, **kw) -> None:
    ex.begin(w, "dcp", loss, **kw)
    ex.run(w)


def test_an_older_job_is_fenced_at_its_next_commit(scripted):
    """w0's job saved once (its claim); w1's job claims and saves; w0's next save stores its ranks' objects and
    is refused at the commit: nothing of it is listed, gc removes it."""
    w0, w1 = scripted.writers
    _save(scripted, w0, 0.5, ranks=3)
    assert w0.op.error is None
    _save(scripted, w1, 0.6, ranks=2)
    assert w1.op.error is None
    _save(scripted, w0, 0.1, ranks=2)
    assert isinstance(w0.op.error, StaleWriterError), w0.op.error
    assert w0.op.cids and not w0.op.cids & {c.id for c in scripted.reader.list()}
    scripted.finish()


def test_a_rank_lost_at_its_upload_leaves_the_previous_checkpoint(scripted):
    w0, _ = scripted.writers
    _save(scripted, w0, 0.5, ranks=2)
    first = w0.op.result.id
    scripted.begin(w0, "dcp", 0.1, ranks=4)
    for _ in range(2):  # two ranks' uploads go through ...
        scripted.run(w0, until="upload")
        scripted.move(w0, "go")
    scripted.run(w0, until="upload")
    scripted.move(w0, "crash")  # ... the third rank dies: torchrun ends the job
    assert isinstance(w0.op.error, Crash)
    assert [c.id for c in scripted.reader.list()] == [first]
    scripted.finish()  # gc leaves exactly what is listed; every listed checkpoint verifies


def test_a_failing_rank_commits_nothing(scripted):
    w0, _ = scripted.writers
    _save(scripted, w0, 0.5, ranks=3, failing=1)
    assert isinstance(w0.op.error, RankFailed)
    assert w0.op.cids and not w0.op.cids & {c.id for c in scripted.reader.list()}
    scripted.finish()


def test_gc_condemning_a_save_parked_before_its_commit_refuses_the_commit(scripted_gc):
    """Every rank stored and the coordinator is about to swap the index; gc (min_age 0) runs to its end: the
    commit is refused (it would list objects gc deleted), the earlier checkpoint stays."""
    ex = scripted_gc
    w0, w1 = ex.writers
    _save(ex, w0, 0.5, ranks=2)
    first = w0.op.result.id
    ex.begin(w0, "dcp", 0.4, ranks=3)
    ex.run(w0, until="write_bytes")  # the manifest: every rank's object and the metadata stored
    ex.begin(w1, "gc", 0.0)
    ex.run(w1)
    assert w1.op.error is None and w1.op.result.condemned, w1.op
    ex.run(w0)
    assert isinstance(w0.op.error, CheckpointCondemnedError), w0.op.error
    assert [c.id for c in ex.reader.list()] == [first]
    ex.finish()


def test_a_lost_commit_answer_is_acknowledged_once(scripted):
    w0, _ = scripted.writers
    scripted.begin(w0, "dcp", 0.5, ranks=2)
    scripted.run(w0, until="write_index")
    scripted.move(w0, "go")  # the job's claim
    scripted.run(w0, until="write_index")
    scripted.lose_index_write(0)  # the commit: carried out, unanswered
    scripted.run(w0)
    assert w0.op.error is None and [c.id for c in scripted.reader.list()] == [w0.op.result.id]
    scripted.finish()
