"""Explored: whatever this machine holds — an earlier pull in the target, an interrupted pull's partial folder, a
cache, each file there good, missing, bit-flipped, truncated, extended, plus strays and links — a pull restores
exactly the manifest's files, fetches exactly those found good nowhere, never writes through a link, and leaves the
earlier pull untouched until the swap (a local run; fetches counted at the backend's download)."""

from __future__ import annotations

import os
import tempfile
import threading
from pathlib import Path
from unittest import mock

import google_crc32c
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cloudckpt import CheckpointStore, checksum
from cloudckpt.cache import Cache
from cloudckpt.pull_plan import partial_dir

STATES = ("absent", "good", "flipped", "truncated", "extended")


def _write(p: Path, good: bytes, state: str) -> None:
    if state == "absent":
        return
    data = bytearray(good)
    if state == "flipped":
        if not data:
            return
        data[len(data) // 2] ^= 0x01
    elif state == "truncated":
        if not data:
            return
        del data[-1]
    elif state == "extended":
        data += b"!"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(bytes(data))


files_st = st.lists(st.tuples(st.sampled_from(["a.bin", "b.bin", "sub/c.bin", "sub/deep/d.bin"]),
                              st.integers(0, 70_000)), min_size=1, max_size=4, unique_by=lambda t: t[0])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(files=files_st, data=st.data(), with_target=st.booleans(), with_partial=st.booleans(),
       with_cache=st.booleans(), piece=st.sampled_from([checksum.PIECE, 4096, 1000]))
def test_a_pull_restores_exactly_the_manifest_and_fetches_only_what_nothing_here_holds(files, data, with_target,
                                                                                       with_partial, with_cache,
                                                                                       piece):
    # piece: the size of the pieces a re-used file is hashed in, on several threads (small: many pieces per file)
    with tempfile.TemporaryDirectory() as tmp, mock.patch.object(checksum, "PIECE", piece):
        root = Path(tmp)
        contents = {rel: os.urandom(size) for rel, size in files}
        src = root / "src"
        for rel, blob in contents.items():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            (src / rel).write_bytes(blob)
        outside = root / "outside.bin"
        outside.write_bytes(b"never written")
        target = root / "out"
        places = {"target": target, "partial": partial_dir(target)}
        cache = Cache(root / "cache") if with_cache else None
        states: dict[str, dict[str, str]] = {}
        with CheckpointStore(str(root / "store"), cache_dir=cache.root if cache else None) as store:
            entry = store.push(src, epoch=1)
            for place, on in (("target", with_target), ("partial", with_partial)):
                if not on:
                    continue
                states[place] = {rel: data.draw(st.sampled_from(STATES), label=f"{place} {rel}") for rel in contents}
                for rel, state in states[place].items():
                    _write(places[place] / rel, contents[rel], state)
                places[place].mkdir(exist_ok=True)
                (places[place] / "stray.bin").write_bytes(b"not in the manifest")
                if place == "target":
                    (target / ".cloudckpt.json").write_text("{}")  # an earlier pull
            if with_partial and data.draw(st.booleans(), label="link in partial"):
                victim = next(iter(contents))
                p = places["partial"] / victim
                p.unlink(missing_ok=True)
                p.parent.mkdir(parents=True, exist_ok=True)
                p.symlink_to(outside)  # planted: a pull must never write through it
                states["partial"][victim] = "link"
            if cache is not None:
                states["cache"] = {}
                for f in entry.files:
                    state = data.draw(st.sampled_from(STATES), label=f"cache {f.path}")
                    states["cache"][f.path] = state
                    _write(cache.path(f), contents[f.path], state)
            witness = root / "witness"  # hard links to the earlier pull's files: writing into one shows here
            witness.mkdir()
            before = {}
            for i, p in enumerate(sorted(target.rglob("*")) if with_target else []):
                if p.is_file() and not p.is_symlink():
                    os.link(p, witness / str(i))
                    before[witness / str(i)] = p.read_bytes()
            fetched: list[str] = []
            download = store.backend.download

            def counted(rel, local, **kw):
                fetched.append(rel.split("/", 1)[1])
                return download(rel, local, **kw)

            store.backend.download = counted  # type: ignore[method-assign]
            store.pull("latest", to=target)
        got = {p.relative_to(target).as_posix(): p.read_bytes() for p in target.rglob("*")
               if p.is_file() and p.name != ".cloudckpt.json"}
        assert got == contents
        good_somewhere = {rel for rel in contents if any(s.get(rel) == "good" for s in states.values())}
        assert sorted(fetched) == sorted(set(contents) - good_somewhere), states
        assert outside.read_bytes() == b"never written"
        assert not partial_dir(target).exists()
        assert {p: p.read_bytes() for p in before} == before
        if cache is not None:  # what was fetched is cached now, verifying
            assert all(cache.check(f) for f in entry.files if f.path in fetched)


@settings(max_examples=60, deadline=None)
@given(size=st.integers(0, 50_000), piece=st.integers(1, 20_000), block=st.integers(1, 9_000))
def test_a_file_hashed_in_pieces_on_threads_has_the_crc32c_of_its_bytes(size, piece, block):
    with tempfile.NamedTemporaryFile() as f, mock.patch.object(checksum, "PIECE", piece), \
            mock.patch.object(checksum, "BLOCK", block):
        data = os.urandom(size)
        f.write(data)
        f.flush()
        assert checksum.file_crc32c(f.name) == (size, f"{google_crc32c.value(data):08x}")


@pytest.mark.parametrize("change", [b"appended", b""])
def test_a_file_that_grows_or_shrinks_while_hashed_is_reported_at_its_new_size(tmp_path, change):
    """Pieces are read up to the size the file had when opened: bytes appended meanwhile would go unread, and the
    first bytes could match a manifest the whole file doesn't (the old sequential read went on to the end)."""
    path = tmp_path / "f"
    path.write_bytes(os.urandom(100_000))
    calls: list[int] = []

    def check():
        calls.append(1)
        if len(calls) == 1:
            with open(path, "ab" if change else "r+b") as f:
                f.write(change) if change else f.truncate(50_000)

    with mock.patch.object(checksum, "PIECE", 30_000), mock.patch.object(checksum, "BLOCK", 10_000):
        size, _ = checksum.file_crc32c(path, check=check)
    assert size == path.stat().st_size != 100_000


def test_hashing_in_pieces_stops_when_the_check_says_so_on_every_thread(tmp_path):
    """The check runs on the hashing threads in the caller's context (a pull's cancel token is read there), and its
    exception is what the caller sees."""
    (tmp_path / "f").write_bytes(os.urandom(100_000))
    seen: list[str] = []

    def check():
        seen.append(threading.current_thread().name)
        if len(seen) > 3:
            raise KeyboardInterrupt

    with mock.patch.object(checksum, "PIECE", 10_000), mock.patch.object(checksum, "BLOCK", 1_000), \
            pytest.raises(KeyboardInterrupt):
        checksum.file_crc32c(tmp_path / "f", check=check)
    assert any(name.startswith("cloudckpt-hash") for name in seen) and len(seen) < 100


def test_a_partial_folder_of_another_checkpoint_whose_files_and_folders_clash_is_taken_over(tmp_path):
    """An interrupted pull of a checkpoint with a file ``sub`` and a folder ``a.bin/``, then a pull into the same
    target of one with ``sub/c.bin`` and a file ``a.bin``: the clashing leftovers make way, the pull completes."""
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "c.bin").write_bytes(b"c" * 100)
    (src / "a.bin").write_bytes(b"a" * 100)
    target = tmp_path / "out"
    partial = partial_dir(target)
    (partial / "a.bin").mkdir(parents=True)
    (partial / "a.bin" / "x").write_bytes(b"old")
    (partial / "sub").write_bytes(b"a file where a folder goes")
    with CheckpointStore(str(tmp_path / "store")) as store:
        store.push(src, epoch=1)
        store.pull("latest", to=target)
    assert (target / "sub" / "c.bin").read_bytes() == b"c" * 100 and (target / "a.bin").read_bytes() == b"a" * 100
    assert not partial.exists()
