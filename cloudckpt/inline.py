"""Small files that ride inside a checkpoint's manifest object instead of taking an object (and a PUT) each.

A checkpoint's small files — the Keras callback's resume state (``state.json``, a small ``variables.npz``), a
framework's config — cost a request each when stored as objects, more than their bytes are worth. A push reads each
file of at most :data:`~cloudckpt.manifest.MAX_INLINE_FILE` bytes (up to :data:`~cloudckpt.manifest.MAX_INLINE_TOTAL`
per checkpoint, smallest first) once, hashed as read like any upload, and carries its bytes base64-encoded in the
manifest (``<id>/_cloudckpt_manifest.json``); the index entry lists it like any file, with its size and checksums,
marked ``"inline": true``. So a checkpoint costs one PUT per larger file, plus the manifest and the index.

Reading, the manifest is input: it must describe exactly the index's entry, and each inline file's bytes must have
the entry's size and checksums (:func:`inline_contents`), or the checkpoint is an IntegrityError — nothing is written.

Example:
    >>> import tempfile, pathlib
    >>> from cloudckpt.transfer import scan
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (d / "big.bin").write_bytes(b"x" * (MAX_INLINE_FILE + 1))
    >>> _ = (d / "state.json").write_bytes(b"{}")
    >>> [f.rel for f in split_inline(scan(d))[1]]
    ['state.json']
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable, Mapping
from pathlib import Path

from .checksum import StreamChecksums
from .errors import IntegrityError, UnsafePathError
from .manifest import MAX_INLINE_FILE, MAX_INLINE_TOTAL, CheckpointEntry, FileEntry, Manifest
from .transfer import LocalFile


def split_inline(files: list[LocalFile]) -> tuple[list[LocalFile], list[LocalFile]]:
    """``(stored, inline)``: the files small enough to ride in the manifest (each at most ``MAX_INLINE_FILE``, the
    smallest first while the total stays within ``MAX_INLINE_TOTAL``), and the rest; each list in ``files``' order."""
    sizes = {f.rel: f.path.stat().st_size for f in files}
    chosen: set[str] = set()
    total = 0
    for f in sorted(files, key=lambda f: (sizes[f.rel], f.rel)):
        if sizes[f.rel] > MAX_INLINE_FILE or total + sizes[f.rel] > MAX_INLINE_TOTAL:
            break
        chosen.add(f.rel)
        total += sizes[f.rel]
    return [f for f in files if f.rel not in chosen], [f for f in files if f.rel in chosen]


def encode(contents: Mapping[str, bytes]) -> dict[str, str]:
    """The manifest's ``inline`` field for ``contents`` (path -> bytes)."""
    return {path: base64.b64encode(data).decode("ascii") for path, data in contents.items()}


def inline_contents(manifest: Manifest, entry: CheckpointEntry) -> dict[str, bytes]:
    """The bytes of ``entry``'s inline files from its ``manifest``, each checked against the entry's size and
    checksums; IntegrityError when the manifest is not the entry's or any content differs."""
    if manifest.checkpoint.unlabeled() != entry.unlabeled():  # pins and tags are set in the index later
        raise IntegrityError(f"{entry.id}: its manifest differs from the index entry")
    out = {}
    for f in entry.files:
        if f.inline:
            out[f.path] = _decoded(manifest.inline[f.path], f, entry.id)
    return out


def _decoded(text: str, f: FileEntry, cid: str) -> bytes:
    try:
        data = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise IntegrityError(f"{cid}/{f.path}: the manifest's inline content is not base64") from None
    if len(data) != f.size:
        raise IntegrityError(f"{cid}/{f.path}: inline content is {len(data)} bytes, the index says {f.size}")
    sums = StreamChecksums(sha256=f.sha256 is not None)
    sums.update(data)
    got = sums.result()
    if (f.crc32c and got["crc32c"] != f.crc32c) or (f.sha256 and got.get("sha256") != f.sha256):
        raise IntegrityError(f"{cid}/{f.path}: inline content checksum mismatch (crc32c {got['crc32c']}, expected "
                             f"{f.crc32c})")
    return data


def stored_files(files: Iterable[FileEntry]) -> list[FileEntry]:
    """The entries that have an object of their own (not inline)."""
    return [f for f in files if not f.inline]


def materialize(contents: Mapping[str, bytes], into: Path) -> None:
    """Write the (checked) inline files below ``into`` (a fresh directory), never outside it."""
    base = into.resolve()
    for path, data in contents.items():
        dest = into.joinpath(*path.split("/"))
        if not dest.resolve().is_relative_to(base):
            raise UnsafePathError(f"manifest path {path!r} escapes the target directory")
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(data)
