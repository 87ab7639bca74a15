"""Restoring a checkpoint into a local directory, all or nothing.

Files are staged in a temporary directory beside the target (re-used from this machine where they verify, else
downloaded: :mod:`cloudckpt.pull_plan`) and verified; only then is the target replaced (a previous pull is moved
aside and removed). A failed pull leaves the target as it was and no temporary files behind; an interrupted one
(Ctrl-C, SIGTERM) leaves the target as it was and its staged files for the next pull. The pulled directory carries
``.cloudckpt.json``, naming the checkpoint it holds; a non-empty target without that marker is never overwritten.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath

from . import cancel
from .backends import Backend
from .cache import Cache
from .cancel import TransferCancelled
from .errors import ConfigurationError, IntegrityError
from .inline import inline_contents, materialize, stored_files
from .layout import PULL_MARKER
from .manifest import CheckpointEntry
from .pull_plan import Step, claim_staging, clear_way, keep_partial, partial_dir, prune_extras, stage, summary
from .redact import redact_url
from .transfer import Progress, read_manifest

log = logging.getLogger(__name__)
MARKER = PULL_MARKER
DCP_FORMAT = "torch-dcp"  # a checkpoint's meta["format"] when CloudStorageWriter wrote it (torch/dcp_format.py)
#: meta["format"] of a checkpoint holding DCP folders anywhere (each with its JSON metadata), e.g. the HF Trainer's
#: under FSDP (cloudckpt/hf/sharded.py)
DCP_FOLDERS_FORMAT = "torch-dcp-folders"
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
              progress: Progress | None = None, source_url: str = "", cache: Cache | None = None,
              steps: list[Step] | None = None) -> Path:
    """Download ``entry`` into ``target`` verified; return the target path.

    Files already on this machine that verify (an interrupted pull's, the target's, the ``cache``'s) are re-used,
    the rest fetched (:mod:`cloudckpt.pull_plan`); ``steps``, when given, is filled with where each came from.
    Interrupted (Ctrl-C, SIGTERM), what was staged is kept for the next pull and :func:`cloudckpt.cancel.keep` says
    so; any other failure leaves nothing behind."""
    target = Path(target).absolute()
    _check_target(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = claim_staging(target)
    try:
        clear_way(staging, [f.path for f in entry.files])
        stored = stored_files(entry.files)
        if len(stored) < len(entry.files):  # some ride inside the manifest: checked against the entry, then written
            contents = inline_contents(read_manifest(backend, entry.id, budget=budget), entry)
            materialize(contents, staging)
            if progress is not None:
                progress(sum(len(data) for data in contents.values()))
        staged = stage(backend, entry.id, stored, staging, target, cache=cache, budget=budget, pool=pool,
                       progress=progress)
        prune_extras(staging, {f.path for f in entry.files})
        if entry.meta.get("format") in (DCP_FORMAT, DCP_FOLDERS_FORMAT):
            _dcp_metadata(staging, entry, folders=entry.meta.get("format") == DCP_FOLDERS_FORMAT)
        marker = {"url": redact_url(source_url or backend.url), "checkpoint": entry.summary()}
        (staging / MARKER).write_text(json.dumps(marker, indent=1))
        staging.chmod(0o777 & ~_UMASK)  # mkdtemp made it 0700; the restored directory gets normal permissions
        _swap_into_place(staging, target)
    except (KeyboardInterrupt, TransferCancelled):
        try:
            cancel.keep(keep_partial(staging, target, entry.size))
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(partial_dir(target), ignore_errors=True)  # an older interrupted pull's, not taken over
    if steps is not None:
        steps[:] = staged
    used = summary(staged)
    log.info("pulled %s (%d files, %d bytes) into %s; fetched %d files (%d bytes), re-used %s", entry.id,
             len(entry.files), entry.size, target, used["store"]["files"], used["store"]["bytes"],
             ", ".join(f"{v['files']} from {k}" for k, v in used.items() if k != "store" and v["files"]) or "none")
    return target


def _dcp_metadata(folder: Path, entry: CheckpointEntry, *, folders: bool = False) -> None:
    """A checkpoint written through DCP: write the ``.metadata`` DCP's ``FileSystemReader`` reads, from the pulled
    and validated JSON metadata (never a ``.metadata`` the store listed: every one is removed). ``folders``: each
    directory holding a JSON metadata is a DCP checkpoint, else only the top. Needs torch; without it the folder
    keeps only the JSON."""
    for planted in ([*folder.rglob(".metadata")] if folders else [folder / ".metadata"]):
        if planted.is_dir():
            raise IntegrityError(f"{entry.id}: {planted.relative_to(folder)} is a folder where DCP reads its metadata")
        planted.unlink(missing_ok=True)
    try:
        from .torch.dcp_format import METADATA_NAME, write_local_metadata
    except ImportError as exc:
        log.warning("%s is a DCP checkpoint; without torch (%s) no .metadata is written for DCP's reader", entry.id,
                    exc)
        return
    if not folders:
        write_local_metadata(folder, {f.path: f.size for f in entry.files if f.path != METADATA_NAME})
        return
    for sub in sorted({str(PurePosixPath(f.path).parent) for f in entry.files
                       if PurePosixPath(f.path).name == METADATA_NAME}):
        inside = {PurePosixPath(f.path).name: f.size for f in entry.files
                  if str(PurePosixPath(f.path).parent) == sub and PurePosixPath(f.path).name != METADATA_NAME}
        write_local_metadata(folder / sub, inside)


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
