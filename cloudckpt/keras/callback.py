"""CloudCheckpoint: Keras' ModelCheckpoint, plus a store, exact resume and preemption handling."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, NoReturn

import keras

from .. import drain
from ..errors import SaveFailure, commit_failed
from ..manifest import CheckpointEntry, RunPolicy
from ..metrics import finite_metrics
from ..preemption import PreemptionWatch
from ..retention import Objective
from ..store import CheckpointStore
from ..uploader import Job, Uploader, new_staging_dir, remove_staging, snapshot
from . import capture, internals, shards, trainers
from . import local_files as lf
from . import resume as rs
from . import state as st
from .committed import CommittedBest, Moved
from .deadline import commit_within
from .distributed import WorkerRole
from .writer import Writer, WriteTask

log = logging.getLogger(__name__)

EXIT_PREEMPTED = 143
"""Exit status after a preemption checkpoint (128 + SIGTERM, what orchestrators read as "terminated")."""

DEFAULT_STORE_DIR = ".cloudckpt-store"


class CloudCheckpoint(keras.callbacks.ModelCheckpoint):
    """Keras' `ModelCheckpoint` that also commits every checkpoint to a store and resumes interrupted runs exactly.

    Everything `keras.callbacks.ModelCheckpoint` does happens unchanged — same arguments, validation, file names
    and save decisions, and the same local files, in Keras' own format. By default (``async_save=True``) a save
    point costs the training thread only a copy of the variables into host memory: Keras' own saving walk runs into
    a recording store (:mod:`cloudckpt.keras.capture`), and a background thread writes the ``.weights.h5`` /
    ``.keras`` file from that copy with Keras' own HDF5 store (under a temporary name, then renamed), together with
    the full training state (model, optimizer and metric variables — those not already in the Keras file — epoch,
    batch, best value), and hands the checkpoint to a second background thread that commits it to ``remote``;
    training never waits on the disk or the network. At most two copies are in host memory; if writes fall behind, a
    pending save point is superseded by the next one that writes the same file, except that a new best is never
    dropped for a save point that is not; otherwise the training thread waits (see :mod:`cloudckpt.keras.writer`).
    With ``async_save=False`` (and always for a legacy ``.h5``, a remote ``filepath``, a model overriding
    ``save``/``save_weights``, or a multi-process job) Keras' own save runs on the training thread and the file is
    then hard-linked into staging. If uploads fall behind, queued checkpoints that
    are not a new best are superseded. A background write that failed raises
    :class:`~cloudckpt.errors.CheckpointWriteError` at the next batch or epoch boundary. An upload that failed
    (after ``store_budget``) is logged and kept locally: a new best is retried at the next save point (never replaced
    by a worse checkpoint), another checkpoint is superseded by the next one; with ``on_upload_error="raise"`` the
    failure raises :class:`~cloudckpt.errors.CommitFailedError` at the next batch or epoch boundary instead. The best
    recorded in each checkpoint's resume state is the best the store has committed (see
    :mod:`cloudckpt.keras.committed`), so a resumed run never believes in a best the store lacks. At the end of
    training the callback waits for the writes, retries what failed once more, commits the final state, and raises
    `CommitFailedError` naming every save that is still not committed. When ``fit`` ends otherwise (an exception,
    ``KeyboardInterrupt``, ``sys.exit``) the process waits at exit, up to ``preemption_deadline`` seconds, for the
    saves already made and logs one line saying whether they committed, or which did not (see
    :mod:`cloudckpt.drain`). With ``verbose > 0``, "finished saving model" is printed once the file is written (as
    `ModelCheckpoint` prints it, nothing more); the store logs ``committed <id> to <url>`` (INFO) once it is committed.

    With ``resume=True`` and a committed checkpoint in ``remote``, the same ``model.fit(..., epochs=E)`` continues
    where the run stopped: weights, optimizer state, epoch, the best value, and — mid-epoch — the batch position
    (the batches already trained are skipped without computing them). Under `keras.utils.set_random_seed` and
    `tf.config.experimental.enable_op_determinism()` the final weights are bit-identical to an uninterrupted run.

    On SIGTERM or a cloud preemption notice (see :mod:`cloudckpt.preemption`) the callback checkpoints at the next
    batch boundary and waits for the commit until ``preemption_deadline`` seconds after the notice (a step that
    outlasts the window still commits, and the log says by how much it missed), and exits the process with status
    ``143`` (:data:`EXIT_PREEMPTED`, raised as `SystemExit` from inside `fit`), so an orchestrator knows the work is
    unfinished; a restart resumes there, redoing nothing. If the commit misses the deadline the process still exits
    with 143 (the restart then resumes from the latest committed checkpoint) and the miss is logged as an error.

    Each checkpoint in the store is a directory: the file Keras just wrote (when it wrote one; the save decisions
    are Keras') and ``cloudckpt_state/`` (``variables.npz`` + ``state.json``). Save points where Keras wrote no file
    (``save_best_only`` without improvement, preemption, the end of training) commit the state alone (with every
    metric; meta kind "state"), which never becomes the run's best. One remote holds one run: a ``fit`` resumes from it
    unless the previous ``fit`` with this callback finished normally, so calling ``fit`` again with the same callback
    after an exception (or a preemption with ``exit_on_preemption=False``) resumes exactly as a new callback would
    (like Keras' `BackupAndRestore`), while a ``fit`` after a finished one continues from the model as it is.

    Backends: TensorFlow, JAX and PyTorch (how each trainer is driven is in :mod:`cloudckpt.keras.trainers`). Exact
    resume needs each backend's deterministic settings besides the seed (TensorFlow:
    `tf.config.experimental.enable_op_determinism()`; PyTorch: `torch.use_deterministic_algorithms(True)`; JAX on
    the CPU is deterministic).

    Multi-worker (`tf.distribute.MultiWorkerMirroredStrategy`): only the chief (the ``"chief"`` task, else worker 0;
    read from the strategy's cluster resolver or ``TF_CONFIG``, see :mod:`cloudckpt.keras.distributed`) claims the
    run, uploads and writes the index. Other workers save their local files as Keras does and never write the store;
    on resume every worker restores the same (latest) checkpoint. `role` tells which this process is.

    Example:

    ```python
    callback = CloudCheckpoint("ckpt/checkpoint.weights.h5", save_weights_only=True, monitor="val_loss",
                               save_best_only=True, remote="s3://bucket/runs/digits")
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x, y, validation_split=0.2, epochs=10, callbacks=[callback])   # a restart resumes here
    model.load_weights("ckpt/checkpoint.weights.h5")
    ```

    Args:
        filepath, monitor, verbose, save_best_only, save_weights_only, mode, save_freq, initial_value_threshold:
            exactly as in `keras.callbacks.ModelCheckpoint`.
        remote: the store URL (``s3://``, ``gs://``, ``file://`` or a path). Default None: ``$CLOUDCKPT_REMOTE`` if
            set, else the local store ``<directory of filepath>/.cloudckpt-store``.
        keep_best: best checkpoints (by ``monitor``/``mode``) kept in the store. Default 1.
        keep_last: most recent checkpoints kept. Default 2.
        keep_every_n_epochs: also keep the last checkpoint of every n-th epoch. Default None.
        resume: continue from the store's latest checkpoint when there is one. Default True.
        storage_options: options for the store's backend (e.g. ``endpoint_url``). Default None.
        preemption: what triggers a preemption checkpoint: ``"auto"`` (SIGTERM, plus the metadata notices of the
            cloud the machine runs on), a list of ``"sigterm"``/``"aws"``/``"gce"``/``"azure"``, or None. Default
            ``"auto"``.
        preemption_endpoints: metadata base URLs per cloud (tests point them at a local server). Default None.
        preemption_deadline: seconds from the notice within which the checkpoint must be committed. Default 25
            (GCE gives 30).
        exit_on_preemption: exit the process with status 143 after a preemption checkpoint; if False, training just
            stops and `preempted` is True. Default True.
        prune_local: also delete the local files Keras wrote (e.g. ``model-{epoch:02d}.keras``) once their
            checkpoint has been pruned from the store by the retention above; the most recent file is always kept.
            Default False (keep every local file, exactly as `ModelCheckpoint` does).
        staging_dir: where snapshots are staged; default a temporary directory on the same file system as the
            checkpoint folder (so snapshots are hard links), else ``.cloudckpt-staging`` beside that folder.
        store_budget: seconds each store operation may retry for. Default 300.
        async_save: write Keras' file in the background from a host copy of the variables (see above). Default
            True; False runs Keras' own save on the training thread, as ``ModelCheckpoint`` does.
        on_upload_error: ``"retry"`` (log it, keep the checkpoint and retry it as described above) or ``"raise"``
            (raise `CommitFailedError` at the next batch or epoch boundary). Default ``"retry"``.
    """

    best: float | None  # ModelCheckpoint's (its __init__ sets it; resume restores it)

    def __init__(self, filepath: str, monitor: str = "val_loss", verbose: int = 0, save_best_only: bool = False,
                 save_weights_only: bool = False, mode: str = "auto", save_freq: str | int = "epoch",
                 initial_value_threshold: float | None = None, *, remote: str | None = None,
                 keep_best: int | None = 1, keep_last: int | None = 2, keep_every_n_epochs: int | None = None,
                 resume: bool = True, storage_options: dict | None = None, preemption: Any = "auto",
                 preemption_endpoints: dict | None = None, preemption_deadline: float = 25.0,
                 exit_on_preemption: bool = True, prune_local: bool = False, staging_dir: str | None = None,
                 store_budget: float = 300.0, async_save: bool = True, on_upload_error: str = "retry") -> None:
        super().__init__(filepath, monitor=monitor, verbose=verbose, save_best_only=save_best_only,
                         save_weights_only=save_weights_only, mode=mode, save_freq=save_freq,
                         initial_value_threshold=initial_value_threshold)
        for name, value in (("keep_best", keep_best), ("keep_last", keep_last)):
            if value is not None and (not isinstance(value, int) or value < 0):
                raise ValueError(f"`{name}` must be None or an integer >= 0. Received: {name}={value}")
        if keep_every_n_epochs is not None and (not isinstance(keep_every_n_epochs, int) or keep_every_n_epochs < 1):
            raise ValueError(f"`keep_every_n_epochs` must be None or an integer >= 1. "
                             f"Received: keep_every_n_epochs={keep_every_n_epochs}")
        if preemption_deadline <= 0:
            raise ValueError(f"`preemption_deadline` must be > 0. Received: preemption_deadline={preemption_deadline}")
        if on_upload_error not in ("retry", "raise"):
            raise ValueError(f"`on_upload_error` must be 'retry' or 'raise'. "
                             f"Received: on_upload_error={on_upload_error!r}")
        self.on_upload_error = on_upload_error
        folder = Path(os.path.dirname(os.path.abspath(self.filepath)))
        self.remote = remote or os.environ.get("CLOUDCKPT_REMOTE") or str(folder / DEFAULT_STORE_DIR)
        self.keep_best, self.keep_last, self.keep_every_n_epochs = keep_best, keep_last, keep_every_n_epochs
        self.resume = resume
        self.storage_options = dict(storage_options or {})
        self.preemption, self.preemption_endpoints = preemption, preemption_endpoints
        self.preemption_deadline, self.exit_on_preemption = preemption_deadline, exit_on_preemption
        self.prune_local, self.staging_dir, self.store_budget = prune_local, staging_dir, store_budget
        self.async_save = bool(async_save)
        self.preempted = False
        self.resumed_from: str | None = None  # checkpoint id the last fit resumed from
        self.batches_skipped = 0
        self.stall_seconds: list[float] = []  # time each save point held training (Keras' save + our snapshot)
        self.best_seen: float | None = None  # best monitored value over all save points (protects from coalescing)
        self.store: CheckpointStore | None = None
        self.role: WorkerRole | None = None  # this process's place in a multi-worker cluster (set by fit)
        self._adapter: trainers.TrainerAdapter | None = None  # what this backend's trainer needs (set by fit)
        self.uploader: Uploader | None = None
        self.writer: Writer | None = None  # async_save: writes the Keras files (set by fit)
        self.failures: list[SaveFailure] = []  # the saves the last flush found not committed
        self._folder = folder
        self._initial_best = self.best
        self._completed = False  # the last fit ended normally (not by an exception or a preemption)
        self._open = False  # a fit's uploader, watch and staging are live (on_train_end closes them)
        self._reset_run_state()

    # --- what on_train_begin sets, for the hooks that run after it -------------------------------------------------

    @property
    def _trainer(self) -> trainers.TrainerAdapter:
        assert self._adapter is not None, "set by on_train_begin"
        return self._adapter

    @property
    def _store(self) -> CheckpointStore:
        assert self.store is not None, "set by on_train_begin"
        return self.store

    @property
    def _staging_dir(self) -> Path:
        assert self._staging is not None, "set by on_train_begin"
        return self._staging

    # --- fit lifecycle -----------------------------------------------------------------------------------------

    def _reset_run_state(self) -> None:
        self._epoch_in_progress = 0
        self._resumed: rs.ResumedEpoch | None = None  # the first epoch after a resume (set by on_train_begin)
        self._saved_path: str | None = None
        self._last_staged_step: int | None = None
        self._watch: PreemptionWatch | None = None
        self._staging: Path | None = None
        self._seq = 0
        self._local = lf.LocalFiles(self.filepath)  # files Keras wrote in this fit
        self._plans = rs.StatePlans()
        self._epoch_rng: dict | None = None  # the host random generators at the start of this epoch
        self._pool = capture.BufferPool()  # async_save: the last snapshot's arrays, reused by the next capture
        self._committed: CommittedBest | None = None  # the best values the store has (set by on_train_begin)
        self._staged_best: float | None = None  # Keras' best at the last save point staged
        self._shards: shards.ShardedSaves | None = None  # JAX with variables split across processes (set by fit)

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        self._close_interrupted_fit()
        self._reset_run_state()
        self.preempted = False
        self.resumed_from, self.batches_skipped = None, 0
        self._adapter = trainers.for_backend()
        self.role = self._adapter.role(self.model)
        self.store = CheckpointStore(self.remote, budget=self.store_budget, **self.storage_options)
        if self.role.is_chief:
            self.store.claim()
        self._staging = new_staging_dir(self.staging_dir or os.environ.get("CLOUDCKPT_STAGING"), self._folder)
        if self.resume and not self._completed:  # after a finished fit, the next continues from the model as it is
            self._reset_monitor_state()
            self._resume()
        self._completed = False
        self._open = True
        self._staged_best = internals.as_float(self.best)
        self._shards = self._adapter.sharded_saves(self.model, self.store)
        if not self.role.is_chief:
            log.info("%s:%d is not the chief: restoring from %s, %s", self.role.task_type, self.role.task_id,
                     self.store.url, "storing its own shards, never the index" if self._shards else "never writing it")
        self._committed = CommittedBest(Objective(self.monitor, internals.monitor_mode(self)),
                                        best=self._staged_best, seen=self.best_seen)
        self.uploader = Uploader(self.store, on_commit=self._on_commit) if self.role.is_chief else None
        if self.uploader is not None:
            drain.register(self)
        # one process only: a multi-process job saves on the training thread (its variables may need collectives)
        self.writer = Writer() if self.async_save and self.role.num_workers == 1 and self.uploader else None
        self._watch = PreemptionWatch(self.preemption, endpoints=self.preemption_endpoints)
        self._watch.start()

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        super().on_epoch_begin(epoch, logs)
        self._epoch_in_progress = epoch
        if self._resumed is not None:  # the resumed epoch: draw its data order as the interrupted run did
            self._resumed.begin_epoch()
        self._epoch_rng = self._trainer.randomness.capture(st.EPOCH_RNG)

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        if self._resumed is not None and self._resumed.skipped(self._epoch_in_progress, batch):
            return  # a batch trained before the interruption, skipped now
        self._check_fatal()
        super().on_train_batch_end(batch, logs)
        if self._preemption_agreed():
            self._on_preemption(self._epoch_in_progress, batch, logs, epoch_done=False)

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if self.preempted:
            return  # stopped mid-epoch: this is not a finished epoch
        self._check_fatal()
        super().on_epoch_end(epoch, logs)
        if self._preemption_agreed():
            self._on_preemption(epoch, None, logs, epoch_done=True)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every save point so far is written (the Keras file, in the background with ``async_save``) and
        committed to the store. True only if all are (or were superseded by a newer committed one); False if
        ``timeout`` seconds (None: no limit) passed first, or if a save is not committed: a background write that
        failed since the previous call, or an upload that failed and awaits its retry — :attr:`failures` then names
        each (epoch, step, error). ``fit`` does this itself at its end (and raises there); call it from a callback
        to know that the checkpoint just saved is in the store."""
        deadline = None if timeout is None else time.monotonic() + timeout

        def left() -> float | None:
            return None if deadline is None else max(0.0, deadline - time.monotonic())

        written = self.writer is None or self.writer.flush(left())
        committed = self.uploader is None or self.uploader.flush(left())
        self.failures = ((self.writer.last_failures if self.writer is not None else [])
                         + (self.uploader.failures() if self.uploader is not None else []))
        return written and committed

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        try:
            if self._resumed is not None:
                self._resumed.uninstall()
            if self.role is not None and not self.preempted:
                step = self._step()
                if self._last_staged_step != step:  # commit the final state, whatever the save schedule
                    self._stage(self._epoch_in_progress, None, logs or {}, saved=None, epoch_done=True,
                                position=self._epoch_in_progress + 1)
                if self.writer is not None:
                    self.writer.flush()
                    self.writer.raise_if_failed()
                if self.uploader is not None:
                    if not self.uploader.flush() and self.uploader.retry():  # the last attempt for what failed
                        self._recommit_final(logs or {})
                    self.uploader.raise_if_uncommitted()
            self._completed = not self.preempted
        finally:
            self._cleanup()

    def _recommit_final(self, logs: dict) -> None:
        """After the end's retry: a retried checkpoint that committed after the final state became the run's
        latest; commit the final state again, so a resume starts from the end, not from the retried one."""
        uploader = self.uploader
        assert uploader is not None
        uploader.flush()
        last = uploader.last_job
        if last is None or last.entry is None or not uploader.committed or uploader.committed[-1] is last.entry:
            return
        self._stage(self._epoch_in_progress, None, logs, saved=None, epoch_done=True,
                    position=self._epoch_in_progress + 1)
        if self.writer is not None:
            self.writer.flush()
        uploader.flush()

    def _close_interrupted_fit(self) -> None:
        """A previous fit with this callback that an exception ended never reached `on_train_end`: let its queued
        checkpoints commit (the resume that follows must see them, as a new callback would), then close it."""
        if not self._open:
            return
        log.info("the previous fit with this callback was interrupted: committing what it queued, then resuming")
        if self._resumed is not None:
            self._resumed.uninstall()
        if self.writer is not None:
            self.writer.flush()
        if self.uploader is not None:
            self.uploader.flush()
        self._cleanup()

    def _reset_monitor_state(self) -> None:
        """What a new callback starts with (a resume then sets what the checkpoint holds)."""
        self.best, self.best_seen = self._initial_best, None
        internals.set_save_counters(self, internals.SaveCounters())

    def drain_at_exit(self) -> None:
        """At interpreter exit after a fit that did not end normally: wait for what it saved (see
        :mod:`cloudckpt.drain`)."""
        if not self._open or self.uploader is None:
            return

        def write(seconds: float) -> list[str]:
            if self.writer is None:
                return []
            self.writer.flush(seconds)
            return self.writer.unwritten() + [str(f) for f in self.writer.last_failures]

        if self._resumed is not None:
            self._resumed.uninstall()
        drain.settle(self.uploader, deadline=self.preemption_deadline, before=write,
                     why="training ended without on_train_end (an exception or an exit)")

    def _cleanup(self) -> None:
        drain.unregister(self)
        if self.model is not None:
            internals.set_initial_epoch(self.model, None)
        if self._watch is not None:
            self._watch.stop()
        if self.writer is not None:
            self.writer.close(timeout=0 if self.preempted else None)
        if self.uploader is not None:
            self.uploader.close(timeout=0 if self.preempted else None)
        if self.store is not None and not (self.preempted and self.uploader is not None and self.uploader.pending()):
            self.store.close()
        if self._staging is not None:
            remove_staging(self._staging)
        self._open = False

    # --- saving ------------------------------------------------------------------------------------------------

    def _should_save_model(self, epoch: int, batch: int | None, logs: dict[str, Any] | None, filepath: str) -> bool:
        decision = super()._should_save_model(epoch, batch, logs, filepath)
        if decision:
            self._saved_path = filepath
        return decision

    def _save_model(self, epoch: int, batch: int | None, logs: dict[str, Any] | None) -> None:
        t0 = time.perf_counter()
        self._saved_path = None
        path = internals.file_path(self, epoch, batch, logs or {})
        kind = capture.kind_of(path) if self.writer is not None and internals.keras_saves(self.model) else None
        if self._shards is not None:  # JAX, variables split across processes: shards, no Keras file (shards.py)
            self._should_save_model(epoch, batch, logs, path)  # Keras' decision only (sets self._saved_path)
        elif kind is not None and not os.path.isdir(path):  # (a directory: Keras' save says what is wrong)
            if self._should_save_model(epoch, batch, logs, path):  # Keras' decision (sets self._saved_path)
                os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        else:
            kind = None
            self._local.release(path)
            super()._save_model(epoch, batch, logs)
        self._stage(epoch, batch, logs or {}, saved=self._saved_path, epoch_done=batch is None,
                    position=epoch + 1 if batch is None else epoch, kind=kind)
        self.stall_seconds.append(time.perf_counter() - t0)

    def _step(self) -> int:
        return int(self.model.optimizer.iterations.numpy()) if getattr(self.model, "optimizer", None) else 0

    def _stage(self, epoch: int, batch: int | None, logs: dict, *, saved: str | None, epoch_done: bool,
               position: int, kind: capture.Kind | None = None) -> None:
        """Snapshot the user's file (if Keras just saved it, or — ``kind`` — capture it to be written in the
        background) and the resume state; queue them for writing and upload."""
        if self._shards is not None:  # every process stores its shards, process 0 commits
            return shards.stage(self, epoch, batch, logs, saved=saved, epoch_done=epoch_done, position=position)
        # Copy what Keras' file lacks now (written on the uploader's thread). Every worker reads the same variables,
        # as a sync-on-read variable's read is a collective; non-chief workers then upload nothing.
        step = self._step()
        snap = None
        if self.writer is not None:  # bounded memory: at most one save point pending besides the one being written
            self.writer.make_room(protected=self._improves(logs, saved),
                                  target=os.path.abspath(saved) if saved and kind else None)
            if kind is not None and saved:
                snap = capture.capture(self.model, kind, self._pool)
        if snap is not None:
            plan = self._plans.for_snapshot(self.model, snap.weights.shapes)
        else:
            plan = self._plans.for_save(self.model, saved if saved and "://" not in saved else None)
        arrays = plan.capture(metrics=not epoch_done, to_host=self._trainer.to_host)
        arrays.update(self._trainer.randomness.capture())
        if self._epoch_rng and not epoch_done:
            arrays.update(self._epoch_rng)
        if self.uploader is None:
            self._last_staged_step = step
            return
        metrics = finite_metrics({k: v for k, v in logs.items() if internals.numeric(v)})  # NaN/inf: no value, warned
        current = metrics.get(self.monitor)
        mode = internals.monitor_mode(self)
        improved = self._improves(logs, saved)
        if improved:
            self.best_seen = current
        keras_best = internals.as_float(self.best)
        moved = Moved(best=keras_best if keras_best != self._staged_best else None,
                      seen=current if improved else None)
        self._staged_best = keras_best
        committed = self._committed
        assert committed is not None  # set by on_train_begin
        if saved is None or "://" in saved:
            saved = None  # kind "state": keeps every metric; retention never ranks it best (retention.rank_metrics)
        self._seq += 1
        job_dir = self._staging_dir / f"job-{self._seq:06d}"
        if snap is None:  # the file Keras just wrote (if any), linked now: a later save must not change it
            snapshot({os.path.basename(saved): Path(saved)} if saved else {}, job_dir)
        name = os.path.basename(saved) if saved else None  # its name in the checkpoint
        counters = internals.save_counters(self)
        state = st.ResumeState(
            epoch=epoch, epoch_done=epoch_done, batches_done=None if epoch_done else (batch or 0) + 1,
            initial_epoch=position, global_step=step, logs=metrics,
            best=None if self.best is None else float(self.best), best_seen=self.best_seen,
            batches_seen_since_last_saving=counters.batches_seen_since_last_saving,
            last_batch_seen=counters.last_batch_seen, user_file=name, keras_version=keras.__version__,
            weights_file=name if plan.covered else None, covered=plan.covered, layout=plan.layout)
        meta = st.CheckpointMeta(kind="model" if saved else "state", batch=state.batches_done or 0,
                                 epoch_done=epoch_done, file=name,
                                 local_file=self._local.wrote(saved) if saved else None)
        policy = RunPolicy(monitor=self.monitor, mode=mode, keep_best=self.keep_best, keep_last=self.keep_last,
                           keep_every=self.keep_every_n_epochs)
        push_args = st.SavePoint(epoch + 1, step, metrics, meta, policy).push_args()
        if self.writer is None:  # the state is written just before each push, with the committed best
            job = self.uploader.submit(
                job_dir, push_args, protected=improved, tag=moved,
                prepare=lambda path: st.write_state(path, arrays, committed.resolve(state, moved)))
            if saved:
                self._local.queued(saved, job)
        else:
            uploader, tmp = self.uploader, capture.tmp_dir_for(saved, self._staging) if snap and saved else None
            verbose, local = self.verbose > 0, self._local

            def write() -> None:  # the writer's thread: Keras' file, staged with the resume state, then queued
                if snap is not None and saved is not None:
                    snap.write(saved, tmp)
                    if verbose:  # Keras' words, once they are true
                        internals.print_msg(f"\nEpoch {epoch + 1}: finished saving model to {saved}")
                    snapshot({os.path.basename(saved): Path(saved)}, job_dir)
                st.write_state(job_dir, arrays, state)
                job = uploader.submit(job_dir, push_args, protected=improved, tag=moved,
                                      prepare=lambda path: st.write_state_json(path, committed.resolve(state, moved)))
                if saved is not None:
                    local.queued(saved, job)

            self.writer.submit(WriteTask(write, f"epoch {epoch + 1} step {step}" + (f" ({saved})" if saved else ""),
                                         protected=improved, discard=snap.discard if snap else None,
                                         target=os.path.abspath(saved) if snap and saved else None,
                                         epoch=epoch + 1, step=step))
        self._last_staged_step = step

    def _improves(self, logs: dict, saved: str | None) -> bool:
        """Whether a save point that wrote ``saved`` is a new best of the run (a state-only one never is)."""
        if saved is None or "://" in saved:
            return False
        value = logs.get(self.monitor)
        current = float(value) if value is not None and internals.finite(value) else None
        return bool(Objective(self.monitor, internals.monitor_mode(self)).better(current, self.best_seen))

    def _on_commit(self, entry: CheckpointEntry, job: Job) -> None:
        """Uploader thread: record the best it committed, and delete the local files whose checkpoints retention
        removed from the store (``prune_local``). (The store logs each commit at INFO: ``committed <id> to <url>``.)"""
        if isinstance(job.tag, Moved) and self._committed is not None:
            self._committed.committed(job.tag)
        if self.prune_local:
            self._local.prune(self._store, committed=entry)

    # --- preemption --------------------------------------------------------------------------------------------

    def _on_preemption(self, epoch: int, batch: int | None, logs: dict[str, Any] | None, *, epoch_done: bool) -> None:
        """Checkpoint now (the chief), wait for the commit within the deadline, stop training, and exit if asked."""
        if self.preempted:
            return
        self.preempted = True
        watch = self._watch
        assert watch is not None  # only a triggered watch calls this
        notice = watch.notice_time or time.monotonic()  # the deadline counts from the notice, not from here
        if self._last_staged_step != self._step():  # every process: reading a variable may be a collective
            self._stage(epoch, batch, logs or {}, saved=None, epoch_done=epoch_done,
                        position=epoch + 1 if epoch_done else epoch)
        flushed = True
        if self.uploader is None:  # a non-chief worker: nothing of ours to commit
            log.warning("preemption (%s): stopping (not the chief: the chief commits)", watch.reason)
        else:
            flushed = commit_within(self.uploader, notice_time=notice, deadline=self.preemption_deadline,
                                    reason=watch.reason, step=self._step(), writer=self.writer,
                                    committed=self._shards.last if self._shards is not None else None)
        self.model.stop_training = True
        if self.exit_on_preemption:
            self._exit_preempted(flushed)

    def _exit_preempted(self, flushed: bool) -> NoReturn:
        if self._resumed is not None:
            self._resumed.uninstall()
        if not flushed:  # an upload still hangs: don't let interpreter shutdown wait for it past the deadline
            logging.shutdown()
            os._exit(EXIT_PREEMPTED)
        self._cleanup()
        raise SystemExit(EXIT_PREEMPTED)

    def _preemption_agreed(self) -> bool:
        """Whether to checkpoint and stop now: a notice reached this process or, in a multi-process JAX job, any
        other (every process asks at every batch boundary, so all stop at the same one)."""
        if self._watch is None or not self._watch.sources:
            return False
        mine = self._watch.triggered  # read once: a notice arriving during the vote counts at the next boundary
        agreed = self._trainer.any_process(mine)
        if agreed and not mine and not self._watch.triggered:
            self._watch.trigger("another process's preemption notice")
        return agreed

    def _check_fatal(self) -> None:
        if self.uploader is not None and self.uploader.fatal is not None:
            raise self.uploader.fatal
        if self.on_upload_error == "raise" and self.uploader is not None and (failed := self.uploader.failures()):
            raise commit_failed(failed, self._store.url)
        if self.writer is not None:
            self.writer.raise_if_failed()

    # --- resume ------------------------------------------------------------------------------------------------

    def _resume(self) -> None:
        resumed = rs.resume(self.model, self._trainer, self._store, self._staging_dir, self.filepath,
                            epochs=self.params.get("epochs"))
        if resumed is None:
            return
        found, self._resumed = resumed
        state = found.state
        self.best, self.best_seen = state.best, state.best_seen
        internals.set_save_counters(self, internals.SaveCounters(state.batches_seen_since_last_saving,
                                                                 state.last_batch_seen))
        self._last_staged_step = state.global_step
        self.resumed_from, self.batches_skipped = found.entry.id, self._resumed.k

