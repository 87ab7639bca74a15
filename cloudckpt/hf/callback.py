"""CloudCheckpointCallback: each ``checkpoint-N`` folder the Hugging Face Trainer writes, committed to a store."""

from __future__ import annotations

import logging
import math
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .. import drain
from ..errors import CheckpointNotFoundError, ConfigurationError, IntegrityError, SaveFailure, commit_failed
from ..fallback import newest_usable
from ..manifest import CheckpointEntry
from ..metrics import finite_metrics
from ..preemption import PreemptionWatch, exit_at_deadline
from ..store import CheckpointStore
from ..uploader import Job, Uploader, new_staging_dir, remove_staging, snapshot
from .state import NOT_READ, check_checkpoint

log = logging.getLogger(__name__)

EXIT_PREEMPTED = 143
"""Exit status after a preemption checkpoint (128 + SIGTERM), the same as the Keras callback's."""
FRAMEWORK = "hf"
#: written by the Trainer but never read on resume, and a full pickle of TrainingArguments: not committed
SKIPPED = NOT_READ


def monitor_of(args: TrainingArguments) -> tuple[str | None, str]:
    """The logged metric and mode behind ``metric_for_best_model``/``greater_is_better`` (as the Trainer reads them)."""
    name = args.metric_for_best_model
    if not name:
        return None, "min"
    monitor = name if name.startswith("eval_") else f"eval_{name}"
    greater = args.greater_is_better if args.greater_is_better is not None else not name.endswith("loss")
    return monitor, "max" if greater else "min"


class CloudCheckpointCallback(TrainerCallback):
    """Commits every checkpoint the `transformers.Trainer` saves to a store, in the background.

    Right after the Trainer writes ``<output_dir>/checkpoint-N`` the callback hard-links its files into a staging
    directory (the Trainer's own ``save_total_limit`` may delete the folder later) and a background thread commits
    them, verified and atomically, with the metric of ``metric_for_best_model`` logged at that step. Retention
    (``keep_best`` by that metric, ``keep_last``) is the store's and never drops the best or the latest. The main
    process claims the run (fencing older writers); other processes of a distributed run do nothing, except under
    FSDP with ``fsdp_config={"state_dict_type": "SHARDED_STATE_DICT"}``: there every rank stores its own files of
    ``checkpoint-N`` (its DCP shards, its rng state) at each save and rank 0 commits one checkpoint listing them all,
    synchronously, before training goes on (:mod:`cloudckpt.hf.sharded`); there every rank watches for preemption,
    and the ranks agree at each step end whether any rank got a notice (one 8-byte all_reduce), so all save the
    same step, learn rank 0's commit outcome and exit 143 (at the latest ``preemption_deadline`` after the earliest
    notice).

    On SIGTERM or a cloud preemption notice the callback asks the Trainer to save at the end of the current step,
    commits that checkpoint and exits the process with status 143. :func:`pull_latest` brings the latest committed
    checkpoint into ``output_dir`` on a new machine, so ``trainer.train(resume_from_checkpoint=True)`` continues.
    ``training_args.bin`` (a pickle the Trainer never reads back) is not committed.

    A checkpoint whose upload fails (after ``store_budget``) is logged and kept: a best is retried at the next save
    (never replaced by a worse one), another is superseded by it; :meth:`flush` returns False while one is not
    committed (:meth:`failures` names each), and the end of training retries once more and raises
    :class:`~cloudckpt.errors.CommitFailedError` naming what is still not committed; ``on_upload_error="raise"``
    raises it at the next step instead. When training ends otherwise (an exception, ``KeyboardInterrupt``,
    ``sys.exit``: the Trainer calls no ``on_train_end``), the process waits at exit up to ``preemption_deadline``
    seconds for the checkpoints already saved and logs one line saying whether they committed (:mod:`cloudckpt.drain`).

    Example:

    ```python
    args = TrainingArguments("out", eval_strategy="steps", save_steps=50, eval_steps=50,
                             metric_for_best_model="loss", greater_is_better=False)
    found = pull_latest("s3://bucket/runs/bert", "out")
    trainer = Trainer(model, args, train_dataset=train, eval_dataset=val,
                      callbacks=[CloudCheckpointCallback("s3://bucket/runs/bert")])
    trainer.train(resume_from_checkpoint=True if found else None)
    ```

    Args:
        remote: the store URL. Default None: ``$CLOUDCKPT_REMOTE``.
        keep_best: best checkpoints kept, by ``metric_for_best_model`` (ignored without it). Default 1.
        keep_last: most recent checkpoints kept. Default 2.
        preemption: ``"auto"``, a list of ``sigterm``/``aws``/``gce``/``azure``, or None. Default ``"auto"``.
        preemption_endpoints: metadata base URLs per cloud. Default None.
        preemption_deadline: seconds from the notice within which the commit must finish. Default 25.
        staging_dir: where snapshots are hard-linked; default the system temporary directory when it is on the
            output directory's file system, else ``.cloudckpt-staging`` beside it.
        store_budget: seconds each store operation may retry for. Default 300.
        storage_options: options for the store's backend. Default None.
        on_upload_error: ``"retry"`` or ``"raise"`` (see above). Default ``"retry"``.
    """

    def __init__(self, remote: str | None = None, *, keep_best: int | None = 1, keep_last: int | None = 2,
                 preemption: Any = "auto", preemption_endpoints: dict | None = None,
                 preemption_deadline: float = 25.0, staging_dir: str | Path | None = None,
                 store_budget: float = 300.0, storage_options: dict | None = None,
                 on_upload_error: str = "retry") -> None:
        if preemption_deadline <= 0:
            raise ConfigurationError(f"preemption_deadline must be > 0. Received: {preemption_deadline}")
        if on_upload_error not in ("retry", "raise"):
            raise ConfigurationError(f"on_upload_error must be 'retry' or 'raise'. Received: {on_upload_error!r}")
        self.on_upload_error = on_upload_error
        self.remote, self.keep_best, self.keep_last = remote, keep_best, keep_last
        self.preemption, self.preemption_endpoints = preemption, preemption_endpoints
        self.preemption_deadline, self.staging_dir = preemption_deadline, staging_dir
        self.store_budget, self.storage_options = store_budget, dict(storage_options or {})
        self.store: CheckpointStore | None = None
        self.uploader: Uploader | None = None
        self._watch: PreemptionWatch | None = None
        self._staging: Path | None = None
        self._preempting = False
        self._best: float | None = None
        self._best_job: Job | None = None
        self._ranks: Any = None  # the job's Ranks under FSDP with a sharded state dict (cloudckpt.hf.sharded)
        self._give_up: threading.Timer | None = None  # the preemption deadline, under FSDP
        self._notice = 0.0

    @property
    def preempted(self) -> bool:
        return self._watch is not None and self._watch.triggered

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       **kwargs: Any) -> None:
        from .sharded import sharded_job

        self._ranks = sharded_job(args)  # FSDP, sharded state dict: every rank stores its files (a collective)
        if self._ranks is not None:
            from ..distributed_commit import job_store

            self.monitor, self.mode = monitor_of(args)
            self.store = job_store(self.remote, claim=self._ranks.coordinator, budget=self.store_budget,
                                   **self.storage_options)
            self._watch = PreemptionWatch(self.preemption, endpoints=self.preemption_endpoints)
            self._watch.start()  # on every rank; the ranks agree at each step end (on_step_end)
            return
        if not args.should_save:
            return  # not the process that writes checkpoints
        self.monitor, self.mode = monitor_of(args)
        self.store = CheckpointStore(self.remote, budget=self.store_budget, **self.storage_options)
        self.store.claim()
        self._best = self._stored_best()
        out = Path(args.output_dir or ".")
        self._staging = new_staging_dir(self.staging_dir or os.environ.get("CLOUDCKPT_STAGING"), out)
        self.uploader = Uploader(self.store)
        drain.register(self)
        self._watch = PreemptionWatch(self.preemption, endpoints=self.preemption_endpoints)
        self._watch.start()

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> None:
        if self.uploader is not None and self.uploader.fatal is not None:
            raise self.uploader.fatal
        if self.on_upload_error == "raise" and self.uploader is not None and (failed := self.uploader.failures()):
            raise commit_failed(failed, self.uploader.store.url)
        if self._ranks is not None:
            if self._watch is not None and not self._preempting:
                from ..torch.ranks import agreed_notice

                notice = agreed_notice(self._ranks, self._watch)  # a collective: the same answer on every rank
                if notice is not None:  # every rank saves this step; past the deadline, every rank exits 143
                    self._preempting = True
                    self._give_up = exit_at_deadline(notice, self.preemption_deadline,
                                                     f"checkpoint-{state.global_step}")
                    self._notice = notice
                    control.should_save = True
                    control.should_training_stop = True
            return
        if self.preempted and not self._preempting:
            self._preempting = True
            control.should_save = True
            control.should_training_stop = True

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self._ranks is not None and self.store is not None:
            from ..store import _policy
            from .sharded import commit_sharded

            step = state.global_step
            try:
                commit_sharded(self.store, self._ranks, Path(args.output_dir or ".") / f"checkpoint-{step}",
                               step=step, metrics=self._metrics_at(state, step), meta={"framework": FRAMEWORK},
                               policy=_policy(None, monitor=self.monitor, mode=self.mode,
                                              keep_best=self.keep_best if self.monitor else None,
                                              keep_last=self.keep_last),
                               skipped=SKIPPED)
            except Exception as exc:
                if not self._preempting:
                    raise
                self._exit_sharded(step, f"{type(exc).__name__}: {exc}")
            if self._preempting:
                self._exit_sharded(step, None)
            return
        if self.uploader is None or self._staging is None:
            return
        step = state.global_step
        folder = Path(args.output_dir or ".") / f"checkpoint-{step}"
        files = {p.relative_to(folder).as_posix(): p for p in folder.rglob("*")
                 if p.is_file() and p.name not in SKIPPED}
        job_dir = snapshot(files, self._staging / f"save-{step:010d}-{time.monotonic_ns()}")
        metrics = self._metrics_at(state, step)
        improved = self._improves(metrics)
        if improved and self._best_job is not None:
            self._best_job.protected = False
        job = self.uploader.submit(job_dir, dict(
            step=step, metrics=metrics, meta={"framework": FRAMEWORK}, monitor=self.monitor, mode=self.mode,
            keep_best=self.keep_best if self.monitor else None, keep_last=self.keep_last), protected=improved)
        if improved:
            self._best, self._best_job = metrics[self.monitor], job  # type: ignore[index]
        if self._preempting:
            self._exit_after(job, step)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> None:
        if self._ranks is not None:  # every save committed synchronously
            self._close_sharded()
            return
        if self.uploader is None:
            return
        try:
            if not self.uploader.flush() and self.uploader.retry():  # the last attempt for what failed
                self.uploader.flush()
            self.uploader.close(0)
            self.uploader.raise_if_uncommitted()
        finally:
            self._shutdown()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait for the queued commits. True only if every checkpoint saved so far is committed (or was superseded
        by a newer committed one); False if one is not (see :meth:`failures`) or ``timeout`` seconds passed."""
        return True if self.uploader is None else self.uploader.flush(timeout)

    def failures(self) -> list[SaveFailure]:
        """The checkpoints whose upload failed and that are not committed (held for a retry)."""
        return [] if self.uploader is None else self.uploader.failures()

    def drain_at_exit(self) -> None:
        """At interpreter exit after training that did not reach ``on_train_end``: wait for what was saved."""
        if self.uploader is None:
            return
        drain.settle(self.uploader, deadline=self.preemption_deadline,
                     why="training ended without on_train_end (an exception or an exit)")
        self._shutdown()

    # --- internals ---------------------------------------------------------------------------------------------

    def _exit_after(self, job: Job, step: int) -> None:
        watch = self._watch
        assert watch is not None and self.uploader is not None
        notice = watch.notice_time or time.monotonic()
        ok = self.uploader.flush(max(self.preemption_deadline - (time.monotonic() - notice), 1.0))
        if ok and job.entry is not None:
            log.warning("preemption (%s): checkpoint-%d committed as %s %.2fs after the notice; exiting",
                        watch.reason, step, job.entry.id, time.monotonic() - notice)
        else:
            log.error("preemption (%s): checkpoint-%d was NOT committed within %gs of the notice", watch.reason,
                      step, self.preemption_deadline)
            logging.shutdown()
            os._exit(EXIT_PREEMPTED)
        self._shutdown()
        raise SystemExit(EXIT_PREEMPTED)

    def _exit_sharded(self, step: int, error: str | None) -> None:
        """After the preemption save's commit (its outcome is known on every rank: commit_sharded raises everywhere
        or nowhere): say how it went and exit 143."""
        if self._give_up is not None:
            self._give_up.cancel()
        reason = (self._watch.reason if self._watch is not None else None) or "another rank"
        if error is None:
            log.warning("preemption (%s): checkpoint-%d committed from %d ranks %.2fs after the notice; exiting",
                        reason, step, self._ranks.world, time.monotonic() - self._notice)
        else:
            log.error("preemption (%s): checkpoint-%d was NOT committed (%s); a restart resumes from the latest "
                      "committed checkpoint", reason, step, error)
        self._close_sharded()
        raise SystemExit(EXIT_PREEMPTED)

    def _close_sharded(self) -> None:
        from ..distributed_commit import forget_job_store

        if self._watch is not None:
            self._watch.stop()
            self._watch = None
        self._ranks.close()
        self._ranks = None
        if self.store is not None:
            forget_job_store(self.store)
            self.store.close()
            self.store = None

    def _metrics_at(self, state: TrainerState, step: int) -> dict[str, float]:
        out: dict[str, float] = {}
        for rec in state.log_history:
            if rec.get("step") == step:
                out.update({k: float(v) for k, v in rec.items() if k.startswith("eval_")
                            and not k.endswith(("_runtime", "_per_second"))
                            and isinstance(v, (int, float)) and not isinstance(v, bool)})
        return finite_metrics(out)  # an eval's NaN/inf: no value, never the best (cloudckpt.metrics)

    def _improves(self, metrics: dict[str, float]) -> bool:
        value = metrics.get(self.monitor) if self.monitor else None
        if value is None or math.isnan(value):
            return False
        return self._best is None or (value < self._best if self.mode == "min" else value > self._best)

    def _stored_best(self) -> float | None:
        assert self.store is not None
        try:
            best = self.store.best()
        except CheckpointNotFoundError:
            return None
        return best.metrics.get(self.monitor) if self.monitor else None

    def _shutdown(self) -> None:
        drain.unregister(self)
        if self._watch is not None:
            self._watch.stop()
            self._watch = None
        if self.uploader is not None and self.uploader.pending():  # an upload still runs: its staging stays
            self.uploader = None
            return
        if self._staging is not None:
            remove_staging(self._staging)
            self._staging = None
        if self.store is not None:
            self.store.close()
        self.uploader = None


def pull_latest(remote: str | None, output_dir: str | Path, *, storage_options: dict | None = None) -> Path | None:
    """Pull the latest checkpoint committed by :class:`CloudCheckpointCallback` into ``output_dir/checkpoint-N``
    (verified, and every file read as the Trainer reads it: one that fails is skipped, with a warning, for the newest
    older one); return its path, or None when the run has none. Then ``trainer.train(resume_from_checkpoint=True)``
    continues from it (the Trainer takes the highest ``checkpoint-N`` in ``output_dir``).

    Under ``torch.distributed`` with several processes (call it after creating the ``TrainingArguments``, which
    initialise it) this is a collective: rank 0 chooses and pulls, and each machine whose processes don't see that
    folder pulls the same checkpoint once (its local rank 0)."""
    from .sharded import job_ranks, on_every_rank

    ranks = job_ranks()
    if ranks is None:
        return _pull_latest(remote, output_dir, storage_options)[0]
    try:
        return on_every_rank(ranks, lambda: _pull_latest(remote, output_dir, storage_options),
                             lambda cid, target: _pull_one(remote, cid, target, storage_options))
    finally:
        ranks.close()


def _pull_one(remote: str | None, cid: str, target: Path, storage_options: dict | None) -> None:
    with CheckpointStore(remote, **(storage_options or {})) as store:
        _pull_into(store, cid, target)


def _pull_into(store: CheckpointStore, cid: str, target: Path) -> None:
    """Pull checkpoint ``cid`` into ``target`` and read every file as the Trainer will (IntegrityError, nothing left
    behind, when one fails)."""
    from .sharded import check_dcp_folders

    try:
        store.pull(cid, to=target)
        check_checkpoint(target)
        check_dcp_folders(target)
    except IntegrityError:
        shutil.rmtree(target, ignore_errors=True)
        raise


def _pull_latest(remote: str | None, output_dir: str | Path,
                 storage_options: dict | None) -> tuple[Path | None, str | None]:
    with CheckpointStore(remote, **(storage_options or {})) as store:
        try:
            index = store.index()
        except CheckpointNotFoundError:
            return None, None
        ours = [c for c in index.checkpoints if c.meta.get("framework") == FRAMEWORK and c.step is not None]
        if not ours:
            return None, None
        chosen: list[str] = []

        def use(entry: CheckpointEntry) -> Path:
            target = Path(output_dir) / f"checkpoint-{entry.step}"
            if target.is_dir() and any(target.iterdir()) and not (target / ".cloudckpt.json").exists():
                log.info("%s already exists locally: resuming from it", target)
                return target
            _pull_into(store, entry.id, target)
            chosen.append(entry.id)
            log.info("pulled %s (step %d) from %s into %s", entry.id, entry.step, store.url, target)
            return target

        # the newest that verifies and reads; older ones when it doesn't
        path = newest_usable(reversed(ours), use, none_usable=f"{store.url}: no Hugging Face checkpoint verifies")
        return path, (chosen[-1] if chosen else None)
