"""CloudCheckpointIO: Lightning's checkpoint files, committed to a store as Lightning writes and removes them."""

from __future__ import annotations

import logging
import os
import re
import shutil
import threading
from pathlib import Path
from typing import Any

from lightning.pytorch.plugins.io import TorchCheckpointIO

from .. import drain
from ..errors import CheckpointNotFoundError, ConfigurationError, IntegrityError, SaveFailure, commit_failed
from ..fallback import newest_usable
from ..manifest import CheckpointEntry
from ..metrics import finite_metrics
from ..store import CheckpointStore
from ..torch.state import copy_to_cpu, load_plain, rng_state, set_rng_state
from ..uploader import Job, Uploader, new_staging_dir, remove_staging, snapshot

log = logging.getLogger(__name__)

FRAMEWORK = "lightning"
#: what a committed file may be called (a name from the bucket becomes a local file name: nothing else is accepted)
SAFE_NAME = re.compile(r"[\w.=+-]{1,200}\.ckpt")
LAST = re.compile(r"last(-v?\d+)?\.ckpt")
RNG_KEY = "cloudckpt_rng"  # the host generators at the save, added to each checkpoint and restored on load
_MODE = re.compile(r"'mode': '(min|max)'")


def is_last(name: str) -> bool:
    return bool(LAST.fullmatch(name))


def _monitoring(checkpoint: dict[str, Any]) -> list[tuple[str, dict]]:
    """The (state key, state) of each ModelCheckpoint with a monitor in a Lightning checkpoint dict, in order."""
    return [(str(key), st) for key, st in (checkpoint.get("callbacks") or {}).items()
            if str(key).startswith("ModelCheckpoint") and isinstance(st, dict) and st.get("monitor")]


def monitored(checkpoint: dict[str, Any]) -> tuple[str | None, str]:
    """The run's objective: the first monitoring ModelCheckpoint's (monitor, mode) in a Lightning checkpoint dict."""
    for key, st in _monitoring(checkpoint):
        match = _MODE.search(key)
        return str(st["monitor"]), match.group(1) if match else "min"
    return None, "min"


def scores_of(checkpoint: dict[str, Any], path: Path) -> dict[str, float]:
    """The metrics of the file at ``path``: each monitoring ModelCheckpoint that wrote it (it lists the file among its
    top-k, with the score of the step that saved it) gives its monitor's score; a file no monitoring callback wrote
    (a periodic one, ``last.ckpt``) has none. Never another step's score (``current_score`` is the last one a
    callback saved, whichever callback writes this file)."""
    where = os.path.abspath(path)
    out: dict[str, float] = {}
    for _, st in _monitoring(checkpoint):
        top = st.get("best_k_models")
        for name, score in (top.items() if isinstance(top, dict) else ()):
            if isinstance(name, str) and os.path.abspath(name) == where and score is not None:
                try:
                    out[str(st["monitor"])] = float(score)
                except (TypeError, ValueError):
                    continue
    return out


class CloudCheckpointIO(TorchCheckpointIO):
    """A Lightning ``CheckpointIO`` that writes each checkpoint file as Lightning does, then commits it to a store.

    Lightning's own ``ModelCheckpoint`` keeps deciding what to save (top-k by monitor, ``save_last``,
    ``every_n_train_steps``...). Each file it saves is hard-linked into a staging directory and committed in the
    background (verified, atomic), with the monitored score of the callback that wrote it (none for a file no
    monitoring callback wrote: a periodic one, ``last.ckpt``) and the file's name; a file it removes (dropped from the
    top-k) or overwrites (``last.ckpt``) is discarded from the store after the newer commit — but never the store's
    latest or best. Checkpoints are read with ``torch.load(weights_only=True)``: only tensors and plain data, so
    ``hyper_parameters`` must be plain values. Each checkpoint also carries the host random generators (torch,
    numpy, Python; Lightning saves none), restored when it is loaded, so a resumed run draws what the
    interrupted one would have. :func:`pull_last` brings the latest committed file into the checkpoint
    folder of a new machine, so ``trainer.fit(model, ckpt_path="last")`` resumes from the store; pass
    :class:`~cloudckpt.lightning.CloudPreemption` among the callbacks to checkpoint and exit 143 on SIGTERM or a cloud
    preemption notice.

    A file whose upload fails (after ``store_budget``) is logged and kept: a top-k file is retried at the next save,
    ``last.ckpt`` is superseded by the next one; :meth:`wait` returns False while one is not committed
    (:meth:`failures` names each), and ``teardown`` retries once more and raises
    :class:`~cloudckpt.errors.CommitFailedError` naming what is still not committed; ``on_upload_error="raise"``
    raises it at the next save instead. A process that ends before ``teardown`` waits at exit, up to
    ``exit_deadline`` seconds, for the files already saved, and logs one line saying how that went
    (:mod:`cloudckpt.drain`).

    Example:

    ```python
    io = CloudCheckpointIO("s3://bucket/runs/mnist")
    ckpt = ModelCheckpoint("ckpts", monitor="val_loss", save_top_k=2, save_last=True)
    trainer = Trainer(plugins=[io], callbacks=[ckpt, CloudPreemption(io)], max_epochs=5)
    pull_last("s3://bucket/runs/mnist", "ckpts")
    trainer.fit(model, ckpt_path="last")
    ```

    Args:
        remote: the store URL. Default None: ``$CLOUDCKPT_REMOTE``.
        staging_dir: where files are hard-linked before upload. Default the system temporary directory when it is
            on the checkpoint folder's file system, else ``.cloudckpt-staging`` beside it.
        store_budget: seconds each store operation may retry for. Default 300.
        storage_options: options for the store's backend. Default None.
        on_upload_error: ``"retry"`` or ``"raise"`` (see above). Default ``"retry"``.
        exit_deadline: seconds the exit waits for the saved files to commit (see above). Default 25.
    """

    def __init__(self, remote: str | None = None, *, staging_dir: str | Path | None = None,
                 store_budget: float = 300.0, storage_options: dict | None = None, on_upload_error: str = "retry",
                 exit_deadline: float = 25.0) -> None:
        super().__init__()
        if on_upload_error not in ("retry", "raise"):
            raise ConfigurationError(f"on_upload_error must be 'retry' or 'raise'. Received: {on_upload_error!r}")
        self.on_upload_error, self.exit_deadline = on_upload_error, exit_deadline
        self.remote, self.staging_dir = remote, staging_dir
        self.store_budget, self.storage_options = store_budget, dict(storage_options or {})
        self.store: CheckpointStore | None = None
        self.uploader: Uploader | None = None
        self._staging: Path | None = None
        self._removed: set[str] = set()  # names Lightning removed locally, discarded from the store after commits
        self._lock = threading.Lock()
        self._seq = 0

    def _open(self, near: Path) -> Uploader:
        if self.uploader is None:
            self.store = CheckpointStore(self.remote, budget=self.store_budget, **self.storage_options)
            self.store.claim()
            self._staging = new_staging_dir(self.staging_dir or os.environ.get("CLOUDCKPT_STAGING"), near)
            self.uploader = Uploader(self.store, on_commit=self._after_commit)
            drain.register(self)
        return self.uploader

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        path = Path(path)
        checkpoint[RNG_KEY] = rng_state()  # Lightning keeps no random state: an exact resume needs it
        copy_to_cpu(checkpoint, copy=False)  # only tensors and plain data: what weights_only=True can read back
        super().save_checkpoint(checkpoint, path, storage_options)
        uploader = self._open(path.parent)
        if uploader.fatal is not None:
            raise uploader.fatal
        if self.on_upload_error == "raise" and (failed := uploader.failures()):
            raise commit_failed(failed, uploader.store.url)
        assert self._staging is not None
        name = path.name
        with self._lock:
            self._removed.discard(name)
        self._seq += 1
        job_dir = snapshot({name: path}, self._staging / f"save-{self._seq:06d}")
        monitor, mode = monitored(checkpoint)
        metrics = finite_metrics(scores_of(checkpoint, path))  # this file's step's scores only; NaN/inf: no value
        uploader.submit(job_dir, dict(epoch=int(checkpoint.get("epoch", 0)), step=int(checkpoint.get("global_step", 0)),
                                      metrics=metrics, meta={"framework": FRAMEWORK, "name": name}, monitor=monitor,
                                      mode=mode if monitor else None), protected=not is_last(name))

    def remove_checkpoint(self, path: Any) -> None:
        super().remove_checkpoint(path)
        with self._lock:
            self._removed.add(Path(path).name)

    def load_checkpoint(self, path: Any, map_location: Any | None = None,
                        weights_only: bool | None = None) -> dict[str, Any]:
        try:
            checkpoint = super().load_checkpoint(path, map_location=map_location, weights_only=True)
        except FileNotFoundError:
            raise
        except Exception as exc:
            raise IntegrityError(f"{path}: refused to load: not plain tensors and data ({exc})") from exc
        if not isinstance(checkpoint, dict):
            raise IntegrityError(f"{path}: not a Lightning checkpoint (holds a {type(checkpoint).__name__})")
        if isinstance(checkpoint.get(RNG_KEY), dict):
            try:
                set_rng_state(checkpoint.pop(RNG_KEY))
            except Exception as exc:  # noqa: BLE001 - a malformed generator state from the bucket
                raise IntegrityError(f"{path}: malformed random generator state ({str(exc)[:200]})") from exc
        return checkpoint

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until every queued commit is done. True only if every file saved so far is committed (or was
        superseded by a newer committed one); False if one is not (see :meth:`failures`) or ``timeout`` seconds
        passed first."""
        return True if self.uploader is None else self.uploader.flush(timeout)

    def failures(self) -> list[SaveFailure]:
        """The saved files whose upload failed and that are not committed (held for a retry)."""
        return [] if self.uploader is None else self.uploader.failures()

    def teardown(self) -> None:
        if self.uploader is None:
            return
        try:
            if not self.uploader.flush() and self.uploader.retry():  # the last attempt for what failed
                self.uploader.flush()
            self.uploader.close(0)
            self._discard_removed(None)
            self.uploader.raise_if_uncommitted()
        finally:
            self._shutdown()

    def drain_at_exit(self) -> None:
        """At interpreter exit before ``teardown``: wait for the files already saved (:mod:`cloudckpt.drain`)."""
        if self.uploader is None:
            return
        drain.settle(self.uploader, deadline=self.exit_deadline, why="the process is exiting before teardown")
        self._shutdown()

    def _shutdown(self) -> None:
        drain.unregister(self)
        if self.uploader is not None and self.uploader.pending():  # an upload still runs: its staging stays
            self.uploader = self.store = self._staging = None
            return
        if self._staging is not None:
            remove_staging(self._staging)
        if self.store is not None:
            self.store.close()
        self.uploader = self.store = self._staging = None

    def _after_commit(self, entry: CheckpointEntry, job: Job) -> None:  # on the uploader's thread
        self._discard_removed(entry)

    def _discard_removed(self, newest: CheckpointEntry | None) -> None:
        """Discard the older copies of ``newest``'s name and every copy of a name Lightning removed (a removed file
        whose commit is still queued is discarded after a later commit); never the latest or the best."""
        assert self.store is not None
        with self._lock:
            removed = set(self._removed)
        newest_name = newest.meta.get("name") if newest is not None else None
        ids = [c.id for c in self.store.index().checkpoints if c.meta.get("framework") == FRAMEWORK
               and (c.meta.get("name") in removed or (newest is not None and c.meta.get("name") == newest_name
                                                     and c.id != newest.id))]
        if ids:
            self.store.discard(ids)

def pull_last(remote: str | None, dirpath: str | Path, *, storage_options: dict | None = None) -> Path | None:
    """Pull the latest checkpoint committed by :class:`CloudCheckpointIO` into ``dirpath`` (as ``last.ckpt`` unless
    it was a ``last*.ckpt`` already), verified and loaded as plain tensors and data (one that fails is skipped, with
    a warning, for the newest older one); return its path, or None when the run has none. Then
    ``trainer.fit(model, ckpt_path="last")`` resumes from it."""
    with CheckpointStore(remote, **(storage_options or {})) as store:
        try:
            index = store.index()
        except CheckpointNotFoundError:
            return None
        ours = [c for c in index.checkpoints if c.meta.get("framework") == FRAMEWORK]
        if not ours:
            return None
        def use(entry: CheckpointEntry) -> Path:
            target = _pull_file(store, entry, Path(dirpath))
            log.info("pulled %s (step %s) from %s as %s", entry.id, entry.step, store.url, target)
            return target

        # the newest that verifies and reads; older ones when it doesn't
        return newest_usable(reversed(ours), use, none_usable=f"{store.url}: no Lightning checkpoint verifies")


def _pull_file(store: CheckpointStore, entry: CheckpointEntry, dirpath: Path) -> Path:
    """Pull ``entry``'s file into ``dirpath`` once it verified and loads as plain tensors and data; IntegrityError
    otherwise (nothing is left in ``dirpath``)."""
    name = entry.meta.get("name", "")
    if not SAFE_NAME.fullmatch(name) or [f.path for f in entry.files] != [name]:
        raise IntegrityError(f"{store.url}: checkpoint {entry.id} is not a Lightning file ({name!r})")
    staging = dirpath / f".cloudckpt-pull-{entry.id}"
    pulled = store.pull(entry.id, to=staging).path
    try:
        if not isinstance(load_plain(pulled / name), dict):
            raise IntegrityError(f"{store.url}: checkpoint {entry.id} does not hold a Lightning checkpoint")
        target = dirpath / (name if is_last(name) else "last.ckpt")
        os.replace(pulled / name, target)
    finally:
        shutil.rmtree(pulled, ignore_errors=True)
    return target
