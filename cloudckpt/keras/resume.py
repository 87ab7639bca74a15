"""The resume state of a Keras training run: what a checkpoint holds besides the user's file, and how to restore it.

Every checkpoint the callback pushes carries ``cloudckpt_state/``: ``variables.npz`` with every model variable
(including dropout seed-generator states), every optimizer variable (iterations, learning rate, slots) and the
training metrics' variables, plus ``state.json`` with the position (epoch, batches done in it, global step), the
callback's best value and save-frequency counters. So resume is complete even with ``save_weights_only=True``.

Mid-epoch resume skips the batches the interrupted run already trained without computing them: the model's
``train_function`` is swapped, for the first ``k`` steps of the resumed epoch, for one that only takes the batch from
the iterator (and, on the last skipped step, restores the epoch's metric accumulators). Keras 3's TensorFlow trainer
builds one iterator per epoch over a dataset whose shuffle order, under ``keras.utils.set_random_seed``, is the same
in a restarted process, so the remaining batches are exactly those the uninterrupted run would have seen. (Keras
3.15 with a global seed shuffles arrays in the same order every epoch.) A ``tf.data`` pipeline that reshuffles on
each iteration (``shuffle(..., reshuffle_each_iteration=True)``) starts its seed sequence afresh in a restarted
process: the state is still restored exactly, but the remaining batches' order differs from the uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigurationError, IntegrityError

log = logging.getLogger(__name__)

STATE_DIR = "cloudckpt_state"
STATE_JSON = "state.json"
VARIABLES = "variables.npz"
FORMAT = 1
GROUPS = ("model", "optimizer", "metrics")


def _groups(model: Any) -> dict[str, list]:
    optimizer = getattr(model, "optimizer", None)
    opt_vars = list(optimizer.variables) if optimizer is not None else []
    metric_vars = [v for m in model.metrics for v in m.variables]
    return {"model": list(model.variables), "optimizer": opt_vars, "metrics": metric_vars}


def ensure_optimizer_built(model: Any) -> None:
    """Create the optimizer's slot variables now (Keras builds them lazily on the first step)."""
    optimizer = getattr(model, "optimizer", None)
    if optimizer is not None and not optimizer.built:
        optimizer.build(model.trainable_variables)


def capture(model: Any) -> tuple[dict[str, np.ndarray], dict[str, list]]:
    """Copy every model, optimizer and metric variable to host memory now (on the training thread); cheap next to
    writing them, which :func:`write_state` does later on the uploader's thread."""
    arrays: dict[str, np.ndarray] = {}
    layout: dict[str, list] = {}
    for group, variables in _groups(model).items():
        layout[group] = []
        for i, v in enumerate(variables):
            value = np.asarray(v.numpy())  # a snapshot: TF variables copy on write
            arrays[f"{group}_{i}"] = value
            layout[group].append([v.path, list(value.shape)])
    return arrays, layout


def write_state(directory: Path, arrays: Mapping[str, np.ndarray], layout: Mapping[str, list],
                info: Mapping[str, Any]) -> Path:
    """Write ``cloudckpt_state/`` (the captured variables + ``info`` as JSON) into ``directory``; return it."""
    out = Path(directory) / STATE_DIR
    out.mkdir(parents=True, exist_ok=True)
    with open(out / VARIABLES, "wb") as f:
        np.savez(f, **arrays)
    doc = {"format": FORMAT, **info, "layout": dict(layout)}
    (out / STATE_JSON).write_text(json.dumps(doc, indent=1, default=float))
    return out


def read_state(directory: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Read a checkpoint's state JSON and variables; IntegrityError when it holds none or they are malformed."""
    src = Path(directory) / STATE_DIR
    try:
        info = json.loads((src / STATE_JSON).read_text())
        with np.load(src / VARIABLES, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except FileNotFoundError as exc:
        raise IntegrityError(f"{directory}: checkpoint holds no cloudckpt resume state ({exc.filename})") from None
    except ValueError as exc:
        raise IntegrityError(f"{directory}: unreadable resume state: {exc}") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise IntegrityError(f"{directory}: unknown resume state format {info.get('format') if isinstance(info, dict) else info!r}")
    return info, arrays


def _assign(group: str, variables: list, info: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> None:
    layout = info["layout"][group]
    if len(layout) != len(variables):
        raise ConfigurationError(
            f"the checkpoint's {group} has {len(layout)} variables but this model's has {len(variables)}: "
            "resume needs the same model and optimizer as the run that saved it")
    for i, v in enumerate(variables):
        value = arrays[f"{group}_{i}"]
        if tuple(value.shape) != tuple(v.shape):
            raise ConfigurationError(f"the checkpoint's {group} variable {layout[i][0]} has shape {value.shape}; "
                                     f"this model's {v.path} has {tuple(v.shape)}")
        v.assign(value)


def restore_variables(model: Any, info: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> None:
    """Assign the saved model and optimizer variables (the optimizer is built first)."""
    ensure_optimizer_built(model)
    groups = _groups(model)
    _assign("model", groups["model"], info, arrays)
    _assign("optimizer", groups["optimizer"], info, arrays)


def restore_metrics(model: Any, info: Mapping[str, Any], arrays: Mapping[str, np.ndarray], data: Any) -> bool:
    """Restore the epoch's metric accumulators; ``data`` (a batch) builds metrics Keras has not built yet."""
    try:
        variables = _groups(model)["metrics"]
        if len(variables) != len(info["layout"]["metrics"]) and data is not None:
            from keras.utils import unpack_x_y_sample_weight

            x, y, _ = unpack_x_y_sample_weight(data)
            y_pred = model(x, training=False)
            for part in (getattr(model, "_compile_metrics", None), getattr(model, "_compile_loss", None)):
                if part is not None and not part.built:
                    part.build(y, y_pred)
            variables = _groups(model)["metrics"]
        _assign("metrics", variables, info, arrays)
        return True
    except Exception as exc:  # only the logged training metrics of this epoch are affected, never the weights
        log.warning("could not restore this epoch's training-metric accumulators (%s); the epoch's logged training "
                    "metrics will cover only the batches after the resume", exc)
        return False


class SkipBatches:
    """Stands in for ``model.train_function`` for the first ``k`` steps of a resumed epoch: takes each batch from the
    iterator without training on it, then puts the real function back.

    Args:
        model: the Keras model.
        k: batches to skip.
        logs: the batch logs to report for skipped steps (those the interrupted run reported at its save).
        on_last: called with the last skipped batch when the skipping ends (restores metric accumulators).
    """

    def __init__(self, model: Any, k: int, logs: Mapping[str, float], on_last: Callable[[Any], None]) -> None:
        self.model = model
        self.original = model.train_function
        self.remaining = k
        self.logs = dict(logs)
        self.on_last = on_last
        self.skipped = 0
        model.train_function = self

    def __call__(self, iterator: Any) -> Mapping[str, float]:
        if self.remaining <= 0:
            self.uninstall()
            return self.original(iterator)
        per_call = max(1, int(getattr(self.model, "steps_per_execution", 1) or 1))
        data = None
        for _ in range(min(per_call, self.remaining)):
            data = next(iterator)
            self.remaining -= 1
            self.skipped += 1
        if self.remaining <= 0:
            self.uninstall()
            self.on_last(data)
        return self.logs

    def uninstall(self) -> None:
        if self.model.train_function is self:
            self.model.train_function = self.original


def pull_resumable(store: Any, to: Path) -> tuple[Any, Path, dict[str, Any], dict[str, np.ndarray]] | None:
    """Pull the newest checkpoint that holds resume state and verifies; None when the run has none.

    Checkpoints committed by other writers on the same run (``cloudckpt push``, the sync service) carry no
    ``cloudckpt_state/`` and are passed over; one that fails verification is skipped for an older one, with a
    warning. Every worker of a multi-worker job sees the same index, so they all choose the same checkpoint.
    """
    from ..errors import CheckpointNotFoundError

    try:
        index = store.index()
    except CheckpointNotFoundError:
        log.info("no checkpoint in %s: starting from scratch", store.url)
        return None
    marker = f"{STATE_DIR}/{STATE_JSON}"
    candidates = [c for c in reversed(index.checkpoints) if any(f.path == marker for f in c.files)]
    if not candidates:
        log.warning("%s holds checkpoints, but none written by CloudCheckpoint (no %s): starting from scratch",
                    store.url, STATE_DIR)
        return None
    failures = []
    for entry in candidates:
        try:
            pulled = store.pull(entry.id, to=to)
            info, arrays = read_state(pulled.path)
        except IntegrityError as exc:
            log.warning("checkpoint %s can't be resumed from (%s); trying an older one", entry.id, exc)
            failures.append(f"{entry.id}: {exc}")
            continue
        if failures:
            log.warning("resuming from %s: %d newer checkpoint(s) failed verification", entry.id, len(failures))
        return entry, pulled.path, info, arrays
    raise IntegrityError(f"{store.url}: no checkpoint with resume state verifies: " + "; ".join(failures))


def restore_local_files(store: Any, latest: Any, pulled: Path, staging: Path) -> None:
    """Put back the user's checkpoint files (of the latest and the best checkpoint) that this machine lacks, from
    ``pulled`` (the latest, already downloaded) or a pull of the best into ``staging``."""
    from ..errors import CheckpointNotFoundError

    wanted = [latest]
    try:
        best = store.best()
        if best.id != latest.id:
            wanted.append(best)
    except CheckpointNotFoundError:
        pass
    for entry in wanted:
        local, name = entry.meta.get("local_path"), entry.meta.get("file")
        if not local or not name or os.path.exists(local):
            continue
        src = pulled if entry.id == latest.id else store.pull(entry.id, to=staging).path
        os.makedirs(os.path.dirname(os.path.abspath(local)), exist_ok=True)
        shutil.copy2(src / name, local)
        log.info("restored %s from checkpoint %s", local, entry.id)
