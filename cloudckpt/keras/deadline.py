"""The preemption window: after a notice, wait for the queued checkpoints to commit until the deadline, and say how
it went.

The deadline counts from the notice (recorded by :class:`~cloudckpt.preemption.PreemptionWatch` when it arrived),
not from the batch boundary where training got round to it. A step that outlasted the whole window still commits
what is in flight, for another window at most. Every outcome is one log line: committed in time (WARNING), committed
late (ERROR, by how much), or not committed (ERROR: a restart resumes from the latest committed checkpoint).
"""

from __future__ import annotations

import logging
import time

from ..uploader import Uploader
from .writer import Writer

log = logging.getLogger(__name__)


def commit_within(uploader: Uploader, *, notice_time: float, deadline: float, reason: str | None,
                  step: int, writer: Writer | None = None) -> bool:
    """Wait until ``uploader`` has handled everything queued, at most until ``deadline`` seconds after
    ``notice_time`` (``time.monotonic()``); log the outcome. Returns False when an upload still runs (the caller
    must not wait for it at exit), True when every queued job committed or failed.

    Args:
        uploader: holds the preemption checkpoint, queued last.
        notice_time: when the notice arrived.
        deadline: seconds from the notice within which the checkpoint must be committed.
        reason: what the notice said (for the log).
        step: the checkpoint's global step (for the log).
        writer: the background writer (``async_save``), flushed first, within the same deadline. Default None.
    """
    left = deadline - (time.monotonic() - notice_time)
    if left <= 0:  # the step outlasted the window: still commit what is in flight, for another window at most
        log.error("preemption (%s): the notice came %.2fs ago, %.2fs past the %gs deadline, before training "
                  "reached a batch boundary; committing anyway", reason, deadline - left, -left, deadline)
    budget = left if left > 0 else deadline
    t0 = time.monotonic()
    flushed = writer.flush(budget) if writer is not None else True
    flushed = flushed and uploader.flush(max(0.0, budget - (time.monotonic() - t0)))
    elapsed = time.monotonic() - notice_time
    missed = elapsed - deadline
    last = uploader.last_job
    if flushed and last is not None and last.entry is not None:
        log.log(logging.ERROR if missed > 0 else logging.WARNING,
                "preemption (%s): checkpoint %s at step %d committed %.2fs after the notice%s; stopping",
                reason, last.entry.id, step, elapsed,
                f": missed the {deadline:g}s deadline by {missed:.2f}s" if missed > 0 else "")
    else:
        log.error("preemption (%s): the checkpoint was NOT committed within %.0fs of the notice (%.2fs have "
                  "passed); a restart resumes from the latest committed one", reason, deadline, elapsed)
    return flushed
