"""Drive 2-3 writers of one real run one backend call at a time, with lost answers, drops and crashes.

Each writer is a real :class:`~cloudckpt.CheckpointStore` (its own index-keeper session, as a separate process
would have) whose backend is wrapped by :class:`Gated`: every call to the store (index read/write, upload, manifest
write, listing, delete) and every failpoint (:mod:`cloudckpt.failpoints`) parks the writer's thread until the
explorer lets it through with a decision — ``go``; ``lost`` (the call is carried out, then a ConnectionError);
``drop`` (a ConnectionError before the call); ``crash`` / ``crash_after`` (the writer dies before / after the call,
as SIGKILL would leave it). Only one thread runs at a time, so an interleaving is a sequence of (writer, decision)
and replays exactly; :mod:`.test_explore` lets hypothesis choose and shrink it.

After every step the explorer looks at the store itself (a separate, ungated backend) and
:class:`~.protocol_model.Model` checks what it sees: the whole run (sealed segments read back), every listed
checkpoint's objects and every referenced segment present.

With ``gc_live`` (issue 21 items 5-6), gc runs at any point between the writers' store calls — between the files of
a push, between a sealed segment's write and the swap referencing it — with ``min_age`` 0 or with its clock two
hours ahead (everything looks old to it: a slow upload, a skewed clock), the index head holds 2 checkpoints and a
segment 2 (sealing on most commits), and a push has two files. A push gc condemned uploads again under a new id.
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cloudckpt import CheckpointStore, StaleWriterError
from cloudckpt.backends import open_backend
from cloudckpt.errors import CheckpointCondemnedError, CheckpointNotFoundError
from cloudckpt.layout import segment_key
from cloudckpt.manifest import parse_index
from cloudckpt.segments import Sealing, full_view
from cloudckpt.sweep import collect

from .dcp_op import RankFailed, distributed_save, gated_store
from .invariants import check_run, listed_objects
from .protocol_model import Model

GATED = {"read_index", "write_index", "upload", "download", "read_bytes", "write_bytes", "list_objects", "delete"}
WRITES = {"write_index", "write_bytes", "upload", "delete"}
FAULTS_PER_OP = 3  # lost/dropped calls per operation: fewer than any retry loop's attempts, so ops can finish
FAULTY = {"write_index", "delete", "write_bytes"}  # where lost answers matter to the protocol (others: just retried)
STOPS = {"write_index", "delete"}  # where a hop stops: the moves of the protocol
GC_MIN_AGE = 3600.0  # local runs: gc keeps anything younger; leftovers of finished or dead ops are aged past it
GC_SKEW = 2 * 3600.0  # gc_live: a gc whose clock runs this far ahead (with the default min_age)
LIVE_SEALING = Sealing(head_max=2, segment_max=2)  # gc_live: seal on most commits
STEP_TIMEOUT = 60.0

_BY_THREAD: dict[int, Writer] = {}  # op thread -> writer, for failpoints


class Crash(BaseException):
    """The writer's process died here: nothing of it runs after this point."""


def failpoint(name: str) -> None:
    """Stands in for :func:`cloudckpt.failpoints.hit` while exploring: a failpoint is one more place to park."""
    w = _BY_THREAD.get(threading.get_ident())
    if w is not None:
        w.through(f"failpoint:{name}", (), lambda: None)


class Gated:
    """Proxy to a real backend: each store call parks until the explorer decides how it goes."""

    def __init__(self, real: Any, writer: Writer) -> None:
        self._real = real
        self._writer = writer

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._real, name)
        if name not in GATED:
            return attr
        return lambda *args, **kwargs: self._writer.through(name, args, lambda: attr(*args, **kwargs))


@dataclass
class Op:
    kind: str
    result: Any = None
    error: BaseException | None = None
    faults: int = 0
    cids: set[str] = field(default_factory=set)  # checkpoint ids this op stored objects under
    removed: set[str] = field(default_factory=set)  # ids its index writes took out of the index
    writes: int = 0  # index writes of this op that changed the index: one at most (an update is applied once)
    updates: int = 1  # the updates the op makes (a job's first multi-rank save: its claim, then its commit)


class Writer:
    """One writer: a store of its own, a thread per operation, parked at every store call."""

    def __init__(self, name: str, url: str, opts: dict, sealing: Sealing | None = None) -> None:
        self.name = name
        self.store = CheckpointStore(url, budget=30, workers=1, **opts)
        self.store.backend = self.store.keeper.backend = Gated(self.store.backend, self)  # type: ignore[assignment]
        if sealing is not None:
            self.store.keeper.sealing = sealing
        self.cv = threading.Condition()
        self.ticket = 0
        self.parked: tuple[str, tuple] | None = None
        self.decision: str | None = None
        self.dead = False
        self.done = True
        self.op: Op | None = None

    # --- the writer's side -----------------------------------------------------------------------------------

    def through(self, name: str, args: tuple, call) -> Any:
        with self.cv:
            if self.dead:
                raise Crash()
            self.parked = (name, args)
            self.ticket += 1
            self.cv.notify_all()
            self.cv.wait_for(lambda: self.decision is not None or self.dead)
            if self.dead:
                raise Crash()
            decision, self.decision, self.parked = self.decision, None, None
            if decision in ("crash", "crash_after") and (decision == "crash" or name not in WRITES):
                self.dead = True
                raise Crash()
        if decision == "drop" or (decision == "lost" and name not in WRITES):
            raise ConnectionError(f"injected: {name} dropped")
        result = call()
        if decision == "crash_after":
            with self.cv:
                self.dead = True
            raise Crash()
        if decision == "lost":
            raise ConnectionError(f"injected: the answer to {name} was lost")
        return result

    # --- the explorer's side ---------------------------------------------------------------------------------

    def start(self, kind: str, fn, updates: int = 1) -> None:
        self.op, self.done = Op(kind, updates=updates), False

        def run() -> None:
            _BY_THREAD[threading.get_ident()] = self
            try:
                self.op.result = fn()
            except BaseException as exc:  # noqa: BLE001 - Crash included: how the op ended is what is recorded
                self.op.error = exc
            finally:
                _BY_THREAD.pop(threading.get_ident(), None)
                with self.cv:
                    self.done = True
                    self.cv.notify_all()

        with self.cv:
            ticket = self.ticket
        threading.Thread(target=run, daemon=True, name=f"explore-{self.name}").start()
        self._wait(ticket)

    def advance(self, decision: str) -> None:
        with self.cv:
            ticket = self.ticket
            self.decision = decision
            self.cv.notify_all()
        self._wait(ticket)

    def _wait(self, ticket: int) -> None:
        with self.cv:
            ok = self.cv.wait_for(lambda: self.ticket > ticket or self.done, timeout=STEP_TIMEOUT)
        assert ok, f"writer {self.name} neither reached the store nor finished within {STEP_TIMEOUT}s"

    def kill(self) -> None:
        with self.cv:
            self.dead = True
            self.cv.notify_all()
        with self.cv:
            self.cv.wait_for(lambda: self.done, timeout=STEP_TIMEOUT)
        self.store.close()


EXPECTED_ERRORS = (Crash, StaleWriterError, CheckpointNotFoundError, CheckpointCondemnedError, RankFailed)


class Explorer:
    """A run, its writers and the model; :meth:`start` and :meth:`step` are the moves hypothesis picks from."""

    def __init__(self, url: str, opts: dict, writers: int, keep_last: int, *, aging: bool, work: Path,
                 figures: dict[str, Counter], gc_live: bool = False) -> None:
        self.url, self.opts, self.aging, self.work, self.figures = url, opts, aging, work, figures
        self.keep_last = keep_last + 2 if gc_live else keep_last  # gc_live: a head of 3-5 before sealing to 1
        self.gc_live = gc_live
        self.sealing = LIVE_SEALING if gc_live else None
        self.real = open_backend(url, dict(opts))
        self.reader = CheckpointStore(url, budget=30, **opts)  # reads sealed segments for the checks (ungated)
        self.writers = [Writer(f"w{i}", url, opts, self.sealing) for i in range(writers)]
        self.restarts = 0
        self.model = Model()
        self.pushes = 0
        self.broken = False  # a check failed: the end skips draining and the final checks
        self.every_step = aging or gc_live  # local and gc_live runs look after every step; others after writes/ends

    # --- moves ----------------------------------------------------------------------------------------------

    def idle(self) -> list[Writer]:
        return [w for w in self.writers if w.done]

    def busy(self) -> list[Writer]:
        return [w for w in self.writers if not w.done]

    def start(self, pick: int, kind: str, loss: float, ranks: int = 2, failing: int | None = None) -> None:
        self.begin(self.idle()[pick % len(self.idle())], kind, loss, ranks=ranks, failing=failing)

    def begin(self, w: Writer, kind: str, loss: float = 0.5, *, ranks: int = 2, failing: int | None = None) -> None:
        """``w`` starts an operation: push (keep-last and keep-best 1 by val_loss=``loss``), prune, claim, gc, or
        dcp: a save of ``ranks`` ranks that ``w`` coordinates (:mod:`.dcp_op`; rank ``failing`` fails)."""
        assert w.done, f"{w.name} is busy"
        if kind == "gc" and not self.aging and not self.gc_live and self.busy():
            kind = "prune"  # without aging, gc(min_age=0) was only safe while no upload is in flight (below)
        store = w.store
        if kind == "push":
            self.pushes += 1
            src = self.work / f"src-{self.pushes}"
            src.mkdir(parents=True)
            (src / "model.bin").write_bytes(os.urandom(16 + self.pushes % 7))
            if self.gc_live:
                (src / "optimizer.bin").write_bytes(os.urandom(8))  # gc can run between the two uploads
            def fn() -> object:
                return store.push(src, epoch=self.pushes, metrics={"val_loss": loss}, monitor="val_loss",
                                  mode="min", keep_last=self.keep_last, keep_best=1)
        elif kind == "dcp":
            updates = 1 if store.keeper.lease is not None else 2  # the job's first save claims the run first
            self.pushes += 1
            self.work.mkdir(parents=True, exist_ok=True)
            fn = distributed_save(store, gated_store(self.url, self.opts, lambda b: Gated(b, w)), work=self.work,
                                  epoch=self.pushes, loss=loss, ranks=ranks, failing=failing,
                                  keep_last=self.keep_last)
        elif kind == "prune":
            fn = store.prune
        elif kind == "claim":
            fn = store.claim
        elif self.gc_live:  # min_age 0, or the default min_age with gc's clock two hours ahead
            skew = GC_SKEW if loss >= 0.5 else 0.0
            def fn() -> object:
                return collect(store.backend, store.keeper, budget=store.budget, dry_run=False,
                               min_age=GC_MIN_AGE if skew else 0.0, busy=store._busy.ids, now=time.time() + skew)
            kind = "gc_skewed" if skew else "gc"
        else:
            fn = (lambda: store.gc(min_age=GC_MIN_AGE)) if self.aging else (lambda: store.gc(min_age=0))
        self.figures["explore_ops"][kind] += 1
        w.start(kind, fn, updates if kind == "dcp" else 1)
        self._after(w, None, None)
        if kind == "gc" and not self.aging and not self.gc_live:
            self.run(w)  # ... and none starts before it ends: nothing but min_age kept gc off a fresh upload

    def gc_beside(self, pick: int, *, skew: bool, until_delete: bool) -> None:
        """An idle writer runs gc (min_age 0, or its clock ahead) while the others stay parked where they are: to its
        end, or ``until_delete`` (its condemn landed, its delete waits)."""
        w = self.idle()[pick % len(self.idle())]
        self.begin(w, "gc", 0.9 if skew else 0.0)
        for _ in range(200):
            if w.done or (until_delete and w.parked[0] == "delete"):
                return
            self.move(w, "go")

    def step(self, pick: int, decision: str) -> None:
        self.move(self.busy()[pick % len(self.busy())], decision)

    def move(self, w: Writer, decision: str) -> None:
        """The call ``w`` is parked at goes as ``decision`` says; ``w`` runs to its next call or its end."""
        name, args = w.parked
        if decision in ("lost", "drop"):
            if w.op.faults >= FAULTS_PER_OP or name not in FAULTY:
                decision = "go"
            else:
                w.op.faults += 1
        if name.startswith("failpoint:") and decision not in ("crash", "crash_after"):
            decision = "go"
        if name in ("upload", "write_bytes"):
            w.op.cids.add(str(args[1] if name == "upload" else args[0]).split("/", 1)[0])
        if name == "delete":
            self.model.check_delete(list(args[0]), w)
        if name == "write_bytes" and str(args[0]).startswith("_cloudckpt_index/") and decision != "drop":
            self.figures["explore_gc"]["segments_written"] += 1
        if decision != "go":
            self.figures["explore_faults"][f"{decision}/{name}"] += 1
        self.figures["explore"]["steps"] += 1
        lease = w.store.keeper.lease  # the lease the call is made under (a claim sets a new one as it returns)
        w.advance(decision)
        self._after(w, name, lease)

    def at_index_write(self) -> list[Writer]:
        return [w for w in self.busy() if w.parked and w.parked[0] == "write_index"]

    def lose_index_write(self, pick: int) -> None:
        """A writer parked at its index write: the write happens, its answer is lost."""
        self.move(self.at_index_write()[pick % len(self.at_index_write())], "lost")

    def hop(self, pick: int) -> None:
        """Let a busy writer run (no faults) to its next index write, delete or failpoint, or to its end."""
        w = self.busy()[pick % len(self.busy())]
        for _ in range(100):
            self.move(w, "go")
            if w.done or w.parked[0] in STOPS or w.parked[0].startswith("failpoint:"):
                return

    def run(self, w: Writer, until: str | None = None) -> None:
        """Scripted: ``w`` goes on without faults until it is parked at ``until`` or its op ends."""
        for _ in range(200):
            if w.done or (until is not None and w.parked[0] == until):
                return
            self.move(w, "go")
        raise AssertionError(f"{w.name} never reached {until}")

    def _after(self, w: Writer, call: str | None, lease: Any) -> None:
        try:
            self._check(w, call, lease)
        except BaseException:
            self.broken = True
            raise

    def _check(self, w: Writer, call: str | None, lease: Any) -> None:
        if not (self.every_step or call in STOPS or w.done):
            return  # only an index write or a delete can break a promise (remote stores: look less often)
        data, _ = self.real.read_index()
        head = parse_index(data) if data is not None else None
        whole = None
        if head is not None:  # the whole run: every sealed segment it references must be there and intact
            self.model.refs = {segment_key(r.sha256) for r in head.segments}
            whole = full_view(head, self.reader.keeper.segment)
        self.model.transition(whole, w, call, lease)
        stored = {o.rel for o in self.real.list_objects()}
        self.model.check_objects(stored)
        if w.done:
            op = w.op
            if op.error is not None and not isinstance(op.error, EXPECTED_ERRORS):
                raise AssertionError(f"{w.name}'s {op.kind} failed unexpectedly: {op.error!r}") from op.error
            outcome = "ok" if op.error is None else type(op.error).__name__
            self.figures["explore_outcomes"][f"{op.kind}/{outcome}"] += 1
            uploads = {cid for cid in op.cids if cid.startswith("ckpt-")}
            if op.kind == "push" and len(uploads) > 1:
                self.figures["explore_gc"]["commits_refused"] += len(uploads) - 1  # each upload gc condemned
            if op.kind.startswith("gc") and op.error is None:
                self.figures["explore_gc"]["gc_runs"] += 1
                self.figures["explore_gc"]["names_condemned"] += len(op.result.condemned)
                self.figures["explore_gc"]["objects_deleted"] += len(op.result.deleted)
            self.model.check_finished(op, stored)
            if isinstance(op.error, Crash):
                self._restart(w)
            self._age(stored)

    def _restart(self, w: Writer) -> None:
        """A crashed writer's process is gone; a new one (a new session) takes its place."""
        w.kill()
        self.restarts += 1
        i = self.writers.index(w)
        self.writers[i] = Writer(f"{w.name}'", self.url, self.opts, self.sealing)

    def _age(self, stored: set[str]) -> None:
        """Leftovers of ops that ended (dead, failed, or pruned and not yet deleted) look old to gc; objects of
        uploads still in flight stay young, which is what gc's min_age protects."""
        if not self.aging:
            return
        live = {cid for w in self.busy() for cid in w.op.cids}
        listed = listed_objects(self.model.index) if self.model.index else set()
        past = time.time() - 2 * GC_MIN_AGE
        for rel in stored - listed:
            if rel.split("/", 1)[0] not in live:
                try:
                    os.utime(self.real.root.joinpath(*rel.split("/")), (past, past))
                except FileNotFoundError:
                    pass

    # --- the end -------------------------------------------------------------------------------------------

    def finish(self) -> None:
        """Let every op run to its end without faults, then check the whole run (verify, pull, gc leaves exactly
        what is listed) and that every acknowledged commit is listed or was pruned by retention."""
        if self.broken:
            return
        for _ in range(2000):
            busy = self.busy()
            if not busy:
                break
            self.move(busy[0], "go")
        assert not self.busy(), "operations did not finish"
        state = check_run(self.url, **self.opts)
        listed = {c.id for c in state.index.checkpoints} if state.index else set()
        lost = self.model.acked - listed - self.model.ever_removed
        assert not lost, f"acknowledged commits vanished: {lost}"
        self.figures["explore"]["examples"] += 1
        self.figures["explore"]["restarts"] += self.restarts

    def close(self) -> None:
        for w in self.writers:
            w.kill()
        self.reader.close()
