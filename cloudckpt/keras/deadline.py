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

from ..manifest import CheckpointEntry
from ..uploader import Uploader
from .writer import Writer

log = logging.getLogger(__name__)


def commit_within(uploader: Uploader, *, notice_time: float, deadline: float, reason: str | None,
                  step: int, writer: Writer | None = None, committed: CheckpointEntry | None = None) -> bool:
    """Wait until ``uploader`` has handled everything queued, at most until ``deadline`` seconds after
    ``notice_time`` (``time.monotonic()``); log the outcome: committed only when the job of the checkpoint at
    ``step`` committed (not an older one, e.g. when the preemption checkpoint's background write failed). Returns
    False when a write or upload still runs (the caller must not wait for it at exit), True when every queued job
    committed or failed.

    Args:
        uploader: holds the preemption checkpoint, queued last.
        notice_time: when the notice arrived.
        deadline: seconds from the notice within which the checkpoint must be committed.
        reason: what the notice said (for the log).
        step: the checkpoint's global step (for the log).
        writer: the background writer (``async_save``), flushed first, within the same deadline. Default None.
        committed: the checkpoint a save on the training thread has just committed (a sharded save,
            :mod:`cloudckpt.keras.shards`), if any. Default None.
    """
    left = deadline - (time.monotonic() - notice_time)
    if left <= 0:  # the step outlasted the window: still commit what is in flight, for another window at most
        log.error("preemption (%s): the notice came %.2fs ago, %.2fs past the %gs deadline, before training "
                  "reached a batch boundary; committing anyway", reason, deadline - left, -left, deadline)
    budget = left if left > 0 else deadline
    t0 = time.monotonic()
    written = writer.flush(budget) if writer is not None else True
    uploader.flush(max(0.0, budget - (time.monotonic() - t0)))
    idle = not uploader.pending() and (writer is None or not writer.pending())
    elapsed = time.monotonic() - notice_time
    missed = elapsed - deadline
    last = uploader.last_job  # the preemption checkpoint's job, unless its background write failed
    if committed is None and last is not None and last.push_args.get("step") == step:
        committed = last.entry
    if committed is not None and committed.step == step:
        log.log(logging.ERROR if missed > 0 else logging.WARNING,
                "preemption (%s): checkpoint %s at step %d committed %.2fs after the notice%s; stopping",
                reason, committed.id, step, elapsed,
                f": missed the {deadline:g}s deadline by {missed:.2f}s" if missed > 0 else "")
    else:
        why = ("" if written or writer is None else
               f" (its write failed: {'; '.join(str(f) for f in writer.last_failures)})")
        log.error("preemption (%s): the checkpoint at step %d was NOT committed within %.0fs of the notice%s "
                  "(%.2fs have passed); a restart resumes from the latest committed one", reason, step, deadline,
                  why, elapsed)
    return idle
