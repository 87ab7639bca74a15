"""Crash consistency: writers SIGKILLed at every step of the commit protocol and at random instants.

A real process (the API writer of ``writer.py``, or the ``cloudckpt`` CLI) is killed with SIGKILL — by a failpoint
at each named step (``cloudckpt.failpoints``), and by the test at a random moment while it pushes, prunes and gcs in
a loop. After every kill :func:`invariants.check_run` must hold (index valid, every listed checkpoint verifies,
``pull latest`` works, gc brings the objects back to exactly what the index lists), and no acknowledged commit is
missing unless retention dropped it.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import time

import pytest

from cloudckpt import CheckpointStore

from .invariants import check_run
from .procs import ROOT, cli_cmd, env_with, run, run_and_kill, writer_cmd

POINTS = ["push.after_upload", "push.after_manifest", "push.after_index", "prune.after_index", "gc.before_delete"]
S3_MULTIPART = {"part_size": 5 * 2**20}
AZ_BLOCKS = {"block_size": 2**20}  # the 3 MiB big file goes up in staged blocks, killed between them


@pytest.fixture(params=["local", "s3", "az"])
def crash_url(request) -> str:
    return request.getfixturevalue(f"{request.param}_url")


def _kind(url: str) -> str:
    return url.split("://", 1)[0] if url.startswith(("s3://", "az://")) else "local"


def _seed(url: str, tmp_path, n: int = 3) -> list[str]:
    ids = []
    with CheckpointStore(url) as store:
        for i in range(n):
            src = tmp_path / f"seed-{i}"
            src.mkdir()
            (src / "w.bin").write_bytes(bytes([i]) * (1000 + i))
            ids.append(store.push(src, epoch=i, metrics={"val_loss": 1.0 + i}, monitor="val_loss").id)
    return ids


def _ids(url: str) -> list[str]:
    with CheckpointStore(url) as store:
        return [c.id for c in store.list()]


def _leftovers(url: str) -> int:
    from .invariants import listed_objects, segment_objects

    with CheckpointStore(url) as store:
        return len({o.rel for o in store.backend.list_objects()} - listed_objects(store.index())
                   - segment_objects(store))


def test_kill_at_every_step_api_writer(crash_url, tmp_path, figures):
    """One kill at each failpoint, in sequence on one run; the state after each step is exactly the promised one."""
    seeded = _seed(crash_url, tmp_path)
    kind = _kind(crash_url)

    def kill_at(point: str, *args: str):
        out = run(writer_cmd(crash_url, "--rounds", "1", *args), env=env_with(CLOUDCKPT_FAILPOINT=point))
        assert out.killed, f"{point}: the writer was not killed there (rc={out.returncode}): {out.stderr[-2000:]}"
        assert not out.committed, f"{point}: a kill before the acknowledgement, yet it printed {out.committed}"
        figures["kills"][f"{kind}/{point}"] += 1
        return out

    # files uploaded / manifest written, index not updated: nothing new is listed, leftovers are there for gc
    for point in ("push.after_upload", "push.after_manifest"):
        kill_at(point)
        assert _ids(crash_url) == seeded
        assert _leftovers(crash_url) > 0
        state = check_run(crash_url)
        assert state.gc_deleted and [c.id for c in state.index.checkpoints] == seeded

    # committed, pruned objects not yet deleted: the new checkpoint is listed, pruned ones are gone from the index
    kill_at("push.after_index", "--keep-last", "2")
    after = _ids(crash_url)
    with CheckpointStore(crash_url) as store:
        best = store.index().best
    assert after[-1] not in seeded and best in (seeded[0], after[-1])  # the writer's loss is random in [0, 1)
    assert set(after) == {seeded[2], after[-1], best}  # keep-last 2, plus the best
    assert _leftovers(crash_url) > 0  # seeded[1]'s objects, unlisted
    check_run(crash_url)

    # prune: index updated first, objects later
    with CheckpointStore(crash_url) as store:
        for epoch in (8, 9):
            store.push(tmp_path / "seed-0", epoch=epoch, metrics={"val_loss": 5.0}, prune=False)
    before = _ids(crash_url)
    kill_at("prune.after_index", "--rounds", "0", "--prune-now", "1")  # rounds=0: no push
    # prune(keep_last=1) ran (latest and best kept): the index shrank, the pruned objects remain
    assert set(_ids(crash_url)) < set(before)
    assert _leftovers(crash_url) > 0
    check_run(crash_url)

    # gc killed before deleting: leftovers stay leftovers, the next gc removes them
    kill_at("push.after_upload")
    kill_at("gc.before_delete", "--rounds", "0", "--gc-now")
    assert _leftovers(crash_url) > 0
    check_run(crash_url)
    figures["acknowledged_commits_lost"][kind] += 0


def test_first_commit_killed_then_gc(crash_url, figures):
    """A run whose very first commit was killed has leftovers but no index: gc still removes them."""
    for point in ("push.after_upload", "push.after_manifest"):
        out = run(writer_cmd(crash_url, "--rounds", "1"), env=env_with(CLOUDCKPT_FAILPOINT=point))
        assert out.killed
        figures["kills"][f"{_kind(crash_url)}/first-commit/{point}"] += 1
        with CheckpointStore(crash_url) as store:
            assert store.backend.list_objects(), "the killed push left nothing to collect"
        state = check_run(crash_url)
        assert (state.index is None or not state.index.checkpoints) and state.gc_deleted


def test_kill_at_every_step_cli_push(crash_url, tmp_path, figures):
    """The ``cloudckpt push`` CLI killed at each failpoint: same guarantees as the API writer."""
    kind = _kind(crash_url)
    src = tmp_path / "ckpt"
    src.mkdir()
    (src / "model.weights.h5").write_bytes(random.randbytes(50_000))
    (src / "opt").mkdir()
    (src / "opt" / "state.bin").write_bytes(random.randbytes(3000))
    base = ["push", str(src), "--remote", crash_url, "--metric", "val_loss=0.5", "--monitor", "val_loss"]
    assert run(cli_cmd(*base, "--epoch", "0")).returncode == 0
    committed = _ids(crash_url)
    for i, point in enumerate(POINTS[:3], start=1):
        out = run(cli_cmd(*base, "--epoch", str(i), "--keep-last", "1"), env=env_with(CLOUDCKPT_FAILPOINT=point))
        assert out.killed, f"{point}: rc={out.returncode} {out.stderr[-2000:]}"
        figures["kills"][f"{kind}/cli-push/{point}"] += 1
        ids = _ids(crash_url)
        if point == "push.after_index":
            assert len(ids) >= 1 and ids[-1] not in committed
        else:
            assert ids == committed
        check_run(crash_url)
        committed = _ids(crash_url)
    # a pull through the CLI after all that
    out = run(cli_cmd("pull", "latest", "--remote", crash_url, "--to", str(tmp_path / "restored"), "--json"))
    assert out.returncode == 0, out.stderr
    assert json.loads("\n".join(out.lines))["id"] == committed[-1]
    assert (tmp_path / "restored" / "opt" / "state.bin").read_bytes() == (src / "opt" / "state.bin").read_bytes()


def _random_kills(url: str, n: int, rnd: random.Random, figures, *, label: str) -> int:
    """Kill a looping writer ``n`` times at random instants; after each, check every promise and every ack.
    Return how many writers were really killed (not finished before the signal)."""
    kind = _kind(url)
    keep_last = 3
    acked: list[tuple[str, float]] = []
    kills_since_ack = killed = 0
    opts = {"s3": S3_MULTIPART, "az": AZ_BLOCKS}.get(kind, {})
    big = 6 * 2**20 if kind == "s3" else 3 * 2**20
    for i in range(n):
        args = ["--seed", str(rnd.randrange(2**31)), "--keep-last", str(keep_last), "--gc-every", "4",
                "--prune-every", "3", "--big", str(big), "--options", json.dumps(opts)]
        out = run_and_kill(writer_cmd(url, *args), delay=rnd.uniform(0.0, 1.2))
        assert out.killed or out.returncode == 0, f"writer failed: rc={out.returncode} {out.stderr[-3000:]}"
        figures["kills"][f"{kind}/{label}"] += 1
        killed += out.killed
        new = out.committed
        figures["acknowledged_commits"][kind] += len(new)
        acked += new
        kills_since_ack = 1 if new else kills_since_ack + 1
        state = check_run(url, **opts)
        if not acked:
            continue
        assert state.index is not None, "commits were acknowledged, yet the run has no index"
        listed = {c.id: c for c in state.index.checkpoints}
        # the newest acknowledged commits survive retention, except for unacknowledged commits made after them
        must = [cid for cid, _ in acked[-max(0, keep_last - kills_since_ack):]] if keep_last > kills_since_ack else []
        missing = [cid for cid in must if cid not in listed]
        assert not missing, f"acknowledged commits lost after kill {i}: {missing}"
        # the best acknowledged checkpoint is listed, unless an (unacknowledged) better one replaced it as best
        best_id, best_loss = min(acked, key=lambda t: t[1])
        best = state.index.get(state.index.best)
        assert best_id in listed or best.metrics["val_loss"] < best_loss, f"best checkpoint {best_id} lost"
        # nothing listed comes from nowhere: unacknowledged ids are at most one per kill
        unknown = set(listed) - {cid for cid, _ in acked}
        assert len(unknown) <= i + 1
    return killed


def test_random_sigkill_api_writer(crash_url, full, figures):
    n = 100 if full else (10 if _kind(crash_url) == "local" else 6)
    assert _random_kills(crash_url, n, random.Random(1234), figures, label="random-api") > 0  # it really killed


def test_random_sigkill_cli_push(crash_url, tmp_path, full, figures):
    """``cloudckpt push`` (a fresh process each time) killed at a random instant of its run."""
    rnd = random.Random(99)
    kind = _kind(crash_url)
    acked: list[str] = []
    for i in range(25 if full else 4):
        src = tmp_path / f"c{i}"
        src.mkdir()
        for j in range(rnd.randint(1, 3)):
            (src / f"f{j}.bin").write_bytes(rnd.randbytes(rnd.randint(1, 400_000)))
        cmd = cli_cmd("push", str(src), "--remote", crash_url, "--epoch", str(i),
                      "--metric", f"val_loss={rnd.random()}", "--monitor", "val_loss", "--keep-last", "3", "--json")
        out = run_and_kill(cmd, delay=rnd.uniform(0.1, 0.7), ready=None)
        figures["kills" if out.killed else "cli_push_completed"][f"{kind}/random-cli-push"] += 1
        if out.returncode == 0:
            acked.append(json.loads("\n".join(out.lines))["id"])
        else:
            assert out.killed, f"cli push failed: rc={out.returncode} {out.stderr[-2000:]}"
        state = check_run(crash_url)
        if acked:
            assert acked[-1] in {c.id for c in state.index.checkpoints}, "an acknowledged CLI push was lost"


def test_random_sigkill_sync_service(crash_url, tmp_path, full, figures):
    """The sync service killed while it commits a directory of checkpoints; a restarted service finishes the job."""
    rnd = random.Random(7)
    kind = _kind(crash_url)
    watch = tmp_path / "watch"
    watch.mkdir()
    sync = cli_cmd("sync", str(watch), "--remote", crash_url, "--settle", "0", "--poll", "0.05",
                   "--name-pattern", r"model-(?P<epoch>\d+)", "--keep-last", "2")
    for i in range(6 if full else 3):
        for j in range(3):
            epoch = i * 3 + j
            d = watch / f"model-{epoch:03d}"  # the service scans in name order: newest last
            d.mkdir()
            (d / "weights.bin").write_bytes(rnd.randbytes(rnd.randint(1000, 300_000)))
        out = run_and_kill(sync, delay=rnd.uniform(0.3, 1.2), ready=None)
        assert out.killed, f"sync ended by itself: rc={out.returncode} {out.stderr[-2000:]}"
        figures["kills"][f"{kind}/random-sync"] += 1
        check_run(crash_url)
    # restarted and stopped with SIGTERM: every settled checkpoint gets committed, the newest one is the latest

    p = subprocess.Popen(sync, env=env_with(), stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert "watching" in p.stderr.readline()
        last = max(int(d.name.split("-")[1]) for d in watch.iterdir()) + 1
        (watch / f"model-{last:03d}").mkdir()
        (watch / f"model-{last:03d}" / "weights.bin").write_bytes(b"final")  # once it is committed, sync is running
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with CheckpointStore(crash_url) as store:
                try:
                    if store.latest().epoch == last:
                        break
                except FileNotFoundError:
                    pass
            time.sleep(0.2)
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=60)  # not wait(): a sync that kept logging errors would block on its pipe
        assert p.returncode == 0, err[-2000:]
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    state = check_run(crash_url)
    latest = state.index.get(state.index.latest)
    assert latest.epoch == last
