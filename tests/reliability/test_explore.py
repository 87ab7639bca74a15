"""Stateful exploration of the commit protocol: 2-3 writers on one real run, interleaved one store call at a time.

Hypothesis picks the moves (:class:`CommitProtocol`): a writer starts a push (keep-last 1 or 2, keep-best 1), a
prune, a claim or a gc; or a busy writer's parked store call goes through, loses its answer, is dropped, or the
writer crashes there (at failpoints too) and a new process takes its place. :mod:`.explorer` checks every promise
after every step; failures shrink to a short interleaving, kept below as regression tests. CI size: local 40
examples x 40 steps, S3 (moto) 5 x 25; ``--full``: local 600 x 80, S3 60 x 40.

The gc variants (``test_explore_gc_*``, issue 21 items 5-6) let gc run at any point beside the writers — min_age 0
or its clock two hours ahead — with index segments of 2 and two-file pushes. CI size: local 40 x 40, S3 4 x 25;
``--full`` or ``CLOUDCKPT_EXPLORE_GC=full``: local 400 x 80, S3 40 x 40 (``CLOUDCKPT_EXPLORE_GC=<examples>x<steps>``
sets both sizes).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import types
import uuid
from pathlib import Path
from typing import ClassVar

import pytest
import tenacity
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    precondition,
    rule,
    run_state_machine_as_test,
)

from cloudckpt import failpoints

from .explorer import Explorer, failpoint

DECISIONS = ["go"] * 5 + ["lost", "lost", "lost", "drop", "crash", "crash_after"]
KINDS = ["push", "push", "push", "push", "prune", "claim", "gc"]


class CommitProtocol(RuleBasedStateMachine):
    """Moves of the writers; the run's URL and options come from the subclass made by :func:`explore`."""

    new_url = staticmethod(lambda: "")
    opts: ClassVar[dict] = {}
    aging = True
    gc_live = False
    figures: ClassVar[dict] = {}

    def __init__(self) -> None:
        super().__init__()
        self.ex: Explorer | None = None
        self.work = Path(tempfile.mkdtemp(prefix="explore-"))

    @initialize(writers=st.integers(2, 3), keep_last=st.integers(1, 2))
    def setup(self, writers: int, keep_last: int) -> None:
        self.ex = Explorer(self.new_url(), self.opts, writers, keep_last, aging=self.aging, work=self.work,
                           figures=self.figures, gc_live=self.gc_live)

    @precondition(lambda self: self.ex is not None and self.ex.idle())
    @rule(pick=st.integers(0, 2), kind=st.sampled_from(KINDS), loss=st.integers(0, 9))
    def start(self, pick: int, kind: str, loss: int) -> None:
        self.ex.start(pick, kind, loss / 10)

    @precondition(lambda self: self.ex is not None and self.ex.busy())
    @rule(pick=st.integers(0, 2), decision=st.sampled_from(DECISIONS))
    def step(self, pick: int, decision: str) -> None:
        self.ex.step(pick, decision)

    @precondition(lambda self: self.ex is not None and self.ex.busy())
    @rule(pick=st.integers(0, 2))
    def hop(self, pick: int) -> None:
        self.ex.hop(pick)

    @precondition(lambda self: self.ex is not None and self.ex.at_index_write())
    @rule(pick=st.integers(0, 2))
    def lose_index_write(self, pick: int) -> None:
        self.ex.lose_index_write(pick)

    def teardown(self) -> None:
        try:
            if self.ex is not None:
                self.ex.finish()
        finally:
            if self.ex is not None:
                self.ex.close()
            shutil.rmtree(self.work, ignore_errors=True)


@pytest.fixture
def exploring(monkeypatch):
    """Failpoints park the writer instead of killing the process; retries don't sleep (time is not the point)."""
    monkeypatch.setattr(failpoints, "hit", failpoint)
    monkeypatch.setattr(tenacity.nap, "time", types.SimpleNamespace(sleep=lambda s: None))


def explore(new_url, opts: dict, *, aging: bool, examples: int, steps: int, figures,
            gc_live: bool = False) -> dict[str, int]:
    """Run the state machine (its invariants are checked after every step); return the outcomes it saw, by kind."""
    before = dict(figures["explore_outcomes"])
    machine = type("Machine", (CommitProtocol,), {"new_url": staticmethod(new_url), "opts": opts, "aging": aging,
                                                        "figures": figures, "gc_live": gc_live})
    run_state_machine_as_test(machine, settings=settings(
        max_examples=examples, stateful_step_count=steps, deadline=None, database=None, print_blob=True,
        suppress_health_check=list(HealthCheck)))
    return {k: v - before.get(k, 0) for k, v in figures["explore_outcomes"].items() if v > before.get(k, 0)}


@pytest.fixture
def scripted(tmp_path, exploring, figures):
    """An explorer of 2 writers (keep-last 1) on a local run, for the shrunk interleavings below."""
    ex = Explorer(str(tmp_path / "run"), {"fsync": False}, 2, 1, aging=True, work=tmp_path / "work", figures=figures)
    yield ex
    ex.close()


def _push_through(ex: Explorer, w, loss: float) -> None:
    ex.begin(w, "push", loss)
    ex.run(w)
    assert w.op.error is None, w.op.error


# --- what the exploration found on the code before the fix, shrunk ----------------------------------------------

def test_shrunk_lost_commit_answer_leaves_what_it_pruned(scripted):
    """w0 commits twice with keep-last 1; the second index write's answer is lost. Before: the retry found its id
    listed and returned, the first checkpoint's objects were left to gc."""
    w0, _ = scripted.writers
    _push_through(scripted, w0, 0.5)
    scripted.begin(w0, "push", 0.4)
    scripted.run(w0, until="write_index")
    scripted.lose_index_write(0)
    scripted.run(w0)
    assert w0.op.error is None  # acknowledged: the retry found its own write
    scripted.finish()  # asserts the run: every listed object present, the pruned first checkpoint's objects gone


def test_shrunk_lost_commit_answer_then_other_writer_prunes_it(scripted):
    """w0's commit of X is written, its answer lost; w1 commits Y, pruning X; w0 retries. Before: X was listed
    again (its objects already deleted by w1) and Y pruned."""
    w0, w1 = scripted.writers
    scripted.begin(w0, "push", 0.5)
    scripted.run(w0, until="write_index")
    scripted.lose_index_write(0)
    _push_through(scripted, w1, 0.4)  # better than X: nothing keeps X
    scripted.run(w0)
    assert w0.op.error is None  # acknowledged: committed, then pruned by w1's retention
    scripted.finish()


def test_shrunk_lost_claim_answer_then_newer_claim(scripted):
    """w0's claim is written, its answer lost; w1 claims; w0 retries. Before: w0 claimed again and fenced w1."""
    w0, w1 = scripted.writers
    _push_through(scripted, w1, 0.5)
    scripted.begin(w0, "claim")
    scripted.run(w0, until="write_index")
    scripted.lose_index_write(0)
    scripted.begin(w1, "claim")
    scripted.run(w1)
    scripted.run(w0)
    _push_through(scripted, w1, 0.7)  # the newer claimer still commits
    scripted.begin(w0, "push", 0.1)
    scripted.run(w0)
    assert type(w0.op.error).__name__ == "StaleWriterError"
    scripted.finish()


def test_explore_local(tmp_path, exploring, full, figures):
    seen = explore(lambda: str(tmp_path / uuid.uuid4().hex / "run"), {"fsync": False}, aging=True,
                   examples=600 if full else 40, steps=80 if full else 40, figures=figures)
    assert seen.get("push/ok", 0) > 0 and seen.get("push/Crash", 0) > 0, seen  # commits and crashes both explored


def test_explore_s3(s3_url, exploring, full, figures):
    seen = explore(lambda: f"{s3_url}/{uuid.uuid4().hex}", {}, aging=False,
                   examples=60 if full else 5, steps=40 if full else 25, figures=figures)
    assert seen.get("push/ok", 0) > 0, seen  # the invariants held over explored runs that did commit


# --- gc beside live writers (issue 21 items 5-6) -------------------------------------------------------------------

GC_KINDS = ["push", "push", "push", "push", "prune", "claim", "gc", "gc"]


class GcProtocol(CommitProtocol):
    """As :class:`CommitProtocol`, gc drawn twice as often."""

    @precondition(lambda self: self.ex is not None and self.ex.idle())
    @rule(pick=st.integers(0, 2), kind=st.sampled_from(GC_KINDS), loss=st.integers(0, 9))
    def start(self, pick: int, kind: str, loss: int) -> None:
        self.ex.start(pick, kind, loss / 10)

    @precondition(lambda self: self.ex is not None and self.ex.idle() and self.ex.busy())
    @rule(pick=st.integers(0, 2), skew=st.booleans(), until_delete=st.booleans())
    def gc_beside(self, pick: int, skew: bool, until_delete: bool) -> None:
        """While another writer is midway through its op: a gc runs to its end, or until its delete (which then
        waits while the others go on)."""
        self.ex.gc_beside(pick, skew=skew, until_delete=until_delete)


def gc_size(full: bool, ci: tuple[int, int], big: tuple[int, int]) -> tuple[int, int]:
    """(examples, steps): ``$CLOUDCKPT_EXPLORE_GC`` = ``full`` or ``<examples>x<steps>``, else ``--full``, else CI."""
    knob = os.environ.get("CLOUDCKPT_EXPLORE_GC", "")
    if knob == "full" or (full and not knob):
        return big
    if knob:
        examples, steps = knob.lower().split("x")
        return int(examples), int(steps)
    return ci


def explore_gc(new_url, opts: dict, *, examples: int, steps: int, figures) -> dict[str, int]:
    before = dict(figures["explore_outcomes"])
    machine = type("GcMachine", (GcProtocol,), {"new_url": staticmethod(new_url), "opts": opts, "aging": False,
                                                "figures": figures, "gc_live": True})
    run_state_machine_as_test(machine, settings=settings(
        max_examples=examples, stateful_step_count=steps, deadline=None, database=None, print_blob=True,
        suppress_health_check=list(HealthCheck)))
    return {k: v - before.get(k, 0) for k, v in figures["explore_outcomes"].items() if v > before.get(k, 0)}


def test_explore_gc_local(tmp_path, exploring, full, figures):
    examples, steps = gc_size(full, (40, 40), (400, 80))
    seen = explore_gc(lambda: str(tmp_path / uuid.uuid4().hex / "run"), {"fsync": False}, examples=examples,
                      steps=steps, figures=figures)
    assert seen.get("push/ok", 0) > 0 and sum(v for k, v in seen.items() if k.startswith("gc")) > 0, seen


def test_explore_gc_s3(s3_url, exploring, full, figures):
    examples, steps = gc_size(full, (4, 25), (40, 40))
    seen = explore_gc(lambda: f"{s3_url}/{uuid.uuid4().hex}", {}, examples=examples, steps=steps, figures=figures)
    assert seen.get("push/ok", 0) > 0, seen


@pytest.fixture
def scripted_gc(tmp_path, exploring, figures):
    """An explorer of 2 writers with gc beside them (index segments of 2, keep-last 3), on a local run."""
    ex = Explorer(str(tmp_path / "run"), {"fsync": False}, 2, 1, aging=False, work=tmp_path / "work", figures=figures,
                  gc_live=True)
    yield ex
    ex.close()


def test_scripted_gc_condemns_a_push_parked_before_its_commit(scripted_gc):
    """w0 uploaded both files and its manifest and is about to swap the index; w1's gc (min_age 0) runs to its end.
    Before the fix gc deleted w0's objects and w0's commit then listed them."""
    ex = scripted_gc
    w0, w1 = ex.writers
    _push_through(ex, w0, 0.5)
    ex.begin(w0, "push", 0.4)
    ex.run(w0, until="write_index")
    ex.begin(w1, "gc", 0.0)
    ex.run(w1)
    assert w1.op.error is None and w1.op.result.condemned, w1.op
    ex.run(w0)
    assert w0.op.error is None  # uploaded again under a new id, then committed
    ex.finish()


def test_scripted_gc_condemns_a_segment_sealed_before_its_swap(scripted_gc):
    """w0 wrote a new sealed segment and is about to swap in the head referencing it; gc runs to its end, then a
    writer pushes again. Before the fix the swap referenced the segment gc had deleted."""
    ex = scripted_gc
    w0, w1 = ex.writers
    for loss in (0.9, 0.8, 0.7, 0.6):
        _push_through(ex, w0, loss)
        if any(k.startswith("_cloudckpt_index/") for k in {o.rel for o in ex.real.list_objects()}):
            break
    ex.begin(w0, "push", 0.5)
    for _ in range(50):  # to the index write that follows a segment write
        ex.run(w0, until="write_bytes")
        sealing = str(w0.parked[1][0]).startswith("_cloudckpt_index/")
        ex.move(w0, "go")
        if sealing:
            break
    ex.run(w0, until="write_index")
    ex.begin(w1, "gc", 0.0)
    ex.run(w1, until="delete")  # gc's condemn landed; its delete waits
    ex.run(w0)  # re-seals: the same checkpoints, so the same digest but for the fix's fresh nonce
    assert w0.op.error is None
    ex.run(w1)
    assert w1.op.error is None and any(n.startswith("_cloudckpt_index/") for n in w1.op.result.condemned), w1.op
    _push_through(ex, w1, 0.45)
    ex.finish()
