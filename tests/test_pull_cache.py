"""The node-level pull cache, used as ranks of one node use it: real ``cloudckpt`` processes against moto through a
counting proxy. A second pull into another folder fetches nothing; processes pulling the same checkpoint at once
download each file once; a damaged entry is detected and fetched again, never restored; the size bound evicts the
least recently used entries."""

from __future__ import annotations

import contextlib
import os
import subprocess
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support.shaped import proxied_run
from test_pull_resume import CLI, MiB, cli, make_ckpt, push, tree

from cloudckpt.cache import Cache, key
from cloudckpt.manifest import FileEntry


@pytest.fixture
def proxied(s3_server, s3_url):
    with proxied_run(s3_server.endpoint, s3_url) as run:
        yield run


def cache_entries(cache: os.PathLike) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in (cache / "objects").iterdir()}


def test_second_pull_into_another_folder_costs_no_download(proxied, tmp_path):
    url, proxy, env = proxied
    files = {"model.bin": os.urandom(4 * MiB), "state/opt.bin": os.urandom(MiB)}
    push(env, url, make_ckpt(tmp_path / "src", files), 1)
    cache = tmp_path / "cache"
    assert cli(env, "pull", "latest", "--remote", url, "--to", str(tmp_path / "one"), "--cache-dir",
               str(cache)).returncode == 0
    assert proxy.data_gets("model.bin", "opt.bin") == 2
    proc = cli({**env, "CLOUDCKPT_CACHE_DIR": str(cache)}, "-v", "pull", "latest", "--remote", url, "--to",
               str(tmp_path / "two"))
    assert proc.returncode == 0, proc.stderr
    assert proxy.data_gets("model.bin", "opt.bin") == 2, proxy.got  # the environment names the same cache
    assert "re-used 2 from cache" in proc.stderr
    assert tree(tmp_path / "two") == files
    plan = cli(env, "pull", "latest", "--remote", url, "--to", str(tmp_path / "three"), "--cache-dir", str(cache),
               "--dry-run")
    assert "copy from the cache: 2 files (5.00MB)" in plan.stdout, plan.stdout


@pytest.mark.parametrize("damage", ["bit flip", "truncated", "extended"])
def test_a_damaged_cache_entry_is_fetched_again_never_restored(proxied, tmp_path, damage):
    url, proxy, env = proxied
    files = {"model.bin": os.urandom(2 * MiB), "other.bin": os.urandom(1000)}
    push(env, url, make_ckpt(tmp_path / "src", files), 1)
    cache = tmp_path / "cache"
    args = ("pull", "latest", "--remote", url, "--cache-dir", str(cache), "--to")
    assert cli(env, *args, str(tmp_path / "one")).returncode == 0
    entry = cache / "objects" / next(n for n, size in cache_entries(cache).items() if size == 2 * MiB)
    data = bytearray(entry.read_bytes())
    if damage == "bit flip":
        data[MiB] ^= 0x10
    elif damage == "truncated":
        del data[-1]
    else:
        data += b"\0"
    entry.write_bytes(bytes(data))
    proc = cli(env, *args, str(tmp_path / "two"))
    assert proc.returncode == 0, proc.stderr
    assert tree(tmp_path / "two") == files  # the damaged bytes were never restored
    assert proxy.data_gets("model.bin") == 2 and proxy.data_gets("other.bin") == 1, proxy.got
    assert entry.read_bytes() == files["model.bin"]  # fetched again, and cached again


def test_processes_pulling_at_once_download_each_file_once(proxied, tmp_path):
    """Four processes (ranks of a node) pull the same checkpoint into their own folders with one cache, over a
    connection slow enough (16 MiB/s) that they overlap: each file is downloaded once, every folder is complete."""
    url, proxy, env = proxied
    files = {"model.bin": os.urandom(8 * MiB), "opt.bin": os.urandom(4 * MiB), "small.json": b"{}" * 50}
    push(env, url, make_ckpt(tmp_path / "src", files), 1)
    proxy.rate = 16 * MiB
    cache = tmp_path / "cache"
    procs = [subprocess.Popen([*CLI, "pull", "latest", "--remote", url, "--to", str(tmp_path / f"rank{i}"),
                               "--cache-dir", str(cache)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for i in range(4)]
    t0 = time.monotonic()
    outs = [p.communicate(timeout=180) for p in procs]
    elapsed = time.monotonic() - t0
    assert [p.returncode for p in procs] == [0] * 4, [err for _, err in outs]
    # once: every byte of each file crossed the network once (a file is one GET or several ranged ones)
    assert proxy.data_bytes("model.bin") == 8 * MiB and proxy.data_bytes("opt.bin") == 4 * MiB, proxy.got_bytes
    for i in range(4):
        assert tree(tmp_path / f"rank{i}") == files
    print(f"\n4 ranks, one cache: {elapsed:.2f}s, {proxy.data_bytes('model.bin', 'opt.bin') / MiB:.0f} MiB fetched")


def test_the_size_bound_evicts_the_least_recently_used(tmp_path):
    """Entries past the bound go, least recently used first; one used since it was added stays."""
    cache = Cache(tmp_path / "cache", max_bytes=3 * MiB)
    src = tmp_path / "src"
    src.mkdir()
    entries = []
    for i in range(4):
        f = src / f"f{i}"
        f.write_bytes(os.urandom(MiB))
        from cloudckpt.checksum import file_checksums

        entries.append(FileEntry(path=f.name, size=MiB, crc32c=file_checksums(f)["crc32c"]))
        cache.put(entries[-1], f)
        os.utime(cache.path(entries[-1]), (1000 + i, 1000 + i))  # added in this order
    assert cache.copy_out(entries[0], tmp_path / "used")  # f0 used last: the most recent now
    assert cache.evict() == [key(entries[1])]
    assert sum(cache_entries(tmp_path / "cache").values()) <= 3 * MiB
    assert cache.has(entries[0]) and not cache.has(entries[1])
    big = FileEntry(path="big", size=4 * MiB, crc32c="00000000")
    (src / "big").write_bytes(b"\0" * 4 * MiB)
    cache.put(big, src / "big")  # larger than the bound: never cached
    assert not cache.has(big)


@settings(max_examples=40, deadline=None)
@given(size=st.integers(0, 40_000), piece=st.integers(1, 9_000), damage=st.sampled_from(
    ["none", "flip", "truncate", "extend"]), kernel=st.sampled_from(["yes", "absent", "refused", "refused later"]))
def test_an_entry_copied_out_is_the_entrys_bytes_or_nothing(size, piece, damage, kernel):
    """Copied by the kernel or, where it can't (no copy_file_range, or it refuses these files, even after a first
    piece), through user space: the copy is the entry's bytes, or it is removed and the caller is told."""
    import errno
    import tempfile
    from pathlib import Path
    from unittest import mock

    import google_crc32c

    from cloudckpt import cache as cache_mod
    from cloudckpt import checksum

    data = os.urandom(size)
    entry = FileEntry(path="f", size=size, crc32c=f"{google_crc32c.value(data):08x}")
    stored = bytearray(data)
    if damage == "flip" and size:
        stored[size // 2] ^= 1
    elif damage == "truncate" and size:
        del stored[-1]
    elif damage == "extend":
        stored += b"!"
    real, calls = getattr(os, "copy_file_range", None), []

    def copy_file_range(*args):
        calls.append(args)
        if kernel == "refused" or (kernel == "refused later" and len(calls) > 1):
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return real(*args)

    patches = [mock.patch.object(cache_mod, "PIECE", piece), mock.patch.object(checksum, "PIECE", piece)]
    if kernel == "absent":
        patches.append(mock.patch.object(cache_mod.os, "copy_file_range", create=True, new=None))
    elif real is not None:
        patches.append(mock.patch.object(cache_mod.os, "copy_file_range", copy_file_range))
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        for p in patches:
            stack.enter_context(p)
        src, dest = Path(tmp) / "src", Path(tmp) / "dest"
        src.write_bytes(bytes(stored))
        dest.write_bytes(b"an older file")
        ok = cache_mod.copy_verified(src, dest, entry)
        assert ok == (bytes(stored) == data)
        assert (dest.read_bytes() == data) if ok else not dest.exists()
