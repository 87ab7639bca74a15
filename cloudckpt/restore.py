"""Restoring a checkpoint into a local directory, all or nothing.

Files are downloaded into a fresh temporary directory beside the target and verified; only then is the target
replaced (a previous pull is moved aside and removed). A failed pull leaves the target as it was and no temporary
files behind. The pulled directory carries ``.cloudckpt.json``, naming the checkpoint it holds; a non-empty target
without that marker is never overwritten.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .backends import Backend
from .errors import ConfigurationError
from .inline import inline_contents, materialize, stored_files
from .layout import PULL_MARKER
from .manifest import CheckpointEntry
from .redact import redact_url
from .transfer import Progress, download_verified, read_manifest

log = logging.getLogger(__name__)
MARKER = PULL_MARKER
DCP_FORMAT = "torch-dcp"  # a checkpoint's meta["format"] when CloudStorageWriter wrote it (torch/dcp_format.py)
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def _check_target(target: Path) -> None:
    if target.is_symlink():
        raise ConfigurationError(f"{target}: is a symbolic link; pull into a real directory")
    if target.exists() and not target.is_dir():
        raise ConfigurationError(f"{target}: exists and is not a directory")
    if target.is_dir() and any(target.iterdir()) and not (target / MARKER).is_file():
        raise ConfigurationError(
            f"{target}: is not empty and holds no earlier pull ({MARKER} missing); choose another --to or empty it"
        )


def pull_into(backend: Backend, entry: CheckpointEntry, target: Path, *, budget: float, pool: ThreadPoolExecutor,
              progress: Progress | None = None, source_url: str = "") -> Path:
    """Download ``entry`` into ``target`` verified; return the target path."""
    target = Path(target).absolute()
    _check_target(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.cloudckpt-pull-", dir=target.parent))
    try:
        stored = stored_files(entry.files)
        if len(stored) < len(entry.files):  # some ride inside the manifest: checked against the entry, then written
            contents = inline_contents(read_manifest(backend, entry.id, budget=budget), entry)
            materialize(contents, staging)
            if progress is not None:
                progress(sum(len(data) for data in contents.values()))
        download_verified(backend, entry.id, stored, staging, budget=budget, pool=pool, progress=progress)
        if entry.meta.get("format") == DCP_FORMAT:
            _dcp_metadata(staging, entry)
        marker = {"url": redact_url(source_url or backend.url), "checkpoint": entry.summary()}
        (staging / MARKER).write_text(json.dumps(marker, indent=1))
        staging.chmod(0o777 & ~_UMASK)  # mkdtemp made it 0700; the restored directory gets normal permissions
        _swap_into_place(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("pulled %s (%d files, %d bytes) into %s", entry.id, len(entry.files), entry.size, target)
    return target


def _dcp_metadata(folder: Path, entry: CheckpointEntry) -> None:
    """A checkpoint written through DCP: write the ``.metadata`` DCP's ``FileSystemReader`` reads, from the pulled
    and validated JSON metadata (never a ``.metadata`` the store listed). Needs torch; without it the folder keeps
    only the JSON."""
    (folder / ".metadata").unlink(missing_ok=True)
    try:
        from .torch.dcp_format import METADATA_NAME, write_local_metadata
    except ImportError as exc:
        log.warning("%s is a DCP checkpoint; without torch (%s) no .metadata is written for DCP's reader", entry.id,
                    exc)
        return
    write_local_metadata(folder, {f.path: f.size for f in entry.files if f.path != METADATA_NAME})


def _swap_into_place(staging: Path, target: Path) -> None:
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.cloudckpt-old-", dir=target.parent))
        os.replace(target, old / "old")
    try:
        os.replace(staging, target)
    except BaseException:
        if old is not None:
            os.replace(old / "old", target)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
