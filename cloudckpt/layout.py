"""The run's layout: checkpoint ids, the object keys under a run URL, and the names cloudckpt reserves. Pure.

A run at ``<url>`` holds ``index.json`` (the only thing readers trust) and one directory per checkpoint,
``<id>/<path>`` for each file plus ``<id>/_cloudckpt_manifest.json``. Around them cloudckpt writes a few names of its
own: temporary files (``.cloudckpt-tmp-…``, renamed into place or removed by gc), conditional-write probes under
``_cloudckpt_probe/``, the index's sealed segments under ``_cloudckpt_index/<sha256>.json`` (immutable, named by
their content's digest, referenced from ``index.json``), the local store's lock ``.index.lock`` beside the index,
and ``.cloudckpt.json`` at the top of a pulled directory. No checkpoint id and no file of a checkpoint may take one
of these names.

Example:
    >>> cid = new_checkpoint_id(3, None)
    >>> is_generated_id(cid), manifest_key(cid) == f"{cid}/{MANIFEST_NAME}"
    (True, True)
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable

INDEX_NAME = "index.json"
MANIFEST_NAME = "_cloudckpt_manifest.json"
TMP_MARK = ".cloudckpt-tmp-"  # prefix of files being written; never listed, removed by gc
PROBE_DIR = "_cloudckpt_probe"  # a writer's conditional-write probe objects (backends/capabilities.py)
LOCK_NAME = ".index.lock"  # the local store's lock file beside the index (backends/local.py)
PULL_MARKER = ".cloudckpt.json"  # written at the top of a pulled directory, naming the checkpoint (restore.py)
SEGMENT_DIR = "_cloudckpt_index"  # the index's sealed segments (segments.py), content-addressed

#: top-level names of a run that are never a checkpoint
RESERVED_IDS = frozenset({INDEX_NAME, LOCK_NAME, PROBE_DIR, SEGMENT_DIR})
_SEGMENT_RE = re.compile(r"^_cloudckpt_index/([0-9a-f]{64})\.json$")

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_GENERATED_ID_RE = re.compile(r"^ckpt-[A-Za-z0-9-]*[0-9a-f]{8}$")


def new_checkpoint_id(epoch: int | None, step: int | None) -> str:
    """A fresh id: ``ckpt[-e<epoch:06d>][-s<step:010d>]-<8 hex>``, sortable by epoch and step."""
    parts = ["ckpt"]
    if epoch is not None:
        parts.append(f"e{epoch:06d}")
    if step is not None:
        parts.append(f"s{step:010d}")
    parts.append(uuid.uuid4().hex[:8])
    return "-".join(parts)


def is_checkpoint_id(cid: object) -> bool:
    """Whether an index may list ``cid``: a short name of safe characters that is not a reserved name."""
    return isinstance(cid, str) and bool(_ID_RE.match(cid)) and cid not in RESERVED_IDS


def is_generated_id(name: str) -> bool:
    """Whether ``name`` has the shape :func:`new_checkpoint_id` makes (what gc may treat as a checkpoint's
    directory; anything else under the run URL is not cloudckpt's)."""
    return bool(_GENERATED_ID_RE.match(name))


def reserved_path_problem(path: str) -> str | None:
    """Why ``path`` (relative, inside a checkpoint) can't be a file of a checkpoint, or None: the manifest's and a
    pulled directory's marker name at the top, and any file named like a temporary file (gc would remove it)."""
    if path in (MANIFEST_NAME, PULL_MARKER):
        return "reserved name"
    if path.rsplit("/", 1)[-1].startswith(TMP_MARK):
        return f"reserved name: {TMP_MARK}* are cloudckpt's temporary files"
    return None


def object_key(cid: str, path: str) -> str:
    """The key (relative to the run URL) of file ``path`` of checkpoint ``cid``."""
    return f"{cid}/{path}"


def manifest_key(cid: str) -> str:
    """The key of checkpoint ``cid``'s manifest."""
    return object_key(cid, MANIFEST_NAME)


def checkpoint_keys(cid: str, paths: Iterable[str]) -> list[str]:
    """Every key a committed checkpoint owns: its files, then its manifest."""
    return [object_key(cid, p) for p in paths] + [manifest_key(cid)]


def probe_key(token: str) -> str:
    """The key of one conditional-write probe object."""
    return f"{PROBE_DIR}/{token}"


def segment_key(sha256: str) -> str:
    """The key of the sealed index segment whose content has this sha256 (64 lowercase hex digits)."""
    if not re.fullmatch(r"[0-9a-f]{64}", sha256):
        raise ValueError(f"not a sha256 digest: {sha256!r}")
    return f"{SEGMENT_DIR}/{sha256}.json"


def segment_digest(rel: str) -> str | None:
    """The digest named by a segment key (what gc may treat as a segment), else None."""
    m = _SEGMENT_RE.match(rel)
    return m.group(1) if m else None


def is_scratch(rel: str) -> bool:
    """Whether ``rel`` is a temporary file or a probe object: never part of a checkpoint, gc removes it when old."""
    top, _, rest = rel.partition("/")
    return rel.rsplit("/", 1)[-1].startswith(TMP_MARK) or (top == PROBE_DIR and bool(rest))
