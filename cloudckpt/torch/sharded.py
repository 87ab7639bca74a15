"""A :class:`~cloudckpt.torch.CheckpointManager` state holding ``DTensor`` values (FSDP2, tensor parallel), saved
and loaded through the DCP plugin (:mod:`cloudckpt.torch.dcp`): every rank writes its own shards, rank 0 commits one
checkpoint; a load reads on each rank only what its layout needs."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from ..errors import CloudCkptError, SaveFailure, StaleWriterError
from ..manifest import CheckpointEntry
from ..uploader import Job
from .dcp import CloudStorageReader, CloudStorageWriter, load
from .ranks import Ranks, unwrap_dcp_error

log = logging.getLogger(__name__)


def save_sharded(remote: str | None, state: Any, ranks: Ranks | None, *, step: int, epoch: int | None,
                 metrics: Mapping[str, float] | None, meta: Mapping[str, str], policy: Mapping[str, Any],
                 options: Mapping[str, Any]) -> CheckpointEntry | None:
    """Save ``state`` with ``dcp.save`` (a collective); the committed entry on rank 0, None on the others.

    Raises:
        CheckpointException: DCP's, on every rank, when a rank or the commit failed (nothing is then listed).
    """
    writer = CloudStorageWriter(remote, step=step, epoch=epoch, metrics=metrics, meta=meta, **policy, **options)
    dcp.save(state, storage_writer=writer, process_group=ranks.group if ranks else None, no_dist=ranks is None)
    return writer.committed


def load_sharded(remote: str | None, entry: CheckpointEntry, state: Any, ranks: Ranks | None,
                 options: Mapping[str, Any]) -> None:
    """Load the checkpoint ``entry`` into ``state`` in place (DCP reshards to this job's layout)."""
    reader = CloudStorageReader(remote, entry.id, **options)
    load(state, storage_reader=reader, process_group=ranks.group if ranks else None, no_dist=ranks is None)


def save_job(remote: str | None, state: Any, ranks: Ranks | None, staging: Path, failed: list[SaveFailure], *,
             step: int, epoch: int | None, metrics: dict[str, float], meta: Mapping[str, str],
             policy: Mapping[str, Any], options: Mapping[str, Any]) -> Job:
    """:func:`save_sharded` as a manager's save: a done job with its entry (rank 0), or with its error added to
    ``failed`` (a cloudckpt or OS error, on every rank); a commit clears ``failed`` (superseded).

    Raises:
        StaleWriterError: a newer job claimed the run (on every rank).
    """
    job = Job(staging, dict(step=step, epoch=epoch, metrics=metrics))
    try:
        job.entry = save_sharded(remote, state, ranks, step=step, epoch=epoch, metrics=metrics, meta=meta,
                                 policy=policy, options=options)
    except (Exception, CheckpointException) as exc:  # DCP's, on every rank, when a rank or the commit failed
        error = unwrap_dcp_error(exc)
        if isinstance(error, StaleWriterError):
            raise error from None
        if not isinstance(error, (CloudCkptError, OSError)):
            raise
        job.error = error
        failed.append(job.failure())
        log.error("sharded save of step %d was not committed (%s); a later save supersedes it", step, error)
    else:
        failed.clear()
    job.done.set()
    return job
