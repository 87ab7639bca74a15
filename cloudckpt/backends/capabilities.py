"""Does a store do what the commit protocol needs? Checked once per backend object, before its first write.

The index is only safe if a conditional write that should be refused is refused: an S3-compatible store that ignores
``If-Match``/``If-None-Match`` silently loses index updates and disables fencing, and a local directory whose
``flock`` is node-local (NFS mounted ``nolock`` or ``local_lock=flock|all``, FUSE mounts such as gcsfuse or s3fs)
lets writers on two machines swap the index at once.

- Object stores: :func:`object_cas_problem` writes a probe object under the run (``_cloudckpt_probe/<uuid>``) with the
  backend's own conditional write, asks for a second create and a swap from a replaced version (both must be
  refused) and a swap from the current version (must succeed), then deletes the probe. Five requests, once.
- Local directories: :func:`mount_lock_problem` reads the root's filesystem from ``/proc/self/mountinfo`` (a pure
  parse, :func:`parse_mountinfo`), and :func:`flock_problem` checks that ``flock`` really excludes here.

Each returns None when the store is fit, else a short reason; the backend turns it into a ConfigurationError.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

from ..errors import IndexConflictError
from ..layout import probe_key

log = logging.getLogger(__name__)

MOUNTINFO = "/proc/self/mountinfo"

#: NFS options under which ``flock`` locks only on this machine (nfs(5): ``nolock``; ``local_lock=flock|all``)
_NFS_LOCAL = ("nolock", "local_lock=flock", "local_lock=all")


@dataclass(frozen=True)
class Mount:
    """One line of ``/proc/<pid>/mountinfo``: where, which filesystem, and its mount + superblock options."""

    mount_point: str
    fstype: str
    source: str
    options: frozenset[str]


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as ``\\ooo`` (octal)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo(text: str) -> list[Mount]:
    """Parse mountinfo (proc(5)): ``id parent major:minor root mount-point options [optional...] - fstype source
    super-options``. Lines that don't have this shape are skipped."""
    mounts = []
    for line in text.splitlines():
        fields = line.split(" ")
        if len(fields) < 9 or "-" not in fields[6:]:
            continue
        sep = fields.index("-", 6)
        if len(fields) < sep + 3:
            continue
        fstype, source = fields[sep + 1], _unescape(fields[sep + 2])
        supers = fields[sep + 3] if len(fields) > sep + 3 else ""
        options = frozenset(o for o in (fields[5].split(",") + supers.split(",")) if o)
        mounts.append(Mount(_unescape(fields[4]), fstype, source, options))
    return mounts


def mount_of(path: str, mounts: list[Mount]) -> Mount | None:
    """The mount ``path`` (absolute, symlinks resolved) lives on: the longest mount point containing it; of mounts
    stacked on one point, the last (the visible one)."""
    best: Mount | None = None
    for m in mounts:
        point = m.mount_point.rstrip("/") or "/"
        inside = path == point or path.startswith(point + "/") or point == "/"
        if inside and (best is None or len(point) >= len(best.mount_point.rstrip("/") or "/")):
            best = m
    return best


def lock_problem(mount: Mount) -> str | None:
    """Why ``flock`` on this filesystem would not exclude writers on other machines, or None."""
    kind = mount.fstype
    if kind in ("nfs", "nfs4"):
        local = sorted(o for o in mount.options if o in _NFS_LOCAL)
        if local:
            return (f"it is on NFS ({mount.source}) mounted with {','.join(local)}, "
                    "so file locks are local to this machine")
    if kind == "fuse" or kind.startswith("fuse."):
        return (f"it is on a FUSE filesystem ({kind}, {mount.source}), whose file locks are local to this machine "
                "(gcsfuse, s3fs and most FUSE mounts)")
    if kind in ("cifs", "smb3") and "nobrl" in mount.options:
        return f"it is on SMB ({mount.source}) mounted with nobrl, so file locks are local to this machine"
    if kind == "lustre" and "localflock" in mount.options:
        return f"it is on Lustre ({mount.source}) mounted with localflock, so file locks are local to this machine"
    return None


def mount_lock_problem(root: Path, mountinfo: str | None = None) -> str | None:
    """:func:`lock_problem` for the filesystem holding ``root`` (which must exist); None where mountinfo can't be
    read (not Linux)."""
    try:
        text = Path(mountinfo or MOUNTINFO).read_text(errors="replace")
    except OSError:
        log.debug("no %s: the filesystem of %s is not checked", mountinfo or MOUNTINFO, root)
        return None
    mount = mount_of(os.path.realpath(root), parse_mountinfo(text))
    log.debug("%s is on %s", root, mount)
    return lock_problem(mount) if mount is not None else None


def flock_problem(lock_file: Path) -> str | None:
    """Take an exclusive ``flock`` on ``lock_file`` through one open file description and try again, non-blocking,
    through a second: the second must be refused. None when it is, and where there is no ``flock`` (Windows: the
    index lock is ``LockFileEx``, which excludes every other handle)."""
    if fcntl is None:
        return None
    first = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        second = os.open(lock_file, os.O_RDWR)
        try:
            try:
                fcntl.flock(first, fcntl.LOCK_EX)
            except OSError as e:
                return f"flock fails there ({errno.errorcode.get(e.errno or 0, e.errno)}: {e.strerror})"
            try:
                fcntl.flock(second, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return None
            except OSError as e:
                return f"flock fails there ({errno.errorcode.get(e.errno or 0, e.errno)}: {e.strerror})"
            return "flock there does not exclude: a second exclusive lock on the same file was granted"
        finally:
            os.close(second)
    finally:
        os.close(first)  # closing the descriptions releases their locks


def object_cas_problem(put_if: Callable[[str, bytes, Any], Any], read: Callable[[str], bytes],
                       delete: Callable[[list[str]], None]) -> str | None:
    """Probe an object store's conditional write with a fresh object under ``layout.PROBE_DIR``.

    ``put_if(rel, data, token)`` writes ``rel`` only if its version is still ``token`` (None: only if absent) and
    returns the new token, or raises IndexConflictError when the store refuses; ``read(rel)`` returns an object's
    bytes. Other errors propagate (the caller retries transient ones; access errors are what they are).

    A store without conditional writes fails every probe; a ``gc`` beside this writer may remove a probe object
    midway (it looks like a leftover), which spoils one probe: so a problem counts only when
    :data:`PROBE_RUNS` probes, each on a fresh object, all find one.
    """
    problem: str | None = None
    for _ in range(PROBE_RUNS):
        try:
            problem = _probe_once(put_if, read, delete)
        except FileNotFoundError:  # the probe object vanished under the probe
            problem = "a probe object vanished while it was probed"
        if problem is None:
            return None
    return problem


#: probes of an object store's conditional writes that must all fail before the store is refused
PROBE_RUNS = 3


def _probe_once(put_if: Callable[[str, bytes, Any], Any], read: Callable[[str], bytes],
                delete: Callable[[list[str]], None]) -> str | None:
    rels: list[str] = []  # probe objects written (or whose create was refused as existing: written earlier)
    try:
        for _ in range(3):
            rel = probe_key(uuid.uuid4().hex)
            try:
                first = put_if(rel, b"cloudckpt conditional-write probe 1\n", None)
                rels.append(rel)
                break
            except IndexConflictError:
                rels.append(rel)
                continue  # a fresh name exists only if this very create went through and its answer was lost
        else:
            return "a create-only write of a new object was refused three times"
        rel = rels[-1]
        try:
            put_if(rel, b"cloudckpt conditional-write probe 2\n", None)
            return "a create-only write (If-None-Match: * / ifGenerationMatch=0) replaced an existing object"
        except IndexConflictError:
            pass
        swap = b"cloudckpt conditional-write probe 3\n"
        try:
            put_if(rel, swap, first)
        except IndexConflictError:
            if read(rel) != swap:  # else it went through and a retry after a lost answer found it done
                return "a write conditional on the object's current version (If-Match / ifGenerationMatch) was refused"
        try:
            put_if(rel, b"cloudckpt conditional-write probe 4\n", first)
            return "a write conditional on a replaced version (If-Match / ifGenerationMatch) was carried out"
        except IndexConflictError:
            return None
    finally:  # none written (no such bucket, no access): nothing to delete; a lost create's object is gc's
        try:
            if rels:
                delete(rels)
        except Exception as exc:  # the verdict stands; gc removes probe objects older than --min-age
            log.warning("could not delete the probe object(s) %s (%s); `cloudckpt gc` removes them later", rels,
                        " ".join(str(exc).split()))
