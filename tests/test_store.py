"""The store suite: the same behaviour on local, S3 (moto server), GCS (fake-gcs-server) and Azure (Azurite)."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

from cloudckpt import (
    CheckpointNotFoundError,
    CheckpointStore,
    IntegrityError,
    StaleWriterError,
)
from cloudckpt.checksum import file_checksums
from cloudckpt.manifest import INDEX_NAME, MANIFEST_NAME


@pytest.fixture(params=["local", "s3", "gcs", "s3-fsspec", "gcs-fsspec", "az"])
def store_url(request, monkeypatch) -> str:
    """Each store, and S3/GCS once more with data through s3fs/gcsfs instead of boto3/google-cloud-storage."""
    kind, _, transport = request.param.partition("-")
    if transport:
        monkeypatch.setenv("CLOUDCKPT_TRANSPORT", transport)
    return request.getfixturevalue(f"{kind}_url")


def make_ckpt(root: Path, seed: int, files: int = 3) -> Path:
    """A checkpoint directory with nested files whose bytes depend on ``seed``."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        p = root / ("sub" if i % 2 else "") / f"part{i}.bin"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(bytes([seed % 256]) * (1000 + i) + os.urandom(17))
    return root


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != ".cloudckpt.json"}


def stored(store: CheckpointStore) -> set[str]:
    return {o.rel for o in store.backend.list_objects()}


def listed(store: CheckpointStore) -> set[str]:
    index = store.index()
    out = {INDEX_NAME}
    for c in index.checkpoints:
        out |= {f"{c.id}/{f.path}" for f in c.files} | {f"{c.id}/{MANIFEST_NAME}"}
    return out


def test_push_list_pull_roundtrip(store_url, tmp_path):
    src = make_ckpt(tmp_path / "src", 1)
    with CheckpointStore(store_url) as store:
        entry = store.push(src, epoch=3, step=300, metrics={"val_loss": 0.25})
        assert [c.id for c in store.list()] == [entry.id]
        assert store.latest().id == entry.id
        assert entry.size == sum(len(b) for b in tree(src).values())
        assert {f.path for f in entry.files} == set(tree(src))
        result = store.pull("latest", to=tmp_path / "out")
    assert tree(result.path) == tree(src)
    assert json.loads((result.path / ".cloudckpt.json").read_text())["checkpoint"]["id"] == entry.id
    assert stored(store) == listed(store)  # readable layout: <run>/<id>/<relative path>, nothing else
    umask = os.umask(0o022)
    os.umask(umask)
    modes = {p.relative_to(result.path).as_posix(): p.stat().st_mode & 0o777 for p in result.path.rglob("*")}
    want = {rel: (0o777 if (result.path / rel).is_dir() else 0o666) & ~umask for rel in modes}
    assert modes == want and result.path.stat().st_mode & 0o777 == 0o777 & ~umask  # as `cp` would make them


def test_best_latest_and_selectors(store_url, tmp_path):
    with CheckpointStore(store_url) as store:
        losses = [0.9, 0.3, 0.5]
        ids = []
        for epoch, loss in enumerate(losses, 1):
            src = make_ckpt(tmp_path / f"e{epoch}", epoch, files=1)
            ids.append(store.push(src, epoch=epoch, metrics={"val_loss": loss}, monitor="val_loss", mode="min").id)
        assert store.best().id == ids[losses.index(min(losses))]
        assert store.latest().id == ids[-1]
        assert store.get(2).id == ids[1]
        assert store.get(ids[0]).epoch == 1
        with pytest.raises(CheckpointNotFoundError):
            store.get(99)
        with pytest.raises(FileNotFoundError):  # typed error is also the built-in
            store.get("ckpt-nope-00000000")
        pulled = store.pull("best", to=tmp_path / "best")
        assert tree(pulled.path) == tree(tmp_path / "e2")


def test_retention_on_commit_keeps_best_and_last(store_url, tmp_path):
    losses = [0.5, 0.1, 0.7, 0.6, 0.8, 0.9]
    with CheckpointStore(store_url) as store:
        ids = []
        for epoch, loss in enumerate(losses):
            src = make_ckpt(tmp_path / f"e{epoch}", epoch, files=1)
            ids.append(store.push(src, epoch=epoch, metrics={"loss": loss}, monitor="loss",
                                  keep_best=1, keep_last=2).id)
        remaining = [c.id for c in store.list()]
        best = ids[losses.index(min(losses))]
        assert remaining == [best] + ids[-2:]
        assert stored(store) == listed(store)  # pruned objects are gone, not just unlisted


def test_prune_command_and_dry_run(store_url, tmp_path):
    with CheckpointStore(store_url) as store:
        ids = [store.push(make_ckpt(tmp_path / f"e{e}", e, files=1), epoch=e).id for e in range(6)]
        would = store.prune(keep_last=1, keep_every=2, dry_run=True)
        assert [c.id for c in store.list()] == ids  # dry run deletes nothing
        expected_kept = {ids[0], ids[2], ids[4], ids[5]}
        assert {c.id for c in would} == set(ids) - expected_kept
        store.prune(keep_last=1, keep_every=2)
        assert {c.id for c in store.list()} == expected_kept
        assert stored(store) == listed(store)


def test_corrupted_object_is_refused_and_fallback_takes_older(store_url, tmp_path):
    with CheckpointStore(store_url) as store:
        good = store.push(make_ckpt(tmp_path / "a", 1), epoch=1)
        bad = store.push(make_ckpt(tmp_path / "b", 2), epoch=2)
        victim = bad.files[0]
        # overwrite one stored object with same-size different bytes (bit rot / tampering)
        store.backend.write_bytes(f"{bad.id}/{victim.path}", b"\x00" * victim.size)
        target = tmp_path / "restored"
        with pytest.raises(IntegrityError):
            store.pull("latest", to=target)
        assert not target.exists()  # nothing half-written
        assert [p.name for p in tmp_path.iterdir() if "cloudckpt-pull" in p.name] == []
        result = store.pull("latest", to=target, fallback=True)
        assert result.entry.id == good.id and result.skipped == (bad.id,)
        assert tree(result.path) == tree(tmp_path / "a")
        verdict = {r.id: r.ok for r in store.verify(all=True)}
        assert verdict == {good.id: True, bad.id: False}


def test_tampered_index_is_an_integrity_error(store_url, tmp_path):
    with CheckpointStore(store_url) as store:
        store.push(make_ckpt(tmp_path / "a", 1, files=1), epoch=1)
        data, token = store.backend.read_index()
        doc = json.loads(data)
        doc["checkpoints"][0]["files"][0]["path"] = "../../etc/passwd"
        store.backend.write_index(json.dumps(doc).encode(), token)
        with pytest.raises(IntegrityError, match="unsafe path"):
            store.list()
        with pytest.raises(ValueError):  # IntegrityError is also a ValueError
            store.pull("latest", to=tmp_path / "x")
        assert not (tmp_path / "x").exists()


def test_fencing_superseded_writer_stops(store_url, tmp_path):
    src = make_ckpt(tmp_path / "a", 1, files=1)
    old = CheckpointStore(store_url)
    new = CheckpointStore(store_url)
    try:
        old.claim()
        old.push(src, epoch=1)
        new.claim()  # the replacement instance starts while the old one still drains
        with pytest.raises(StaleWriterError, match="superseded"):
            old.push(src, epoch=2)
        committed = new.push(src, epoch=2)
        assert [c.epoch for c in new.list()] == [1, 2]
        assert new.index().writer.id == new.keeper.writer_id
        assert new.latest().id == committed.id
    finally:
        old.close()
        new.close()


def test_racing_writers_lose_no_update(store_url, tmp_path):
    """Two writers (separate store objects, as two machines would be) commit concurrently: every commit is listed."""
    rounds = 6 if store_url.startswith(("s3", "gs", "az")) else 15
    src = make_ckpt(tmp_path / "a", 1, files=1)
    committed: list[str] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def writer(n: int) -> None:
        with CheckpointStore(store_url, workers=2) as store:
            for i in range(rounds):
                try:
                    e = store.push(src, epoch=n * 1000 + i)
                    with lock:
                        committed.append(e.id)
                except BaseException as exc:  # noqa: BLE001 - collected and asserted below
                    errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with CheckpointStore(store_url) as store:
        assert sorted(c.id for c in store.list()) == sorted(committed)
        assert len(committed) == 2 * rounds
        assert store.index().seq >= 2 * rounds


def test_gc_removes_leftovers_of_uncommitted_pushes(store_url, tmp_path):
    with CheckpointStore(store_url) as store:
        keep = store.push(make_ckpt(tmp_path / "a", 1), epoch=1)
        # leftovers as a crashed commit leaves them: files uploaded, maybe a manifest, never indexed
        store.backend.write_bytes("ckpt-e000002-deadbeef/part0.bin", b"orphan" * 100)
        store.backend.write_bytes(f"ckpt-e000002-deadbeef/{MANIFEST_NAME}", b"{}")
        store.backend.write_bytes("unrelated/user-file.txt", b"not ours")  # never touched by gc
        young = store.gc(min_age=3600)
        assert young.deleted == [] and young.kept_young == ["ckpt-e000002-deadbeef"]
        plan = store.gc(min_age=0, dry_run=True)
        assert set(plan.deleted) == {"ckpt-e000002-deadbeef/part0.bin", f"ckpt-e000002-deadbeef/{MANIFEST_NAME}"}
        assert "ckpt-e000002-deadbeef/part0.bin" in stored(store)  # dry run
        report = store.gc(min_age=0)
        assert report.checkpoints == ["ckpt-e000002-deadbeef"]
        assert stored(store) == listed(store) | {"unrelated/user-file.txt"}
        assert store.verify(keep.id)[0].ok


def test_pull_refuses_a_foreign_nonempty_target(store_url, tmp_path):
    with CheckpointStore(store_url) as store:
        store.push(make_ckpt(tmp_path / "a", 1, files=1), epoch=1)
        target = tmp_path / "mine"
        target.mkdir()
        (target / "precious.txt").write_text("user data")
        with pytest.raises(ValueError, match="not empty"):
            store.pull("latest", to=target)
        assert (target / "precious.txt").read_text() == "user data"
        again = tmp_path / "again"
        store.pull("latest", to=again)
        second = store.push(make_ckpt(tmp_path / "b", 2, files=2), epoch=2)
        store.pull("latest", to=again)  # a previous pull is replaced whole
        assert tree(again) == tree(tmp_path / "b")
        assert json.loads((again / ".cloudckpt.json").read_text())["checkpoint"]["id"] == second.id


def test_empty_run_and_missing_run(store_url, tmp_path):
    with CheckpointStore(store_url) as store:
        with pytest.raises(CheckpointNotFoundError, match="no cloudckpt run"):
            store.list()
        with pytest.raises(CheckpointNotFoundError):
            store.pull("latest", to=tmp_path / "x")
        assert not (tmp_path / "x").exists()


def test_sha256_recorded_and_checked(store_url, tmp_path):
    src = make_ckpt(tmp_path / "a", 1, files=1)
    with CheckpointStore(store_url) as store:
        entry = store.push(src, epoch=1, sha256=True)
        f = entry.files[0]
        assert f.sha256 == file_checksums(src / f.path, sha256=True)["sha256"]
        assert store.verify("latest")[0].ok


def test_other_fsspec_urls_work_with_unsafe_no_cas(tmp_path):
    """No conditional write there: writing needs the option that accepts the risk (tests/test_capabilities.py)."""
    src = make_ckpt(tmp_path / "a", 1, files=2)
    with CheckpointStore("memory://cloudckpt-test/run", unsafe_no_cas=True) as store:
        entry = store.push(src, epoch=1)
        assert store.latest().id == entry.id
        result = store.pull("latest", to=tmp_path / "out")
        assert tree(result.path) == tree(src)
        assert store.verify()[0].ok


def test_bad_urls_and_options_are_configuration_errors(tmp_path):
    from cloudckpt import ConfigurationError

    (tmp_path / "file").write_text("x")
    for url, kwargs in [("s3://ab/run", {}), ("gs://x/run", {}), (str(tmp_path / "file"), {}), ("", {}),
                        ("s3://bucket/run", {"nonsense": 1})]:
        with pytest.raises(ConfigurationError):
            CheckpointStore(url, **kwargs)


def test_a_local_store_can_be_named_by_a_path_object(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "w.bin").write_bytes(b"weights")
    with CheckpointStore(tmp_path / "store") as by_path:
        entry = by_path.push(src, epoch=1)
    with CheckpointStore(str(tmp_path / "store")) as by_str:
        assert [c.id for c in by_str.list()] == [entry.id]
        assert by_str.url == by_path.url


def test_unchanged_index_is_not_downloaded_or_parsed_again(store_url, tmp_path, monkeypatch):
    import cloudckpt.commit as commit

    parsed = []
    real = commit.parse_index
    monkeypatch.setattr(commit, "parse_index", lambda data: parsed.append(len(data)) or real(data))
    src = make_ckpt(tmp_path / "a", 1, files=1)
    with CheckpointStore(store_url) as writer, CheckpointStore(store_url) as other:
        writer.push(src, epoch=1)
        writer.push(src, epoch=2)   # its own last write is cached: no parse
        assert parsed == []
        assert [c.epoch for c in writer.list()] == [1, 2]
        assert parsed == []
        other.push(src, epoch=3)    # another writer: first read parses
        assert len(parsed) == 1
        assert [c.epoch for c in writer.list()] == [1, 2, 3]  # changed underneath: parsed again, not stale
        assert len(parsed) == 2


def test_push_refuses_symlinks_and_empty_dirs_without_writing(tmp_path, local_url):
    from cloudckpt import ConfigurationError

    src = make_ckpt(tmp_path / "a", 1, files=1)
    (src / "escape").symlink_to("/etc/passwd")
    (tmp_path / "empty").mkdir()
    with CheckpointStore(local_url) as store:
        for bad in (src, tmp_path / "empty", tmp_path / "missing"):
            with pytest.raises(ConfigurationError):
                store.push(bad, epoch=1)
        assert store.backend.list_objects() == []


@pytest.mark.parametrize("name", [".cloudckpt.json", "sub/.cloudckpt-tmp-0123-part.bin"])
def test_a_file_named_like_cloudckpts_own_is_refused_before_anything_is_stored(tmp_path, local_url, name):
    """A top-level ``.cloudckpt.json`` would be overwritten by the pull marker on restore, and a ``.cloudckpt-tmp-*``
    file is what gc removes as a leftover write: both names are reserved (cloudckpt/layout.py)."""
    from cloudckpt import ConfigurationError

    src = make_ckpt(tmp_path / "src", 1, files=1)
    (src / name).parent.mkdir(parents=True, exist_ok=True)
    (src / name).write_bytes(b"the user's own bytes")
    with CheckpointStore(local_url) as store:
        with pytest.raises(ConfigurationError, match="reserved name"):
            store.push(src, epoch=1)
        assert store.backend.list_objects() == []


def test_push_takes_the_policy_as_one_object_or_as_settings_not_both(tmp_path, local_url):
    from cloudckpt import ConfigurationError
    from cloudckpt.retention import Retention

    src = make_ckpt(tmp_path / "src", 1, files=1)
    with CheckpointStore(local_url) as store:
        with pytest.raises(ConfigurationError, match="not both"):
            store.push(src, epoch=1, policy=Retention(keep_last=1), keep_last=2)
        for epoch in (1, 2, 3):
            store.push(src, epoch=epoch, metrics={"loss": 1.0 / epoch}, policy=Retention(monitor="loss", keep_last=1))
        index = store.index()
    assert index.run.retention == Retention(monitor="loss", mode="min", keep_last=1)
    assert [c.epoch for c in index.checkpoints] == [3]
