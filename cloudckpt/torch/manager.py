"""CheckpointManager: a hand-written PyTorch loop's checkpoints, committed to a store in the background."""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from .. import drain
from ..errors import CheckpointNotFoundError, ConfigurationError, SaveFailure, commit_failed
from ..fallback import newest_usable
from ..manifest import CheckpointEntry
from ..metrics import finite_metrics
from ..preemption import PreemptionWatch
from ..store import CheckpointStore
from ..uploader import Job, Uploader, new_staging_dir, remove_staging
from .state import STATE_FILE, copy_to_cpu, read_state, write_state

log = logging.getLogger(__name__)

EXIT_PREEMPTED = 143
"""Exit status after a preemption checkpoint (128 + SIGTERM), the same as the Keras callback's."""
FRAMEWORK = "torch"


@dataclass(frozen=True)
class Restored:
    """A checkpoint read back: its ``state`` (tensors on ``map_location``), step, epoch, metrics and index entry."""

    state: Any
    step: int | None
    epoch: int | None
    metrics: dict[str, float] = field(default_factory=dict)
    entry: CheckpointEntry | None = None


class CheckpointManager:
    """Saves a training loop's state to a store: the training thread copies tensors to CPU memory, a background
    thread serializes (``torch.save``) and commits them (verified, atomic; see :class:`~cloudckpt.CheckpointStore`).

    Saves are bounded: while an upload runs, at most the newest save and the newest best wait behind it; an older
    waiting save is dropped when a newer one comes (coalesced), so memory holds at most three copies of the state.
    Retention (``keep_*``, ``monitor``/``mode``) is applied by the store at each commit and never drops the latest or
    the best. Opening the manager claims the run: an older writer on the same remote is fenced and its next
    :meth:`save` raises :class:`~cloudckpt.errors.StaleWriterError`. Restores load with
    ``torch.load(weights_only=True)``: tensors and plain data only, nothing from the bucket is unpickled as an object.

    SIGTERM and the clouds' preemption notices (see :mod:`cloudckpt.preemption`) set :attr:`preempted`; the loop
    checks it at a step boundary and calls :meth:`save_and_exit`, which commits and exits with status 143.

    A save whose upload fails (after ``store_budget``) is logged and kept: a best is retried at the next
    :meth:`save` (never replaced by a worse one), another is superseded by it; :meth:`wait` returns False while a
    save is not committed and :meth:`failures` names each; :meth:`close` retries once more and raises
    :class:`~cloudckpt.errors.CommitFailedError` naming every save still not committed. With
    ``on_upload_error="raise"``, the next :meth:`save` raises it instead. Whatever ends the loop — an exception or
    ``KeyboardInterrupt`` inside ``with CheckpointManager(...)``, ``sys.exit``, the end of the script without
    :meth:`close` — waits up to ``preemption_deadline`` seconds for the saves already made and logs one line saying
    whether they committed, or which did not (:mod:`cloudckpt.drain`); staging is never removed under a running
    upload.

    Example:

    ```python
    mgr = CheckpointManager("s3://bucket/runs/mnist", monitor="val_loss", keep_best=1, keep_last=2)
    start = 0
    if (r := mgr.restore()) is not None:
        model.load_state_dict(r.state["model"]); opt.load_state_dict(r.state["optimizer"]); start = r.step
    for step in range(start + 1, steps + 1):
        train_step()
        state = lambda: {"model": model.state_dict(), "optimizer": opt.state_dict(), "rng": rng_state()}
        if mgr.preempted:
            mgr.save_and_exit(step, state())
        if step % 100 == 0:
            mgr.save(step, state(), metrics={"val_loss": evaluate()})
    mgr.close()
    ```

    Args:
        remote: the store URL (``s3://``, ``gs://``, ``file://`` or a path). Default None: ``$CLOUDCKPT_REMOTE``.
        monitor: the metric that picks the best checkpoint. Default None (no best).
        mode: ``"min"`` or ``"max"``. Default ``"min"``.
        keep_best: best checkpoints kept (by ``monitor``; ignored without one). Default 1.
        keep_last: most recent checkpoints kept. Default 2.
        keep_every: also keep every checkpoint whose epoch is a multiple of this. Default None.
        preemption: ``"auto"`` (SIGTERM + the detected cloud's notices), a list of ``sigterm``/``aws``/``gce``/
            ``azure``, or None. Default ``"auto"``.
        preemption_endpoints: metadata base URLs per cloud (tests point them at a local server). Default None.
        preemption_deadline: seconds from the notice within which :meth:`save_and_exit` waits for the commit.
            Default 25.
        staging_dir: where snapshots are serialized before upload. Default the system temporary directory.
        store_budget: seconds each store operation may retry for. Default 300.
        storage_options: options for the store's backend (e.g. ``endpoint_url``). Default None.
        on_upload_error: ``"retry"`` or ``"raise"`` (see above). Default ``"retry"``.
    """

    def __init__(self, remote: str | None = None, *, monitor: str | None = None, mode: str = "min",
                 keep_best: int | None = 1, keep_last: int | None = 2, keep_every: int | None = None,
                 preemption: Any = "auto", preemption_endpoints: dict | None = None,
                 preemption_deadline: float = 25.0, staging_dir: str | Path | None = None,
                 store_budget: float = 300.0, storage_options: dict | None = None,
                 on_upload_error: str = "retry") -> None:
        if on_upload_error not in ("retry", "raise"):
            raise ConfigurationError(f"on_upload_error must be 'retry' or 'raise'. Received: {on_upload_error!r}")
        self.on_upload_error = on_upload_error
        if mode not in ("min", "max"):
            raise ConfigurationError(f"mode must be 'min' or 'max'. Received: mode={mode!r}")
        if preemption_deadline <= 0:
            raise ConfigurationError(f"preemption_deadline must be > 0. Received: {preemption_deadline}")
        self.monitor, self.mode, self.preemption_deadline = monitor, mode, preemption_deadline
        self._policy = dict(monitor=monitor, mode=mode, keep_best=keep_best if monitor else None, keep_last=keep_last,
                            keep_every=keep_every)
        self.store = CheckpointStore(remote, budget=store_budget, **(storage_options or {}))
        self.store.claim()
        self._best = self._stored_best()
        root = Path(staging_dir or os.environ.get("CLOUDCKPT_STAGING") or tempfile.gettempdir())
        self._staging = new_staging_dir(root, root)
        self._seq = 0
        self._best_job: Job | None = None
        self.uploader = Uploader(self.store)
        self._watch = PreemptionWatch(preemption, endpoints=preemption_endpoints)
        self._watch.start()
        self._closed = False
        drain.register(self)

    # --- saving ------------------------------------------------------------------------------------------------

    @property
    def preempted(self) -> bool:
        """True once SIGTERM or a preemption notice arrived."""
        return self._watch.triggered

    def save(self, step: int, state: Any, *, metrics: dict[str, float] | None = None,
             epoch: int | None = None) -> Job:
        """Copy ``state`` to CPU memory and queue its commit; return the job (``job.done`` is set once handled).
        A NaN or infinite metric is recorded as no value (never the best; :mod:`cloudckpt.metrics`).

        Raises:
            StaleWriterError: a newer writer claimed the run; this one must stop.
            ConfigurationError: ``state`` holds something other than tensors and plain data.
        """
        self._check_open()
        if self.uploader.fatal is not None:
            raise self.uploader.fatal
        if self.on_upload_error == "raise" and (failed := self.uploader.failures()):
            raise commit_failed(failed, self.store.url)
        t0 = time.perf_counter()
        snap = copy_to_cpu(state)
        metrics = finite_metrics(metrics)  # NaN/inf: no value, never the best (cloudckpt.metrics)
        improved = self._improves(metrics)
        self._seq += 1
        job_dir = self._staging / f"save-{self._seq:06d}"
        job_dir.mkdir()

        def serialize(path: Path) -> None:  # on the uploader's thread
            write_state(snap, path)

        if improved and self._best_job is not None:
            self._best_job.protected = False  # a better one is coming: the older best may be coalesced away
        job = self.uploader.submit(job_dir, dict(step=int(step), epoch=epoch, metrics=metrics,
                                                 meta={"framework": FRAMEWORK, "format": "torch-weights-only"},
                                                 **self._policy), protected=improved, prepare=serialize)
        if improved:
            self._best = metrics[self.monitor]  # type: ignore[index]
            self._best_job = job
        log.debug("step %d copied for commit in %.3fs", step, time.perf_counter() - t0)
        return job

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until every queued save is committed or failed. True only if every save so far is committed (or was
        superseded by a newer committed one); False if one is not (see :meth:`failures`) or ``timeout`` seconds
        passed first."""
        return self.uploader.flush(timeout)

    def failures(self) -> list[SaveFailure]:
        """The saves whose upload failed and that are not committed (held for a retry at the next save)."""
        return self.uploader.failures()

    def save_and_exit(self, step: int, state: Any, *, metrics: dict[str, float] | None = None,
                      epoch: int | None = None) -> NoReturn:
        """Save, wait for the commit until ``preemption_deadline`` after the notice, and exit with status 143."""
        notice = self._watch.notice_time or time.monotonic()
        job = self.save(step, state, metrics=metrics, epoch=epoch)
        left = self.preemption_deadline - (time.monotonic() - notice)
        ok = self.uploader.flush(max(left, 1.0))
        if ok and job.entry is not None:
            log.warning("preemption (%s): step %d committed as %s %.2fs after the notice; exiting",
                        self._watch.reason, step, job.entry.id, time.monotonic() - notice)
        else:
            log.error("preemption (%s): step %d was NOT committed within %gs of the notice; a restart resumes from "
                      "the latest committed checkpoint", self._watch.reason, step, self.preemption_deadline)
        if not ok:  # an upload still hangs: don't let interpreter shutdown wait for it
            logging.shutdown()
            os._exit(EXIT_PREEMPTED)
        self._shutdown()
        raise SystemExit(EXIT_PREEMPTED)

    def close(self, timeout: float | None = None) -> None:
        """Commit what is queued (retrying once what failed), then stop.

        Raises:
            CommitFailedError: a save is not committed (named with its step and error).
        """
        if self._closed:
            return
        try:
            if not self.uploader.flush(timeout) and self.uploader.retry():
                self.uploader.flush(timeout)
            self.uploader.close(0)
            self.uploader.raise_if_uncommitted()
        finally:
            self._shutdown()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
            return
        self.drain_at_exit(f"{getattr(exc_type, '__name__', exc_type)} inside `with CheckpointManager`")

    def drain_at_exit(self, why: str = "the process is exiting without close()") -> None:
        """Wait up to ``preemption_deadline`` for the saves already made, say how it went, and stop (the exit
        drain, :mod:`cloudckpt.drain`; also what an exception inside ``with`` does). The exception is not
        swallowed."""
        if self._closed:
            return
        drain.unregister(self)  # a second Ctrl-C during this wait ends it, and nothing waits again at exit
        drain.settle(self.uploader, deadline=self.preemption_deadline, why=why)
        self._shutdown()

    # --- restoring ---------------------------------------------------------------------------------------------

    def restore(self, selector: str | int = "latest", *, map_location: Any = "cpu") -> Restored | None:
        """Read back ``"latest"``, ``"best"``, a step (an int) or a checkpoint id; None when the run has none.

        ``"latest"`` falls back: a checkpoint that fails verification or whose ``state.pt`` is not plain tensors and
        data is skipped, with a warning, for the newest older one that reads (as the Keras callback resumes). Any
        other selector names one checkpoint: its failure raises.

        Raises:
            CheckpointNotFoundError: the selector names no checkpoint (a run with checkpoints, but not that one).
            IntegrityError: the checkpoint fails verification, or its file holds more than tensors and plain data
                (for ``"latest"``: every checkpoint of this manager does).
        """
        try:
            index = self.store.index()
        except CheckpointNotFoundError:
            return None
        ours = [c for c in index.checkpoints if any(f.path == STATE_FILE for f in c.files)]
        if not ours:
            return None
        if isinstance(selector, int):
            matches = [c for c in ours if c.step == selector]
            if not matches:
                raise CheckpointNotFoundError(f"{self.store.url}: no checkpoint at step {selector}")
            return self._read(matches[-1], map_location)
        if selector != "latest":
            return self._read(index.resolve(selector), map_location)
        # the latest was maybe pushed by another tool: the newest of ours first
        return newest_usable(reversed(ours), lambda entry: self._read(entry, map_location), doing="restored",
                             none_usable=f"{self.store.url}: no checkpoint of this manager can be restored")

    def _read(self, entry: CheckpointEntry, map_location: Any) -> Restored:
        to = self._staging / f"restore-{entry.id}"
        try:
            pulled = self.store.pull(entry.id, to=to)
            state = read_state(pulled.path, map_location)
        finally:
            shutil.rmtree(to, ignore_errors=True)
        log.info("restored %s (step %s) from %s", entry.id, entry.step, self.store.url)
        return Restored(state, entry.step, entry.epoch, dict(entry.metrics), entry)

    # --- internals ---------------------------------------------------------------------------------------------

    def _improves(self, metrics: dict[str, float]) -> bool:
        if not self.monitor or self.monitor not in metrics or math.isnan(metrics[self.monitor]):
            return False
        value = metrics[self.monitor]
        if self._best is None:
            return True
        return value < self._best if self.mode == "min" else value > self._best

    def _stored_best(self) -> float | None:
        try:
            index = self.store.index()
        except CheckpointNotFoundError:
            return None
        if not self.monitor:
            return None
        scored = [c.metrics[self.monitor] for c in index.checkpoints if self.monitor in c.metrics
                  and not math.isnan(c.metrics[self.monitor])]
        if not scored:
            return None
        return min(scored) if self.mode == "min" else max(scored)

    def _check_open(self) -> None:
        if self._closed:
            raise ConfigurationError("the CheckpointManager is closed")

    def _shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        drain.unregister(self)
        self._watch.stop()
        if self.uploader.pending():  # an upload still runs (past the deadline): its staging stays until exit
            log.warning("an upload to %s still runs: its staging %s is left for the next run to sweep",
                        self.store.url, self._staging)
            return
        remove_staging(self._staging)
        self.store.close()

