"""CloudPreemption: on SIGTERM or a cloud notice, Lightning saves ``last.ckpt`` at the next batch boundary, the store
commits it, and the process exits with status 143.

With :class:`~cloudckpt.lightning.CloudModelParallelStrategy` under ``torchrun`` every rank watches; at each batch end
the ranks agree on the earliest notice of any rank (:func:`cloudckpt.torch.ranks.agreed_notice`), so a notice on one
rank makes every rank save the same step: one sharded commit, whose outcome rank 0 shares before all exit 143."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from ..errors import ConfigurationError
from ..preemption import PreemptionWatch, exit_at_deadline
from ..torch.ranks import Ranks, agreed_notice
from .checkpoint_io import CloudCheckpointIO
from .sharded import CloudModelParallelStrategy

log = logging.getLogger(__name__)

EXIT_PREEMPTED = 143
"""Exit status after a preemption checkpoint (128 + SIGTERM), the same as the Keras callback's."""


class CloudPreemption(Callback):
    """Checkpoints through ``io`` at the next training batch boundary after SIGTERM or a preemption notice, waits
    for the commit (until ``deadline`` seconds after the notice) and exits with status 143.

    The file is ``last.ckpt`` in the first ``ModelCheckpoint``'s folder (else ``default_root_dir``), so
    ``trainer.fit(model, ckpt_path="last")`` resumes there. List it after your own callbacks: the run ends inside
    its ``on_train_batch_end``, so callbacks listed after it never see the batch end of the step it commits.

    With :class:`~cloudckpt.lightning.CloudModelParallelStrategy` on more than one rank (``io`` None): every rank
    watches, the ranks agree at each training batch end (one 8-byte all_reduce) whether any rank got a notice, and
    if one did every rank saves that step (one sharded commit), learns rank 0's outcome and exits 143; a rank still
    there ``deadline`` seconds after the earliest notice exits 143 at once (the commit is atomic: listed or not).

    Args:
        io: the run's :class:`CloudCheckpointIO` (also passed as ``Trainer(plugins=[io])``); None with
            :class:`~cloudckpt.lightning.CloudModelParallelStrategy`.
        sources: ``"auto"``, a list of ``sigterm``/``aws``/``gce``/``azure``, or None. Default ``"auto"``.
        endpoints: metadata base URLs per cloud. Default None.
        deadline: seconds from the notice within which the commit must finish. Default 25.
    """

    def __init__(self, io: CloudCheckpointIO | None = None, *, sources: Any = "auto", endpoints: dict | None = None,
                 deadline: float = 25.0) -> None:
        if deadline <= 0:
            raise ConfigurationError(f"deadline must be > 0. Received: {deadline}")
        self.io, self.sources, self.endpoints, self.deadline = io, sources, endpoints, deadline
        self._watch: PreemptionWatch | None = None
        self._ranks: Ranks | None = None

    @property
    def preempted(self) -> bool:
        return self._watch is not None and self._watch.triggered

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if isinstance(trainer.strategy, CloudModelParallelStrategy):
            if trainer.world_size > 1:
                self._ranks = Ranks()  # a collective: every rank is here
        elif self.io is None:
            raise ConfigurationError("CloudPreemption needs io=CloudCheckpointIO(...) unless the strategy is "
                                     "CloudModelParallelStrategy")
        if self._ranks is None:
            self._start()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning registers its SIGTERM handler after on_fit_start; on a rank it broadcasts from inside the handler
        # (a collective at any point of the step) and stops that rank alone: ours replaces it (no chaining) during fit
        if self._ranks is not None and self._watch is None:
            self._start()

    def _start(self) -> None:
        self._watch = PreemptionWatch(self.sources, endpoints=self.endpoints)
        self._watch.start()

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stop()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # Lightning's own SIGTERM handler (it runs beside ours) raises SIGTERMException, an exit with status 0, at
        # the end of a batch when the signal came after our check: checkpoint here instead, still at a boundary
        if self._watch is not None and self._watch.triggered and isinstance(exception, SIGTERMException) \
                and self.io is not None and self._ranks is None:
            self._commit_and_exit(trainer)
        self._stop()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._watch is None:
            return
        if self._ranks is not None:
            notice = agreed_notice(self._ranks, self._watch)
            if notice is not None:
                self._commit_sharded_and_exit(trainer, self._ranks, notice)
        elif self._watch.triggered:
            if self.io is None:  # CloudModelParallelStrategy on one process: its save commits before it returns
                self._commit_sharded_and_exit(trainer, None, self._watch.notice_time or time.monotonic())
            self._commit_and_exit(trainer)

    def _commit_and_exit(self, trainer: pl.Trainer) -> None:
        watch = self._watch
        assert watch is not None and self.io is not None
        notice = watch.notice_time or time.monotonic()
        trainer.save_checkpoint(_last_path(trainer))
        ok = self.io.wait(max(self.deadline - (time.monotonic() - notice), 1.0))
        if ok:
            log.warning("preemption (%s): step %d committed %.2fs after the notice; exiting", watch.reason,
                        trainer.global_step, time.monotonic() - notice)
            self._stop()
            self.io.teardown()
            raise SystemExit(EXIT_PREEMPTED)
        log.error("preemption (%s): step %d was NOT committed within %gs of the notice", watch.reason,
                  trainer.global_step, self.deadline)
        logging.shutdown()
        os._exit(EXIT_PREEMPTED)

    def _commit_sharded_and_exit(self, trainer: pl.Trainer, ranks: Ranks | None, notice: float) -> None:
        """Every rank: save ``last.ckpt`` (one collective ``dcp.save``: each rank uploads its shards, rank 0 commits),
        learn rank 0's outcome, exit 143; past the deadline from the earliest notice, exit 143 at once."""
        watch, strategy, step = self._watch, trainer.strategy, trainer.global_step
        assert watch is not None and isinstance(strategy, CloudModelParallelStrategy)
        reason = watch.reason or "another rank"
        late = exit_at_deadline(notice, self.deadline, f"step {step}", EXIT_PREEMPTED)
        before = len(strategy.committed)
        error: str | None = None
        try:
            trainer.save_checkpoint(_last_path(trainer))
        except Exception as exc:  # noqa: BLE001 - a typed error on every rank (DCP's collective): nothing listed
            error = f"{type(exc).__name__}: {exc}"
        cid = strategy.committed[-1].id if len(strategy.committed) > before and error is None else None
        if ranks is not None:  # rank 0 committed (or not): every rank learns which
            cid = ranks.share(cid)
        late.cancel()
        if cid is not None:
            log.warning("preemption (%s): step %d committed as %s %.2fs after the notice; exiting", reason, step,
                        cid, time.monotonic() - notice)
        else:
            log.error("preemption (%s): step %d was NOT committed (%s); a restart resumes from the latest committed "
                      "checkpoint", reason, step, error or "rank 0's commit failed")
        self._stop()
        raise SystemExit(EXIT_PREEMPTED)

    def _stop(self) -> None:
        if self._watch is not None:
            self._watch.stop()
            self._watch = None
        if self._ranks is not None:
            self._ranks.close()
            self._ranks = None


def _last_path(trainer: pl.Trainer) -> Path:
    folder = next((cb.dirpath for cb in trainer.checkpoint_callbacks
                   if isinstance(cb, ModelCheckpoint) and cb.dirpath), None) or trainer.default_root_dir
    return Path(folder) / f"{ModelCheckpoint.CHECKPOINT_NAME_LAST}.ckpt"
