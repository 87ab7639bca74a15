"""CloudPreemption: on SIGTERM or a cloud notice, Lightning saves ``last.ckpt`` at the next batch boundary, the store
commits it, and the process exits with status 143."""

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
from ..preemption import PreemptionWatch
from .checkpoint_io import CloudCheckpointIO

log = logging.getLogger(__name__)

EXIT_PREEMPTED = 143
"""Exit status after a preemption checkpoint (128 + SIGTERM), the same as the Keras callback's."""


class CloudPreemption(Callback):
    """Checkpoints through ``io`` at the next training batch boundary after SIGTERM or a preemption notice, waits
    for the commit (until ``deadline`` seconds after the notice) and exits with status 143.

    The file is ``last.ckpt`` in the first ``ModelCheckpoint``'s folder (else ``default_root_dir``), so
    ``trainer.fit(model, ckpt_path="last")`` resumes there. List it after your own callbacks: the run ends inside
    its ``on_train_batch_end``, so callbacks listed after it never see the batch end of the step it commits.

    Args:
        io: the run's :class:`CloudCheckpointIO` (also passed as ``Trainer(plugins=[io])``).
        sources: ``"auto"``, a list of ``sigterm``/``aws``/``gce``/``azure``, or None. Default ``"auto"``.
        endpoints: metadata base URLs per cloud. Default None.
        deadline: seconds from the notice within which the commit must finish. Default 25.
    """

    def __init__(self, io: CloudCheckpointIO, *, sources: Any = "auto", endpoints: dict | None = None,
                 deadline: float = 25.0) -> None:
        if deadline <= 0:
            raise ConfigurationError(f"deadline must be > 0. Received: {deadline}")
        self.io, self.sources, self.endpoints, self.deadline = io, sources, endpoints, deadline
        self._watch: PreemptionWatch | None = None

    @property
    def preempted(self) -> bool:
        return self._watch is not None and self._watch.triggered

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._watch = PreemptionWatch(self.sources, endpoints=self.endpoints)
        self._watch.start()  # after Lightning's own SIGTERM handler: this one answers SIGTERM during fit

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stop()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # Lightning's own SIGTERM handler (it runs beside ours) raises SIGTERMException, an exit with status 0, at
        # the end of a batch when the signal came after our check: checkpoint here instead, still at a boundary
        if self._watch is not None and self._watch.triggered and isinstance(exception, SIGTERMException):
            self._commit_and_exit(trainer)
        self._stop()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._watch is not None and self._watch.triggered:
            self._commit_and_exit(trainer)

    def _commit_and_exit(self, trainer: pl.Trainer) -> None:
        watch = self._watch
        assert watch is not None
        notice = watch.notice_time or time.monotonic()
        folder = next((cb.dirpath for cb in trainer.checkpoint_callbacks
                       if isinstance(cb, ModelCheckpoint) and cb.dirpath), None) or trainer.default_root_dir
        trainer.save_checkpoint(Path(folder) / f"{ModelCheckpoint.CHECKPOINT_NAME_LAST}.ckpt")
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

    def _stop(self) -> None:
        if self._watch is not None:
            self._watch.stop()
            self._watch = None
