"""Where each file of a pull comes from: re-used from what is already on this machine, or fetched from the store.

A pull stages the checkpoint in a folder beside the target (:mod:`cloudckpt.restore` swaps it into place once all
is verified). Before anything is fetched, each file the manifest lists is looked for, in this order:

1. ``partial``: the staging folder of an interrupted pull into the same target (kept as
   ``.<target>.cloudckpt-partial``; the next pull takes it over as its own staging folder);
2. ``target``: the target folder itself, holding an earlier pull (hard-linked into staging, copied where links
   don't work; the target is left as it is until the swap);
3. ``cache``: the node-level cache (:mod:`cloudckpt.cache`), copied;
4. ``store``: fetched (and, with a cache, added to it).

A file is re-used only when its size and every checksum the manifest records match, hashed locally; anything else
is fetched. A file found at no place is ``store``. :func:`plan` says this without writing anything
(``pull --dry-run``).
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from . import cancel
from .backends import Backend
from .cache import Cache, matches
from .checksum import BLOCK, StreamChecksums, file_crc32c
from .fetch import PART_SUFFIX, is_unfinished, landed_bytes
from .manifest import FileEntry
from .transfer import Progress, _run_all, download_verified

log = logging.getLogger(__name__)
SOURCES = ("partial", "target", "cache", "store")


@dataclass(frozen=True)
class Step:
    """One file of a pull: its path in the checkpoint, its size and where its bytes come from (:data:`SOURCES`)."""

    path: str
    size: int
    source: str


def partial_dir(target: Path) -> Path:
    """Where an interrupted pull into ``target`` keeps what it had staged."""
    return target.parent / f".{target.name}.cloudckpt-partial"


def claim_staging(target: Path) -> Path:
    """A fresh staging folder beside ``target``: the partial folder of an interrupted pull when there is one (taken
    over with one rename: of two pulls, one gets it), else empty. Links and special files are removed from a taken
    folder (nothing is ever written through a link)."""
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.cloudckpt-pull-", dir=target.parent))
    try:
        os.replace(partial_dir(target), staging)  # replaces the empty directory
    except FileNotFoundError:
        return staging
    except OSError as exc:
        log.warning("could not resume the interrupted pull in %s (%s): pulling afresh", partial_dir(target), exc)
        return staging
    for dirpath, dirnames, filenames in os.walk(staging):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            mode = p.lstat().st_mode
            if stat.S_ISLNK(mode) or not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                p.unlink()
    return staging


def clear_way(staging: Path, paths: Iterable[str]) -> None:
    """Make room in a taken-over staging folder for each of ``paths``: a file where one of them needs a folder, or a
    folder where one needs a file (left by an interrupted pull of another checkpoint), is removed."""
    for path in paths:
        parts = path.split("/")
        for i in range(1, len(parts)):
            p = staging.joinpath(*parts[:i])
            if p.is_symlink() or (p.exists() and not p.is_dir()):
                p.unlink()
                break
        dest = staging.joinpath(*parts)
        if dest.is_dir() and not dest.is_symlink():
            shutil.rmtree(dest)


def keep_partial(staging: Path, target: Path, total: int) -> str:
    """After an interruption: keep ``staging`` as the partial folder the next pull into ``target`` resumes from (an
    older one is replaced); the line that says what is kept."""
    partial = partial_dir(target)
    shutil.rmtree(partial, ignore_errors=True)
    os.replace(staging, partial)
    found = [p for p in partial.rglob("*") if p.is_file()]
    whole = [p for p in found if not is_unfinished(p)]
    parts = [p for p in found if p.name.endswith(PART_SUFFIX)]
    size = sum(p.stat().st_size for p in whole) + sum(landed_bytes(p) for p in parts)
    unfinished = f" and part of {len(parts)}" if parts else ""
    return (f"pull interrupted: kept {len(whole)} files{unfinished} ({size} of {total} bytes) in {partial}; the next "
            f"pull into {target} re-uses the ones that verify and fetches the rest")


def _regular(p: Path, size: int) -> bool:
    try:
        st = p.lstat()
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_size == size


def _hash_ok(p: Path, e: FileEntry) -> bool:
    if e.sha256 is None:  # crc32c alone: in pieces, on several threads
        try:
            size, crc = file_crc32c(p, check=cancel.check)
            return size == e.size and e.crc32c in (None, crc)
        except OSError:
            return False
    sums = StreamChecksums(sha256=True)
    try:
        with open(p, "rb", buffering=0) as f:
            while block := f.read(BLOCK):
                cancel.check()
                sums.update(block)
    except OSError:
        return False
    return matches(sums, e)


def _local(root: Path, e: FileEntry) -> Path:
    return root.joinpath(*e.path.split("/"))


def plan(entries: list[FileEntry], target: Path, cache: Cache | None, pool: ThreadPoolExecutor) -> list[Step]:
    """Where each stored file of a pull into ``target`` would come from, checked (local files hashed), nothing
    written."""
    target = Path(target).absolute()
    partial = partial_dir(target)

    def one(e: FileEntry) -> Step:
        for source, root in (("partial", partial), ("target", target)):
            p = _local(root, e)
            if root.is_dir() and _regular(p, e.size) and _hash_ok(p, e):
                return Step(e.path, e.size, source)
        if cache is not None and cache.check(e):
            return Step(e.path, e.size, "cache")
        return Step(e.path, e.size, "store")

    return _run_all(pool, one, entries)


def stage(backend: Backend, prefix: str, entries: list[FileEntry], staging: Path, target: Path, *,
          cache: Cache | None, budget: float, pool: ThreadPoolExecutor, progress: Progress | None) -> list[Step]:
    """Put every stored file of a pull into ``staging``, verified: re-used where it verifies, else fetched (and
    cached). Returns where each came from."""
    base = staging.resolve()
    advance: Callable[[int], None] = progress or (lambda n: None)

    def reuse(e: FileEntry) -> Step:
        dest = _local(staging, e)
        if not dest.resolve().is_relative_to(base):
            return Step(e.path, e.size, "store")  # download_verified refuses it with the error that names it
        if _regular(dest, e.size) and _hash_ok(dest, e):
            advance(e.size)
            return Step(e.path, e.size, "partial")
        dest.unlink(missing_ok=True)  # never written into: it may be a link to the target's file
        dest.parent.mkdir(parents=True, exist_ok=True)
        src = _local(target, e)
        if target.is_dir() and _regular(src, e.size):
            try:
                os.link(src, dest, follow_symlinks=False)
            except OSError:
                shutil.copyfile(src, dest)
            if _hash_ok(dest, e):
                advance(e.size)
                return Step(e.path, e.size, "target")
            dest.unlink(missing_ok=True)
        if cache is not None and cache.copy_out(e, dest):
            advance(e.size)
            return Step(e.path, e.size, "cache")
        return Step(e.path, e.size, "store")

    steps = _run_all(pool, reuse, entries)
    fetch = [e for e, s in zip(entries, steps) if s.source == "store"]
    if fetch and cache is not None:
        with cache.fetching(fetch):  # one process fetches each content; the others wait and find it cached
            late = [e for e in fetch if cache.copy_out(e, _local(staging, e))]
            for e in late:
                advance(e.size)
            fetch = [e for e in fetch if e not in late]
            download_verified(backend, prefix, fetch, staging, budget=budget, pool=pool, progress=progress)
            for e in fetch:
                cache.put(e, _local(staging, e))
        cache.evict()
        got = {e.path for e in late}
        steps = [Step(s.path, s.size, "cache") if s.path in got else s for s in steps]
    elif fetch:
        download_verified(backend, prefix, fetch, staging, budget=budget, pool=pool, progress=progress)
    return steps


def prune_extras(staging: Path, keep: set[str]) -> None:
    """Remove every file below ``staging`` whose relative path is not in ``keep`` (left by an interrupted pull of
    another checkpoint), and the folders left empty."""
    for dirpath, _, filenames in os.walk(staging, topdown=False):
        d = Path(dirpath)
        for name in filenames:
            p = d / name
            if p.relative_to(staging).as_posix() not in keep:
                p.unlink()
        if d != staging and not any(d.iterdir()):
            d.rmdir()


def summary(steps: list[Step]) -> dict[str, dict[str, int]]:
    """Files and bytes per source: ``{"target": {"files": 2, "bytes": 10}, ...}`` (every source listed)."""
    out = {s: {"files": 0, "bytes": 0} for s in SOURCES}
    for step in steps:
        out[step.source]["files"] += 1
        out[step.source]["bytes"] += step.size
    return out
