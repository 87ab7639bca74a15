"""The background writer: save points captured on the training thread are written to disk on one worker thread.

Each :class:`WriteTask` holds what one save point copied into host memory (a :class:`~cloudckpt.keras.capture.Snapshot`
of the Keras file, the resume state's arrays) and what to do with it once written (hand the staged checkpoint to the
uploader). One thread writes the tasks in order.

Host memory is bounded: at most two tasks exist at once, the one being written and one pending. Before the training
thread captures a new save point it calls :meth:`Writer.make_room`:

- no task pending: nothing to do;
- the pending task is dropped (coalesced) when the new save point writes the same local file (or the pending one
  writes none), unless the pending one is a new best of the run and the new one is not: its file would be
  overwritten by the newer one anyway; its checkpoint is not committed;
- otherwise (the pending task writes another file, e.g. ``model-{epoch}.keras``, or is a best the new save point
  does not beat) the training thread waits until the worker has taken the pending task (the write in progress has
  finished), so every file Keras would have written is written and the best is never dropped.

So the latest save point and the run's best are never lost, and the added host memory stays at about two model
sizes (the snapshot being written and the pending one). A task that fails is logged and its error kept; the callback
raises it (:class:`~cloudckpt.errors.CheckpointWriteError`) at the next batch or epoch boundary or at the end of
training, and the next :meth:`Writer.flush` returns False (naming it in :attr:`Writer.last_failures`).

Example:
    >>> w = Writer()
    >>> w.make_room(protected=False)
    >>> _ = w.submit(WriteTask(run=lambda: None, label="epoch 1"))
    >>> w.flush(10.0)
    True
    >>> w.close()
    True
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .. import failpoints
from ..errors import CheckpointWriteError, SaveFailure

log = logging.getLogger(__name__)


@dataclass
class WriteTask:
    """One save point to write: ``run()`` writes it (on the worker thread); ``discard()`` frees what it holds when
    it is dropped instead. ``protected``: a new best of the run (never dropped for a save point that is not).
    ``target``: the local file it writes (None: none)."""

    run: Callable[[], object]
    label: str
    protected: bool = False
    target: str | None = None
    discard: Callable[[], object] | None = None
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    epoch: int | None = None
    step: int | None = None


class Writer:
    """Writes :class:`WriteTask` s on one background thread, in order, with at most one pending."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._pending: WriteTask | None = None
        self._active: WriteTask | None = None
        self._closed = False
        self.error: CheckpointWriteError | None = None
        self.dropped: list[str] = []  # labels of the coalesced tasks
        self.written = 0
        self._failed: list[WriteTask] = []  # failed since the last flush
        self.last_failures: list[SaveFailure] = []  # what the last flush reported
        self._thread = threading.Thread(target=self._loop, name="cloudckpt-writer", daemon=True)
        self._thread.start()

    # --- training thread -------------------------------------------------------------------------------------------

    def make_room(self, *, protected: bool, target: str | None = None) -> None:
        """Before capturing a save point (``protected``: it is a new best; ``target``: the local file it writes):
        drop the pending task, or wait until the worker takes it (see the module's rule)."""
        dropped = None

        def keep(task: WriteTask | None) -> bool:
            return task is not None and ((task.protected and not protected)
                                         or (task.target is not None and task.target != target))

        with self._cond:
            if keep(self._pending):
                t0 = time.monotonic()
                while keep(self._pending):
                    self._cond.wait()
                log.debug("waited %.3fs for the pending checkpoint's write to start",
                          time.monotonic() - t0)
            if self._pending is not None:
                dropped, self._pending = self._pending, None
                self.dropped.append(dropped.label)
        if dropped is not None:
            log.info("checkpoint writes are behind: %s superseded by a newer save point before it was written",
                     dropped.label)
            if dropped.discard is not None:
                dropped.discard()
            dropped.done.set()

    def submit(self, task: WriteTask) -> WriteTask:
        """Queue ``task`` as the pending one (call :meth:`make_room` first, before capturing it)."""
        with self._cond:
            if self._closed:
                raise RuntimeError("the writer is closed")
            if self._pending is not None:  # make_room was not called: never hold more than one pending
                raise RuntimeError("a task is already pending")
            self._pending = task
            self._cond.notify_all()
        return task

    def pending(self) -> int:
        with self._cond:
            return (self._pending is not None) + (self._active is not None)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every task has been written or has failed. False if ``timeout`` seconds passed first, or if a
        task failed since the previous call (each failure is reported once, in :attr:`last_failures`)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        self.last_failures = []
        with self._cond:
            while self._pending is not None or self._active is not None:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left if left is not None else 1.0)
            failed, self._failed = self._failed, []
        self.last_failures = [SaveFailure(t.epoch, t.step, t.label, t.error) for t in failed]
        return not failed

    def unwritten(self) -> list[str]:
        """Labels of the tasks not written yet (being written, or pending)."""
        with self._cond:
            return [t.label for t in (self._active, self._pending) if t is not None]

    def raise_if_failed(self) -> None:
        """Raise the first background write's failure (CheckpointWriteError), if any."""
        if self.error is not None:
            raise self.error

    def close(self, timeout: float | None = None) -> bool:
        """Flush, then stop the worker thread. Returns what :meth:`flush` returned."""
        ok = self.flush(timeout)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if not self.pending():
            self._thread.join(timeout=5)
        return ok

    # --- worker thread ---------------------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cond:
                while self._pending is None and not self._closed:
                    self._cond.wait()
                if self._pending is None:
                    return
                task, self._pending = self._pending, None
                self._active = task
                self._cond.notify_all()  # make_room may be waiting for the pending task to be taken
            try:
                failpoints.hit("keras.writer.task")
                task.run()
                self.written += 1
            except Exception as exc:  # raised on the training thread at its next boundary
                log.error("writing checkpoint %s failed: %s", task.label, exc)
                task.error = exc
                with self._cond:
                    self._failed.append(task)
                if self.error is None:
                    err = CheckpointWriteError(f"writing checkpoint {task.label} in the background failed: {exc}")
                    err.__cause__ = exc
                    self.error = err
                if task.discard is not None:
                    task.discard()
            finally:
                task.done.set()
                with self._cond:
                    self._active = None
                    self._cond.notify_all()
