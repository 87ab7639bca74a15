"""Pins and tags (issue 24 item 7): `cloudckpt pin/unpin/tag/untag` and the CheckpointStore API change the index
through the same compare-and-swap as commits; retention keeps pinned checkpoints, sealed in segments too; `pull
NAME` restores a tagged checkpoint; tag names are validated (also when read back from the bucket)."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_cli import one_line_error, run

from cloudckpt import CheckpointStore
from cloudckpt.changes import commit_checkpoint, label_checkpoint, prune_checkpoints
from cloudckpt.errors import CheckpointNotFoundError, ConfigurationError, IntegrityError
from cloudckpt.manifest import CheckpointEntry, FileEntry, Index, dump, parse_index
from cloudckpt.retention import Retention
from cloudckpt.segments import Sealing, full_view, seal

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
NAMES = ["release", "rc.1", "keep_me"]


def entry(i: int) -> CheckpointEntry:
    files = (FileEntry(path="w.bin", size=1, crc32c="00000000"),)
    return CheckpointEntry(id=f"ckpt-e{i:06d}-0000abcd", epoch=i, created=T0 + timedelta(seconds=i),
                           metrics={"loss": float((i * 7) % 5)}, files=files, size=1)


ops = st.lists(st.one_of(st.tuples(st.just("commit")), st.tuples(st.just("prune"), st.integers(0, 3)),
                         st.tuples(st.sampled_from(["pin", "unpin"]), st.integers(0, 40)),
                         st.tuples(st.sampled_from(["tag", "untag"]), st.integers(0, 40), st.sampled_from(NAMES))),
               max_size=40)


@settings(max_examples=120, deadline=None)
@given(ops, st.integers(2, 5))
def test_labels_through_commits_prunes_and_sealing(steps, head_max):
    """Random commits, prunes, pins and tags through the pure index changes, with sealing: a pinned checkpoint is
    never pruned, a tag names at most one checkpoint, and resolving the tag gives it."""
    loaded: dict[str, tuple[CheckpointEntry, ...]] = {}

    def load(ref):
        return loaded[ref.sha256]

    def settle(index, change):
        loaded.update({m.ref.sha256: m.entries for m in change.segments})
        if change.index is None:
            return index
        index, made = seal(change.index, Sealing(head_max=head_max, segment_max=3), load)
        loaded.update({m.ref.sha256: m.entries for m in made})
        return parse_index(dump(index))  # what the bucket holds is what the next reader validates

    index, n, pinned, tags = Index(), 0, set(), {}
    for op, *args in steps:
        listed = [c.id for c in full_view(index, load).checkpoints]
        if op == "commit":
            index = settle(index, commit_checkpoint(index, entry(n), Retention(monitor="loss"), prune=False,
                                                    busy=frozenset(), load=load))
            n += 1
        elif op == "prune":
            change = prune_checkpoints(index, Retention(keep_last=args[0]), busy=frozenset(), load=load)
            assert not {c.id for c in change.pruned} & pinned
            for gone in change.pruned:
                tags = {t: c for t, c in tags.items() if c != gone.id}
            index = settle(index, change)
        elif not listed:
            continue
        else:
            cid = listed[args[0] % len(listed)]
            if op in ("pin", "unpin"):
                index = settle(index, label_checkpoint(index, cid, pinned=op == "pin", load=load))
                pinned = pinned | {cid} if op == "pin" else pinned - {cid}
            elif op == "tag":
                index = settle(index, label_checkpoint(index, cid, tag=args[1], load=load))
                tags[args[1]] = cid
            elif tags.get(args[1]) == cid:
                index = settle(index, label_checkpoint(index, cid, untag=args[1], load=load))
                del tags[args[1]]
            else:
                with pytest.raises(CheckpointNotFoundError):
                    label_checkpoint(index, cid, untag=args[1], load=load)
        full = full_view(index, load)
        assert {c.id for c in full.checkpoints if c.pinned} == pinned
        assert {t: c.id for c in full.checkpoints for t in c.tags} == tags
        assert all(full.resolve(t).id == cid for t, cid in tags.items())


def push(url: str, src: Path, epoch: int, **kw) -> str:
    src.mkdir(parents=True, exist_ok=True)
    (src / "w.bin").write_bytes(f"weights {epoch}".encode() * 40)
    with CheckpointStore(url) as store:
        return store.push(src, epoch=epoch, metrics={"loss": float(epoch)}, monitor="loss", **kw).id


def test_pin_tag_pull_and_prune_by_cli(tmp_path, local_url):
    ids = [push(local_url, tmp_path / f"s{e}", e, inline_small=e == 1) for e in range(4)]
    proc = run("pin", "1", "-r", local_url)
    assert proc.returncode == 0 and proc.stdout.strip() == f"pinned {ids[1]}  [pinned]", proc.stderr
    proc = run("tag", ids[2], "release", "-r", local_url, "--json")
    assert proc.returncode == 0 and json.loads(proc.stdout)["tags"] == ["release"], proc.stderr
    proc = run("pull", "release", "-r", local_url, "--to", str(tmp_path / "out"), "--json")
    assert proc.returncode == 0 and json.loads(proc.stdout)["id"] == ids[2], proc.stderr
    assert (tmp_path / "out" / "w.bin").read_bytes() == b"weights 2" * 40
    proc = run("verify", "--all", "-r", local_url)  # a pinned checkpoint's manifest still matches its entry
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = run("prune", "--keep-last", "1", "-r", local_url, "--json")
    assert {c["id"] for c in json.loads(proc.stdout)["pruned"]} == {ids[2]}  # 0 is best, 1 pinned, 3 latest
    assert run("pull", "release", "-r", local_url, "--to", str(tmp_path / "x")).returncode == 3
    rows = json.loads(run("ls", "-r", local_url, "--json").stdout)
    assert [(r["id"], r["tags"]) for r in rows] == [(ids[0], ["best"]), (ids[1], ["pinned"]), (ids[3], ["latest"])]
    run("tag", "1", "release", "-r", local_url)
    proc = run("tag", "3", "release", "-r", local_url, "--json")  # moves it
    assert json.loads(proc.stdout)["tags"] == ["latest", "release"]
    assert json.loads(run("show", "1", "-r", local_url, "--json").stdout)["tags"] == ["pinned"]
    proc = run("untag", "1", "release", "-r", local_url)
    assert proc.returncode == 3 and "no tag 'release'" in one_line_error(proc)
    assert run("untag", "3", "release", "-r", local_url).returncode == 0
    assert run("unpin", "1", "-r", local_url).returncode == 0
    proc = run("prune", "--keep-last", "1", "-r", local_url, "--json")
    assert {c["id"] for c in json.loads(proc.stdout)["pruned"]} == {ids[1]}
    for bad in ("best", "latest-model", "1x", "-x", "a b", "x" * 65, "ckpt-e000001-0badf00d"):
        proc = run("tag", "latest", bad, "-r", local_url)
        assert proc.returncode == 2, (bad, proc.stderr)
        assert "invalid tag" in one_line_error(proc) or "No such option" in proc.stderr
    proc = run("tag", "latest", ids[0], "-r", local_url)  # a checkpoint's id: `pull NAME` would mean two things
    assert proc.returncode == 2 and "reserved" in one_line_error(proc)


def test_pin_keeps_a_sealed_checkpoint_on_each_store(store_url, tmp_path, monkeypatch):
    monkeypatch.setenv("CLOUDCKPT_INDEX_HEAD_MAX", "4")
    monkeypatch.setenv("CLOUDCKPT_INDEX_SEGMENT_MAX", "3")
    ids = [push(store_url, tmp_path / f"s{e}", e) for e in range(9)]
    with CheckpointStore(store_url) as store:
        assert store.keeper.read_existing().segments, "the run is long enough to be sealed"
        assert store.pin(ids[2]).pinned and store.tag(ids[3], "old").tags == ("old",)
        with pytest.raises(ConfigurationError):
            store.tag(ids[3], "latest")
    with CheckpointStore(store_url) as fresh:  # labels of sealed checkpoints read back from the rewritten segments
        assert fresh.get("old").id == ids[3] and fresh.get(ids[2]).pinned and fresh.get(ids[3]).tags == ("old",)
        assert all(r.ok for r in fresh.verify(all=True))
    with CheckpointStore(store_url) as store:
        store.prune(keep_last=1)
        assert [c.id for c in store.list()] == [ids[0], ids[2], ids[8]]  # best (loss 0), pinned, latest
        assert store.get(ids[2]).pinned and all(r.ok for r in store.verify(all=True))
        with pytest.raises(CheckpointNotFoundError):
            store.get("old")  # its checkpoint was pruned: the tag went with it


def test_a_tag_read_from_the_bucket_is_validated(local_url, tmp_path):
    cid = push(local_url, tmp_path / "s", 1)
    path = Path(local_url) / "index.json"
    doc = json.loads(path.read_text())
    doc["checkpoints"][0]["tags"] = ["../../etc"]
    path.write_text(json.dumps(doc))
    with pytest.raises(IntegrityError, match="invalid tag"), CheckpointStore(local_url) as store:
        store.get(cid)
    proc = run("ls", "-r", local_url)
    assert proc.returncode == 4 and "invalid tag" in one_line_error(proc)


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_labels_race_commits_without_losing_either(kind, request, tmp_path):
    """Pins from one store object while another commits to the same run: both go through the compare-and-swap, so
    every commit and every pin is in the index at the end (a lost update would drop one)."""
    from concurrent.futures import ThreadPoolExecutor

    url = request.getfixturevalue(f"{kind}_url")
    first = push(url, tmp_path / "s0", 0)
    pinned: set[str] = set()  # what each pin reports it pinned (``first`` only if a pin ran before the first commit)

    def commits() -> list[str]:
        return [push(url, tmp_path / f"c{e}", e) for e in range(1, 7)]

    def pins() -> None:
        with CheckpointStore(url) as store:
            for _ in range(6):
                pinned.add(store.pin("latest").id)

    with ThreadPoolExecutor(2) as pool:
        committed, _ = pool.submit(commits), pool.submit(pins).result()
        ids = committed.result()
    with CheckpointStore(url) as store:
        entries = store.list()
    assert [c.id for c in entries] == [first, *ids]
    assert {c.id for c in entries if c.pinned} == pinned
