"""CheckpointManager: a hand-written PyTorch loop's checkpoints, committed to a store in the background."""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any, NoReturn

from .. import drain
from ..distributed_commit import forget_job_store
from ..errors import (
    CheckpointNotFoundError,
    ConfigurationError,
    SaveFailure,
    commit_failed,
)
from ..metrics import finite_metrics
from ..preemption import PreemptionWatch
from ..uploader import Job, Uploader, new_staging_dir, remove_staging
from . import ranks as _ranks
from .reading import Reader, Restored
from .state import copy_to_cpu, write_state

log = logging.getLogger(__name__)

EXIT_PREEMPTED = 143
"""Exit status after a preemption checkpoint (128 + SIGTERM), the same as the Keras callback's."""
FRAMEWORK = "torch"


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

    Under ``torchrun`` (``torch.distributed`` initialised with more than one process; ``distributed=None`` detects
    it) every rank opens a manager, with the same arguments, and runs the same loop: rank 0 is the coordinator. It
    alone claims the run. A replicated state (DDP, or any state without ``DTensor`` values: the same on every rank) is
    written by rank 0 alone, in the background as above. A state holding ``DTensor`` values (FSDP2 ``fully_shard``,
    tensor parallel; e.g. ``get_state_dict(model, opt)``) is saved through :mod:`cloudckpt.torch.dcp`: every rank
    uploads its own shards and rank 0 commits one checkpoint listing them all; this :meth:`save` returns once it is
    committed (or failed). :meth:`restore` loads on every rank the checkpoint rank 0 resolved; a sharded one is loaded
    in place into ``state=`` (the same structure, laid out for this job: DCP reshards). Then :meth:`wait`,
    :meth:`close`, :meth:`restore`, :meth:`save_and_exit`, :attr:`preempted` and the :meth:`save` of a sharded state
    are collectives: every rank calls them at the same point of its loop (the :meth:`save` of a replicated state is
    not: ``if rank == 0: mgr.save(...)`` works too). :attr:`preempted` is true on every rank at the same step once any
    rank got SIGTERM or a notice (one 8-byte all_reduce per check, every ``preemption_sync_every`` checks), so every
    rank saves that step and exits 143. :meth:`wait` and :meth:`close` tell every rank rank 0's outcome;
    :meth:`failures` is what this rank learned at its last such call.

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
        distributed: None: act as one rank of the job when ``torch.distributed`` is initialised with more than one
            process; False: one process whatever (each rank's manager claims the run); True: require it. Default None.
        preemption_sync_every: under ``torch.distributed``, the ranks agree on :attr:`preempted` at every this many
            checks (the others answer False unless agreed already). Default 1.
    """

    def __init__(self, remote: str | None = None, *, monitor: str | None = None, mode: str = "min",
                 keep_best: int | None = 1, keep_last: int | None = 2, keep_every: int | None = None,
                 preemption: Any = "auto", preemption_endpoints: dict | None = None,
                 preemption_deadline: float = 25.0, staging_dir: str | Path | None = None,
                 store_budget: float = 300.0, storage_options: dict | None = None,
                 on_upload_error: str = "retry", distributed: bool | None = None,
                 preemption_sync_every: int = 1) -> None:
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
        if preemption_sync_every < 1:
            raise ConfigurationError(f"preemption_sync_every must be >= 1. Received: {preemption_sync_every}")
        self._ranks = _ranks.detect(distributed)
        self.rank = self._ranks.rank if self._ranks else 0
        self._remote = remote or os.environ.get("CLOUDCKPT_REMOTE")
        self._dcp_opts = dict(storage_options or {}, budget=store_budget)
        self.store = _ranks.open_store(self._remote, self._ranks, store_budget, storage_options or {})
        self._best = self._stored_best() if self.rank == 0 else None
        self._sync_every, self._checks, self._agreed = preemption_sync_every, 0, False
        self._notice: float | None = None
        self._learned: list[SaveFailure] = []  # rank 0's failures, as this rank last heard them
        self._sharded_failed: list[SaveFailure] = []  # sharded saves that failed, not superseded by a commit
        root = Path(staging_dir or os.environ.get("CLOUDCKPT_STAGING") or tempfile.gettempdir())
        self._staging = new_staging_dir(root, root)
        self._seq = 0
        self._best_job: Job | None = None
        self.uploader = Uploader(self.store)
        self._watch = PreemptionWatch(preemption, endpoints=preemption_endpoints)
        self._watch.start()
        self._reader = Reader(self.store, self._remote, self._staging, self._ranks, self._dcp_opts)
        self._closed = False
        drain.register(self)

    # --- saving ------------------------------------------------------------------------------------------------

    @property
    def preempted(self) -> bool:
        """True once SIGTERM or a preemption notice arrived (under ``torch.distributed``: on any rank, agreed by
        every rank at the same check; a collective)."""
        if self._ranks is None:
            return self._watch.triggered
        self._checks += 1
        if not self._agreed and self._checks % self._sync_every == 0:
            notice = _ranks.agreed_notice(self._ranks, self._watch)
            if notice is not None:
                self._agreed, self._notice = True, notice
        return self._agreed

    def save(self, step: int, state: Any, *, metrics: dict[str, float] | None = None,
             epoch: int | None = None) -> Job | None:
        """Copy ``state`` to CPU memory and queue its commit; return the job (``job.done`` is set once handled).
        A NaN or infinite metric is recorded as no value (never the best; :mod:`cloudckpt.metrics`). A sharded state
        (``DTensor`` values) is committed through DCP before this returns (a collective; a failure is logged and
        kept, as below). Returns None on a rank that stores nothing of a replicated state (every rank but 0).

        Raises:
            StaleWriterError: a newer writer claimed the run; this one must stop.
            ConfigurationError: ``state`` holds something other than tensors and plain data.
        """
        self._check_open()
        sharded = _ranks.is_sharded(state)
        self._raise_pending(collective=sharded)
        if sharded:
            return self._save_sharded(int(step), state, finite_metrics(metrics), epoch)
        if self.rank != 0:
            copy_to_cpu(state, copy=False)  # the same refusal as rank 0's, on every rank
            return None
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
        ok = self.uploader.flush(timeout)
        if self._ranks is not None:
            ok = self._learn(ok)
        return ok and not self._sharded_failed

    def failures(self) -> list[SaveFailure]:
        """The saves whose upload failed and that are not committed (held for a retry at the next save). Under
        ``torch.distributed``, a rank other than 0 knows what it learned at its last :meth:`wait` (or sharded
        :meth:`save`)."""
        held = self.uploader.failures() if self.rank == 0 else list(self._learned)
        return held + self._sharded_failed

    def save_and_exit(self, step: int, state: Any, *, metrics: dict[str, float] | None = None,
                      epoch: int | None = None) -> NoReturn:
        """Save, wait for the commit until ``preemption_deadline`` after the notice, and exit with status 143."""
        notice = self._notice or self._watch.notice_time or time.monotonic()
        job = self.save(step, state, metrics=metrics, epoch=epoch)
        left = self.preemption_deadline - (time.monotonic() - notice)
        ok = self.uploader.flush(max(left, 1.0))
        cid = job.entry.id if job is not None and job.entry is not None else None
        if self._ranks is not None:  # every rank learns rank 0's outcome
            ok, cid = self._ranks.share([ok, cid])
        if ok and cid is not None:
            log.warning("preemption (%s): step %d committed as %s %.2fs after the notice; exiting",
                        self._watch.reason or "another rank", step, cid, time.monotonic() - notice)
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
            left = self.uploader.uncommitted()
            if self._ranks is not None:
                left = [_ranks.failure_from(r) for r in self._ranks.share(
                    [_ranks.failure_record(f) for f in left] if self.rank == 0 else None)]
            left += self._sharded_failed
            if left:
                raise commit_failed(left, self.store.url)
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

    def restore(self, selector: str | int = "latest", *, map_location: Any = "cpu",
                state: Any = None) -> Restored | None:
        """Read back ``"latest"``, ``"best"``, a step (an int) or a checkpoint id; None when the run has none.

        ``"latest"`` falls back: a checkpoint that fails verification or whose ``state.pt`` is not plain tensors and
        data is skipped, with a warning, for the newest older one that reads (as the Keras callback resumes). Any
        other selector names one checkpoint: its failure raises. A sharded checkpoint (saved from ``DTensor``
        values) is loaded in place into ``state`` (e.g. ``get_state_dict(model, opt)`` of this job), which is then
        the result's ``state``. Under ``torch.distributed`` rank 0 resolves the selector and every rank reads that
        checkpoint (a collective).

        Raises:
            CheckpointNotFoundError: the selector names no checkpoint (a run with checkpoints, but not that one).
            IntegrityError: the checkpoint fails verification, or its file holds more than tensors and plain data
                (for ``"latest"``: every checkpoint of this manager does).
            ConfigurationError: the checkpoint is sharded and no ``state`` was given.
        """
        return self._reader.restore(selector, map_location, state)

    # --- internals ---------------------------------------------------------------------------------------------

    def _raise_pending(self, collective: bool) -> None:
        """Raise what stops saving: a fence (StaleWriterError), or with ``on_upload_error="raise"`` the saves not
        committed. ``collective`` (a sharded save): rank 0's uploader says it for every rank."""
        fatal = self.uploader.fatal
        failed = self.uploader.failures() if self.on_upload_error == "raise" else []
        if self._ranks is not None and collective:
            told = self._ranks.share({"fatal": None if fatal is None else _ranks.error_record(fatal),
                                      "failed": [_ranks.failure_record(f) for f in failed]}
                                     if self.rank == 0 else None)
            if self.rank != 0:
                fatal = None if told["fatal"] is None else _ranks.error_from(told["fatal"])
                failed = [_ranks.failure_from(r) for r in told["failed"]]
        if fatal is not None:
            raise fatal
        failed += self._sharded_failed if self.on_upload_error == "raise" else []
        if failed:
            raise commit_failed(failed, self.store.url)

    def _save_sharded(self, step: int, state: Any, metrics: dict[str, float], epoch: int | None) -> Job:
        from .sharded import save_job  # DCP is imported only when used

        return save_job(self._remote, state, self._ranks, self._staging, self._sharded_failed, step=step,
                        epoch=epoch, metrics=metrics, meta={"framework": FRAMEWORK}, policy=self._policy,
                        options=self._dcp_opts)

    def _learn(self, ok: bool) -> bool:
        """Rank 0's outcome (``ok`` and its held failures) on every rank."""
        assert self._ranks is not None
        told = self._ranks.share({"ok": ok, "failed": [_ranks.failure_record(f) for f in self.uploader.failures()]}
                                 if self.rank == 0 else None)
        if self.rank != 0:
            self._learned = [_ranks.failure_from(r) for r in told["failed"]]
        return bool(told["ok"])

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
        if self._ranks is not None:
            self._ranks.close()
            forget_job_store(self.store)
        if self.uploader.pending():  # an upload still runs (past the deadline): its staging stays until exit
            log.warning("an upload to %s still runs: its staging %s is left for the next run to sweep",
                        self.store.url, self._staging)
            return
        remove_staging(self._staging)
        self.store.close()

