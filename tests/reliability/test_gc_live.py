"""gc beside live writers (issue 21 items 5 and 6): gc and commits are ordered by the index, not by clocks.

Each test parks a real writer (a :class:`~cloudckpt.CheckpointStore` in a thread, its backend wrapped by
:class:`Pause` so one chosen store call waits for an event) at the moment the reported failure needs, runs gc there
(the CLI in its own process, or in-process with its clock ahead), lets the writer go on, and checks the run with
:func:`~.invariants.check_run`. Before the fix: a listed checkpoint missed the file gc deleted (``verify latest`` exit
4), the index referenced a segment gc deleted (every read exit 4), a push failed with a raw FileNotFoundError. The
last test runs real writer and gc processes side by side with tiny index segments.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from cloudckpt import CheckpointStore
from cloudckpt.segments import HEAD_ENV, SEGMENT_ENV

from .invariants import check_run
from .procs import ROOT, cli_cmd, draining, env_with, run, writer_cmd

WAIT = 60.0  # generous: the machine is shared; every wait is on an event


class Pause:
    """A real backend whose chosen call (``when(name, args)`` true) waits, once, until :attr:`go` is set; the
    writer is then parked there (:attr:`parked` set). ``hold_blocks``: an upload parks after writing its first block,
    with its temporary file open."""

    def __init__(self, real: Any, when, *, hold_blocks: bool = False) -> None:
        self._real, self._when, self._hold_blocks = real, when, hold_blocks
        self.parked, self.go = threading.Event(), threading.Event()
        self.used = False
        self.calls: list[tuple[str, str]] = []

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._real, name)
        if not callable(attr) or name.startswith("_"):
            return attr

        def call(*args, **kwargs):
            key = str(args[1] if name == "upload" else args[0]) if args else ""
            self.calls.append((name, key))
            if not self.used and self._when(name, args):
                self.used = True
                if name == "upload" and self._hold_blocks:
                    self._hold(args[0])
                else:
                    self.parked.set()
                    assert self.go.wait(WAIT), "the test never let the writer go on"
            return attr(*args, **kwargs)
        return call

    def _hold(self, source) -> None:
        blocks = source.blocks

        def held(size):
            it = blocks(size)
            yield next(it)
            self.parked.set()
            assert self.go.wait(WAIT), "the test never let the writer go on"
            yield from it
        source.blocks = held


def _paused(store: CheckpointStore, when, **kw) -> Pause:
    pause = Pause(store.backend, when, **kw)
    store.backend = store.keeper.backend = pause  # type: ignore[assignment]
    return pause


def _push_in_thread(store: CheckpointStore, src: Path, **kw) -> dict:
    out: dict = {}

    def go() -> None:
        try:
            out["entry"] = store.push(src, **kw)
        except BaseException as exc:  # noqa: BLE001 - the test asserts on it
            out["error"] = exc
    out["thread"] = threading.Thread(target=go, daemon=True)
    out["thread"].start()
    return out


def _checkpoint(root: Path, big: int = 3 * 1024 * 1024) -> Path:
    src = root / "ckpt"
    src.mkdir(parents=True)
    (src / "a-small.bin").write_bytes(os.urandom(1000))
    (src / "z-big.bin").write_bytes(os.urandom(big))
    return src


def _finish(out: dict, pause: Pause) -> None:
    pause.go.set()
    out["thread"].join(WAIT)
    assert not out["thread"].is_alive(), "the push never ended"
    assert "error" not in out, f"the push failed: {out.get('error')!r}"


def _verify_cli(url: str) -> None:
    for args in (["ls", "-r", url], ["verify", "--all", "-r", url], ["gc", "--dry-run", "-r", url]):
        got = run(cli_cmd(*args), timeout=120)
        assert got.returncode == 0, f"cloudckpt {' '.join(args[:2])} exited {got.returncode}: {got.stderr[-2000:]}"


def _age(run_dir: Path, rel: str, seconds: float) -> None:
    past = time.time() - seconds
    os.utime(run_dir.joinpath(*rel.split("/")), (past, past))


# --- item 5: a push that outlasts --min-age, or a gc whose clock runs ahead ------------------------------------

def test_gc_default_min_age_vs_a_push_longer_than_min_age(tmp_path, local_url):
    """The small file finished two hours ago (the big one is still uploading): gc with the default --min-age, in its
    own process, found it old. Before: it deleted it, the push committed, ``verify latest`` exited 4."""
    src = _checkpoint(tmp_path)
    with CheckpointStore(local_url, workers=2) as seed:
        seed.push(src / "a-small.bin", epoch=0)  # a run exists before
    with CheckpointStore(local_url, workers=1) as store:
        pause = _paused(store, lambda name, args: name == "upload" and str(args[1]).endswith("z-big.bin"),
                        hold_blocks=True)
        out = _push_in_thread(store, src, epoch=1)
        assert pause.parked.wait(WAIT)
        small = next(key for name, key in pause.calls if name == "upload" and key.endswith("a-small.bin"))
        _age(Path(local_url), small, 2 * 3600)  # what a 2-hour upload of the big file leaves for gc to see
        gc = run(cli_cmd("gc", "--remote", local_url), timeout=120)
        assert gc.returncode == 0, gc.stderr
        _finish(out, pause)
    state = check_run(local_url)
    assert state.index is not None and state.index.latest == out["entry"].id
    _verify_cli(local_url)


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_gc_with_its_clock_ahead_vs_a_push_in_flight(tmp_path, request, kind, monkeypatch):
    """gc's clock runs two hours ahead: every object looks old to it. Before: it deleted the finished small file of
    the checkpoint being pushed; the push then committed a checkpoint missing a file."""
    url = request.getfixturevalue(f"{kind}_url")
    src = _checkpoint(tmp_path)
    with CheckpointStore(url, workers=1) as store, CheckpointStore(url) as gc_store:
        pause = _paused(store, lambda name, args: name == "upload" and str(args[1]).endswith("z-big.bin"))
        out = _push_in_thread(store, src, epoch=1)
        assert pause.parked.wait(WAIT)
        real_time = time.time
        with monkeypatch.context() as m:
            m.setattr(time, "time", lambda: real_time() + 2 * 3600)
            report = gc_store.gc()  # the default min_age
        assert any(rel.endswith("a-small.bin") for rel in report.deleted), report  # it did find the file old
        _finish(out, pause)
    state = check_run(url)
    assert state.index is not None and state.index.latest == out["entry"].id
    assert out["entry"].id not in report.checkpoints  # uploaded again under a new id
    _verify_cli(url)


# --- item 6: gc --min-age 0 beside a writer: sealed segments and temporary files ---------------------------------

@pytest.mark.parametrize("kind", ["local", "s3"])
def test_gc_min_age_0_vs_a_segment_sealed_before_its_swap(tmp_path, request, kind, monkeypatch):
    """The writer sealed a new index segment and is about to swap in the head that references it; gc --min-age 0
    (its own process) runs there. Before: gc deleted the segment, the swap landed, and the run was bricked (ls,
    verify, gc exit 4; every later push failed)."""
    url = request.getfixturevalue(f"{kind}_url")
    monkeypatch.setenv(HEAD_ENV, "2")
    monkeypatch.setenv(SEGMENT_ENV, "2")
    with CheckpointStore(url, workers=2) as store:
        for epoch in (1, 2):
            store.push(_checkpoint(tmp_path / f"e{epoch}", big=10), epoch=epoch)
        pause = _paused(store, lambda name, args: name == "write_index" and any(
            key.startswith("_cloudckpt_index/") for n, key in pause.calls if n == "write_bytes"))
        out = _push_in_thread(store, _checkpoint(tmp_path / "e3", big=10), epoch=3)
        assert pause.parked.wait(WAIT)
        gc = run(cli_cmd("gc", "--min-age", "0", "--remote", url), env=env_with(), timeout=120)
        assert gc.returncode == 0, gc.stderr
        _finish(out, pause)
        store.push(_checkpoint(tmp_path / "e4", big=10), epoch=4)  # later pushes seal again
    check_run(url)
    with CheckpointStore(url) as reader:
        assert reader.keeper.read_existing().segments, "the run should have sealed segments"
        assert [c.epoch for c in reader.list()] == [1, 2, 3, 4]
    _verify_cli(url)


def test_gc_min_age_0_vs_a_temporary_file_being_written(tmp_path, local_url):
    """The writer is midway through a file (its ``.cloudckpt-tmp-`` file open); gc --min-age 0 runs in its own
    process. Before: gc deleted the temporary file and the push failed with a raw FileNotFoundError."""
    with CheckpointStore(local_url) as seed:
        seed.push(_checkpoint(tmp_path / "e0", big=10), epoch=0)
    with CheckpointStore(local_url, workers=1) as store:
        pause = _paused(store, lambda name, args: name == "upload" and str(args[1]).endswith("z-big.bin"),
                        hold_blocks=True)
        out = _push_in_thread(store, _checkpoint(tmp_path / "e1"), epoch=1)
        assert pause.parked.wait(WAIT)
        tmp = [p for p in Path(local_url).rglob(".cloudckpt-tmp-*")]
        assert tmp, "the upload's temporary file should exist while it is written"
        gc = run(cli_cmd("gc", "--min-age", "0", "--remote", local_url), timeout=120)
        assert gc.returncode == 0, gc.stderr
        _finish(out, pause)
    state = check_run(local_url)
    assert state.index is not None and state.index.latest == out["entry"].id
    _verify_cli(local_url)


def _gc_before_each_commit(store: CheckpointStore, gc_store: CheckpointStore, reports: list) -> Pause:
    """Every time ``store``'s push has written its manifest and reads the index to commit, ``gc_store`` runs gc
    (min_age 0) to its end first."""
    def before_commit(name, args):
        if name == "read_index" and any(n == "write_bytes" and k.endswith("_cloudckpt_manifest.json")
                                        for n, k in pause.calls[-2:-1]):
            reports.append(gc_store.gc(min_age=0))
        return False
    pause = _paused(store, before_commit)
    return pause


def test_a_push_gc_condemned_uploads_again_under_a_reserved_id(tmp_path, local_url):
    """gc runs before each commit of the push: it condemns the first id; the push uploads again under an id it
    reserved in the index, which the next gc leaves alone, and commits it (then the reservation is released)."""
    with CheckpointStore(local_url) as seed:
        seed.push(_checkpoint(tmp_path / "e0", big=10), epoch=0)
    reports: list = []
    with CheckpointStore(local_url, workers=1) as store, CheckpointStore(local_url) as gc_store:
        _gc_before_each_commit(store, gc_store, reports)
        entry = store.push(_checkpoint(tmp_path / "e1", big=10), epoch=1)
    assert len(reports) == 2 and len(reports[0].condemned) == 1 and reports[1].condemned == [], reports
    assert entry.id != reports[0].condemned[0]
    state = check_run(local_url)
    assert state.index is not None and state.index.latest == entry.id
    with CheckpointStore(local_url) as reader:
        assert reader.keeper.read_existing().reserved == ()


def test_a_push_gc_condemns_on_every_upload_gives_up_typed(tmp_path, local_url, monkeypatch):
    """With reservations expiring at once (RESERVED_GRACE 0), gc condemns every upload of the push: after
    PUSH_ATTEMPTS it fails with the typed CheckpointCondemnedError, and nothing of it is listed."""
    from cloudckpt import garbage
    from cloudckpt import store as store_mod
    from cloudckpt.errors import CheckpointCondemnedError

    monkeypatch.setattr(store_mod, "PUSH_ATTEMPTS", 2)
    monkeypatch.setattr(garbage, "RESERVED_GRACE", 0.0)
    with CheckpointStore(local_url) as seed:
        seed.push(_checkpoint(tmp_path / "e0", big=10), epoch=0)
    reports: list = []
    with CheckpointStore(local_url, workers=1) as store, CheckpointStore(local_url) as gc_store:
        _gc_before_each_commit(store, gc_store, reports)
        with pytest.raises(CheckpointCondemnedError):
            store.push(_checkpoint(tmp_path / "e1", big=10), epoch=1)
    condemned = [name for r in reports for name in r.condemned]
    assert len(reports) == 2 and len(condemned) == 2, reports
    state = check_run(local_url)
    assert state.index is not None and state.index.latest not in condemned


# --- real processes side by side -----------------------------------------------------------------------------

GC_LOOP = """
import os, sys
from cloudckpt import CheckpointStore
from cloudckpt.errors import CheckpointNotFoundError
url, stop = sys.argv[1], sys.argv[2]
runs = deleted = 0
with CheckpointStore(url, budget=60) as store:
    while not os.path.exists(stop):
        try:
            deleted += len(store.gc(min_age=0).deleted)
        except CheckpointNotFoundError:
            continue  # no run yet
        runs += 1
print(f"GC_RUNS {runs} {deleted}")
"""


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_gc_min_age_0_in_a_loop_beside_a_writer_process(tmp_path, request, kind, full, figures):
    """A writer process pushes (index head of 2, segments of 2) while a gc process runs gc(min_age=0) back to
    back. Before: listed checkpoints broken, the run bricked by a deleted segment, pushes failing with a raw
    FileNotFoundError. After: every listed checkpoint verifies, the run reads, and every push commits (one gc
    condemned uploads again under an id it reserves, which gc leaves alone)."""
    url = request.getfixturevalue(f"{kind}_url")
    rounds = 150 if full else 40
    env = env_with(**{HEAD_ENV: "2", SEGMENT_ENV: "2"})
    stop = tmp_path / "stop"
    writer = subprocess.Popen(writer_cmd(url, "--rounds", str(rounds), "--max-bytes", "20000", "--big",
                                         str(1024 * 1024), "--seed", "7", "--tolerate-condemned"),
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    gc = subprocess.Popen([sys.executable, "-c", GC_LOOP, url, str(stop)], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, cwd=ROOT)
    gc_output = draining(gc, 720)  # its retry warnings go on for minutes: read them as they come
    try:
        out, err = writer.communicate(timeout=600)
        stop.touch()
        gc_out, gc_err = gc_output.result(timeout=120)
    finally:
        for p in (writer, gc):
            if p.poll() is None:
                p.kill()
    assert writer.returncode == 0, err[-3000:]
    assert gc.returncode == 0, gc_err[-3000:]
    committed = [line for line in out.splitlines() if line.startswith("COMMITTED ")]
    gave_up = [line for line in out.splitlines() if line.startswith("REFUSED ")]
    gc_runs, gc_deleted = map(int, gc_out.split()[1:3])
    assert len(committed) == rounds and not gave_up and gc_runs >= 2, (len(committed), gave_up, gc_runs)
    refused = err.count("uploading it again as a new checkpoint")
    figures["gc_live"][f"{kind}/pushes"] += rounds
    figures["gc_live"][f"{kind}/gc_runs"] += gc_runs
    figures["gc_live"][f"{kind}/gc_deleted"] += gc_deleted
    figures["gc_live"][f"{kind}/commits_refused"] += refused
    figures["gc_live"][f"{kind}/pushes_given_up"] += len(gave_up)
    check_run(url)
    _verify_cli(url)


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_gc_dry_run_writes_nothing_and_a_crashed_gc_is_finished_by_the_next(tmp_path, request, kind, monkeypatch):
    """``gc --dry-run`` names the leftovers and leaves the index and the objects as they were; a gc killed between
    its condemn and its delete leaves the names condemned, and the next gc deletes them whatever --min-age."""
    url = request.getfixturevalue(f"{kind}_url")
    with CheckpointStore(url) as store:
        store.push(_checkpoint(tmp_path / "e1", big=10), epoch=1)
        store.backend.write_bytes("ckpt-e000009-deadbeef/w.bin", b"left by a crashed push")
        before, _ = store.backend.read_index()
        report = store.gc(dry_run=True, min_age=0)
        assert report.deleted == ["ckpt-e000009-deadbeef/w.bin"] and report.condemned == ["ckpt-e000009-deadbeef"]
        assert store.backend.read_index()[0] == before  # not even the condemn was written
        assert "ckpt-e000009-deadbeef/w.bin" in {o.rel for o in store.backend.list_objects()}
    killed = run([sys.executable, "-c", "from cloudckpt import CheckpointStore; import sys; "
                  "CheckpointStore(sys.argv[1]).gc(min_age=0)", url],
                 env=env_with(CLOUDCKPT_FAILPOINT="gc.after_condemn"))
    assert killed.killed, killed.stderr
    with CheckpointStore(url) as store:
        assert [c.name for c in store.keeper.read_existing().condemned] == ["ckpt-e000009-deadbeef"]
        assert "ckpt-e000009-deadbeef/w.bin" in {o.rel for o in store.backend.list_objects()}
        report = store.gc()  # the default min_age: the object is fresh, yet condemned already
        assert report.deleted == ["ckpt-e000009-deadbeef/w.bin"]
    check_run(url)
