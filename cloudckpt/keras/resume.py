"""Resuming a Keras training run: what a save copies, which checkpoint a resume pulls, and how it is restored.

Every checkpoint the callback pushes carries ``cloudckpt_state/`` (its format: :mod:`cloudckpt.keras.state`):
``state.json`` with the position (epoch, batches done in it, global step), the callback's best value and
save-frequency counters, and ``variables.npz`` with the variables needed to resume: every model variable (including
dropout seed-generator states), every optimizer variable (iterations, learning rate, slots) and the training
metrics' variables. When the checkpoint also holds the file Keras
has just written, and that file is a Keras 3 ``.weights.h5`` or ``.keras`` (both hold the model's weights and the
optimizer's variables, written by Keras' own save from the same live variables), those variables are not copied a
second time: ``state.json`` names the file (``weights_file``) and which variables it covers (``covered``), and
``variables.npz`` holds only the rest (seed-generator states, metrics). Restore then loads the file with Keras'
``load_weights`` and assigns the rest. So resume is complete even with ``save_weights_only=True``, and a save costs
the training thread little more than Keras' own save.

Mid-epoch resume skips the batches the interrupted run already trained without computing them: the model's
``train_function`` is swapped, for the first ``k`` steps of the resumed epoch, for one that only takes the batch from
the epoch's data (and, on the last skipped step, restores the epoch's metric accumulators); how each backend's trainer
calls that function is in :mod:`cloudckpt.keras.trainers`. Keras 3's trainers build one iterator per epoch over data
whose shuffle order, under ``keras.utils.set_random_seed``, is the same in a restarted process, so the remaining
batches are exactly those the uninterrupted run would have seen. (Keras
3.15 with a global seed shuffles arrays in the same order every epoch.) A ``tf.data`` pipeline that reshuffles on
each iteration (``shuffle(..., reshuffle_each_iteration=True)``) starts its seed sequence afresh in a restarted
process: the state is still restored exactly, but the remaining batches' order differs from the uninterrupted run.
"""

from __future__ import annotations

import logging
import shutil
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CheckpointNotFoundError, ConfigurationError, IntegrityError, ResumeMismatchError
from ..fallback import newest_usable
from ..manifest import CheckpointEntry
from ..store import CheckpointStore
from . import internals, shard_restore
from .local_files import restore_local_files
from .shard_format import ShardMetadata
from .state import EPOCH_RNG, MARKER, STATE_DIR, Covered, Group, Layout, ResumeState, read_state
from .trainers import SkipBatches, TrainerAdapter

log = logging.getLogger(__name__)

KERAS_WEIGHT_FILES = (".weights.h5", ".keras")  # Keras 3 saves whose weights store holds the optimizer too


def _groups(model: Any) -> dict[Group, list]:
    optimizer = getattr(model, "optimizer", None)
    opt_vars = list(optimizer.variables) if optimizer is not None else []
    metric_vars = [v for m in model.metrics for v in m.variables]
    return {"model": list(model.variables), "optimizer": opt_vars, "metrics": metric_vars}


def ensure_optimizer_built(model: Any) -> None:
    """Create the optimizer's slot variables now (Keras builds them lazily on the first step)."""
    optimizer = getattr(model, "optimizer", None)
    if optimizer is not None and not optimizer.built:
        optimizer.build(model.trainable_variables)


# --- save side: what a save copies ------------------------------------------------------------------------------


def _h5_shapes(path: str) -> list[tuple[int, ...]]:
    """Shapes of every dataset in a Keras 3 weights file (``.weights.h5``, or the one inside a ``.keras`` zip);
    reads metadata only."""
    import h5py

    shapes: list[tuple[int, ...]] = []

    def visit(_name: str, obj: Any) -> None:
        if isinstance(obj, h5py.Dataset):
            shapes.append(tuple(obj.shape))

    if path.endswith(".keras"):
        with zipfile.ZipFile(path) as archive, archive.open("model.weights.h5") as member, \
                h5py.File(member, "r") as f:
            f.visititems(visit)
    else:
        with h5py.File(path, "r") as f:
            f.visititems(visit)
    return shapes


def file_coverage(model: Any, path: str) -> Covered | None:
    """Which of the model's and optimizer's variables (indices into the groups of :class:`StatePlan`) the Keras
    file ``path``, just written by Keras' save, holds; None when it isn't a Keras 3 weights file or doesn't hold
    exactly the model's weights and the optimizer's variables (a custom ``save_own_variables``, a legacy ``.h5``...),
    in which case everything is captured as before."""
    if not path.endswith(KERAS_WEIGHT_FILES):
        return None
    try:
        found = _h5_shapes(path)
    except Exception as exc:  # unreadable as a Keras 3 weights file: capture everything
        log.debug("%s is not readable as a Keras weights file (%s): capturing all variables", path, exc)
        return None
    covered = shape_coverage(model, found)
    if covered is None:
        log.info("%s does not hold exactly the model's and optimizer's variables: capturing all of them", path)
    return covered


def shape_coverage(model: Any, found: list[tuple[int, ...]]) -> Covered | None:
    """:func:`file_coverage`'s rule applied to the shapes of the values a Keras file holds (``found``, e.g. what a
    background capture recorded, see :class:`~cloudckpt.keras.capture.RecordingStore`): the model's and optimizer's
    variables when they are exactly those; None otherwise."""
    groups = _groups(model)
    weight_ids = {id(w) for w in model.weights}
    model_idx = [i for i, v in enumerate(groups["model"]) if id(v) in weight_ids]
    if len(model_idx) != len(weight_ids):
        return None
    expected = [tuple(groups["model"][i].shape) for i in model_idx] + [tuple(v.shape) for v in groups["optimizer"]]
    if sorted(tuple(f) for f in found) != sorted(expected):
        return None
    return {"model": model_idx, "optimizer": list(range(len(groups["optimizer"])))}


class StatePlan:
    """What a save copies on the training thread: every model, optimizer and metric variable except those
    ``covered`` by the file Keras has just written (see :func:`file_coverage`), and the layout (path and shape of
    every variable, copied or not) that restore checks against."""

    def __init__(self, model: Any, covered: Covered | None = None) -> None:
        self.covered: Covered | None = {g: list(ix) for g, ix in (covered or {}).items()} or None
        self.layout: Layout = {}
        self.copies: list[tuple[str, Any]] = []
        for group, variables in _groups(model).items():
            skip = set(covered.get(group, ())) if covered and group != "metrics" else set()
            self.layout[group] = [(str(v.path), [int(d) for d in v.shape]) for v in variables]
            self.copies += [(f"{group}_{i}", v) for i, v in enumerate(variables) if i not in skip]

    def capture(self, *, metrics: bool = True, to_host: Callable[[Any], np.ndarray] | None = None
                ) -> dict[str, np.ndarray]:
        """Copy the variables to host memory now; :func:`~cloudckpt.keras.state.write_state` writes them later on
        the uploader's thread. ``metrics=False`` leaves out the training metrics' accumulators (only a mid-epoch
        resume needs them); ``to_host`` reads one variable (default ``v.numpy()``, a copy on every backend)."""
        read = to_host or (lambda v: np.asarray(v.numpy()))
        return {key: read(v) for key, v in self.copies if metrics or not key.startswith("metrics_")}


class StatePlans:
    """The :class:`StatePlan` of each kind of save in one fit (no file, a ``.keras``, another file), worked out
    once: reading a file's layout costs more than small models' copies."""

    def __init__(self) -> None:
        self._plans: dict[tuple, StatePlan] = {}

    def for_save(self, model: Any, saved: str | None) -> StatePlan:
        """The plan of a save point where Keras wrote the local file ``saved`` (None: none)."""
        key = (None if not saved else saved.endswith(".keras"), len(getattr(model.optimizer, "variables", ())))
        if key not in self._plans:
            self._plans[key] = StatePlan(model, file_coverage(model, saved) if saved else None)
        return self._plans[key]

    def for_snapshot(self, model: Any, shapes: list[tuple[int, ...]]) -> StatePlan:
        """The plan of a save point whose Keras file is written in the background from a capture that recorded
        values of these ``shapes`` (see :func:`shape_coverage`)."""
        covered = shape_coverage(model, shapes)
        shape = None if covered is None else tuple((g, tuple(ix)) for g, ix in covered.items())
        key = ("snapshot", len(_groups(model)["optimizer"]), shape)
        if key not in self._plans:
            if covered is None:
                log.info("the Keras file does not hold exactly the model's and optimizer's variables: the resume "
                         "state copies all of them")
            self._plans[key] = StatePlan(model, covered)
        return self._plans[key]


# --- resume side: which checkpoint, and restoring it ---------------------------------------------------------------


START_OVER = "pass resume=False or a new remote to start over"  # the way out of a run that can't continue


def resume(model: Any, trainer: TrainerAdapter, store: CheckpointStore, staging: Path,
           filepath: str, epochs: int | None = None) -> tuple[Resumable, ResumedEpoch] | None:
    """Continue the run in ``store`` where it stopped: restore the model's and optimizer's variables from the
    newest resumable checkpoint (pulled under ``staging``), put its local files back beside ``filepath``, make the
    next ``fit`` start at its epoch and set up that epoch (:class:`ResumedEpoch`). None when there is nothing to
    resume from; the callback's own state (best value, counters) is the caller's to set from the result.

    When the checkpoint already ends the ``fit``'s ``epochs`` (a finished script run again: it trains nothing) one
    warning line says so and how to start over, visible by default as Keras' own warnings are. A model that does not
    fit the checkpoint raises :class:`~cloudckpt.errors.ResumeMismatchError`, one line with the same way out.
    """
    found = pull_resumable(store, staging / "resume")
    if found is None:
        return None
    state = found.state
    try:
        if found.shards is not None:  # saved shard by shard: each process reads the parts it holds
            ensure_optimizer_built(model)
            shard_restore.restore_shards(model, store, found.entry, found.shards)
        restore_variables(model, state, found.arrays, found.path)
    except ConfigurationError as exc:
        why = " ".join(str(exc).split())
        why = why if len(why) <= 300 else why[:300].rsplit(" ", 1)[0] + " ..."
        raise ResumeMismatchError(f"this model does not match checkpoint {found.entry.id} of {store.url} "
                                  f"it would resume from ({why}); resume with the model that saved it, or "
                                  f"{START_OVER}") from None
    restore_local_files(store, found.entry, found.path, staging / "best", filepath)
    internals.set_initial_epoch(model, state.initial_epoch)
    first = ResumedEpoch(model, trainer, state, found.arrays)
    log.info("resumed from %s (%s): epoch %d, %d batches into it, global step %d, best %s", found.entry.id,
             store.url, state.epoch + 1, first.k, state.global_step, state.best)
    if epochs is not None and state.epoch_done and state.initial_epoch >= epochs:
        log.warning("cloudckpt: run already finished at epoch %d of %d (%s in %s): this fit trains nothing; %s",
                    state.initial_epoch, epochs, found.entry.id, store.url, START_OVER)
    shutil.rmtree(found.path, ignore_errors=True)
    return found, first


@dataclass(frozen=True)
class Resumable:
    """A checkpoint a resume can start from: its entry, where it was pulled to, and its verified state."""

    entry: CheckpointEntry
    path: Path
    state: ResumeState
    arrays: dict[str, np.ndarray]
    shards: ShardMetadata | None = None  # a checkpoint saved shard by shard: its validated metadata


def pull_resumable(store: CheckpointStore, to: Path) -> Resumable | None:
    """Pull the newest checkpoint that holds resume state and verifies; None when the run has none.

    Checkpoints committed by other writers on the same run (``cloudckpt push``, the sync service) carry no
    ``cloudckpt_state/`` and are passed over; one that fails verification is skipped for an older one, with a
    warning. Every worker of a multi-worker job sees the same index, so they all choose the same checkpoint.
    """
    try:
        index = store.index()
    except CheckpointNotFoundError:
        log.info("no checkpoint in %s: starting from scratch", store.url)
        return None
    if not index.checkpoints:  # a new run: the callback's claim wrote an index with no checkpoint yet
        log.info("no checkpoint in %s yet: starting from scratch", store.url)
        return None
    candidates = [c for c in reversed(index.checkpoints) if any(f.path == MARKER for f in c.files)]
    if not candidates:
        log.warning("%s holds checkpoints, but none written by CloudCheckpoint (no %s): starting from scratch",
                    store.url, STATE_DIR)
        return None
    return newest_usable(candidates, lambda entry: _verified(store, entry, to),
                         none_usable=f"{store.url}: no checkpoint with resume state verifies")


def _verified(store: CheckpointStore, entry: CheckpointEntry, to: Path) -> Resumable:
    """Pull ``entry`` and check its state, its variables and its weights file against each other (a sharded one:
    its state and metadata only, the shards are read as they are assigned)."""
    if shard_restore.is_sharded(entry):
        to.mkdir(parents=True, exist_ok=True)
        state, arrays, md = shard_restore.read_state_and_metadata(store, entry, to)
        return Resumable(entry, to, state, arrays, md)
    pulled = store.pull(entry.id, to=to)
    state, arrays = read_state(pulled.path, [f.path for f in entry.files])
    if state.weights_file:
        expected = sorted(tuple(state.layout[g][i][1]) for g in ("model", "optimizer") for i in state.covers(g))
        try:
            found = sorted(_h5_shapes(str(pulled.path / state.weights_file)))
        except Exception as exc:  # h5py and zipfile raise OSError, KeyError, ValueError... on a damaged file
            raise IntegrityError(f"the checkpoint's {state.weights_file} is not a Keras weights file: "
                                 f"{str(exc)[:200]}") from None
        if found != expected:
            raise IntegrityError(f"the checkpoint's {state.weights_file} does not hold the variables its resume "
                                 "state says it covers")
    return Resumable(entry, pulled.path, state, arrays)


def _check_count(group: Group, variables: list, state: ResumeState) -> None:
    layout = state.layout[group]
    if len(layout) != len(variables):
        raise ConfigurationError(
            f"the checkpoint's {group} has {len(layout)} variables but this model's has {len(variables)}: "
            "resume needs the same model and optimizer as the run that saved it")


def _assign(group: Group, variables: list, state: ResumeState, arrays: Mapping[str, np.ndarray]) -> None:
    _check_count(group, variables, state)
    layout = state.layout[group]
    covered = state.covers(group)
    for i, v in enumerate(variables):
        if i in covered:
            continue  # loaded from the Keras file
        value = arrays.get(f"{group}_{i}")
        if value is None:
            raise IntegrityError(f"the resume state lacks {group} variable {layout[i][0]}")
        if tuple(value.shape) != tuple(v.shape):
            raise ConfigurationError(f"the checkpoint's {group} variable {layout[i][0]} has shape {value.shape}; "
                                     f"this model's {v.path} has {tuple(v.shape)}")
        v.assign(value)


def restore_variables(model: Any, state: ResumeState, arrays: Mapping[str, np.ndarray],
                      directory: Path | None = None) -> None:
    """Assign the saved model and optimizer variables (the optimizer is built first): those the checkpoint's Keras
    file covers through Keras' ``load_weights`` from ``directory`` (the pulled checkpoint), the rest from ``arrays``."""
    ensure_optimizer_built(model)
    groups = _groups(model)
    name = state.weights_file
    if name:
        for group in ("model", "optimizer"):
            _check_count(group, groups[group], state)
        if directory is None or not (Path(directory) / name).is_file():
            raise IntegrityError(f"the resume state's weights file {name} is not in the checkpoint")
        try:
            model.load_weights(str(Path(directory) / name))
        except ValueError as exc:
            raise ConfigurationError(f"the checkpoint's {name} does not fit this model: {exc}") from None
        except OSError as exc:  # h5py: not an HDF5 file after all
            raise IntegrityError(f"the checkpoint's {name} is not a Keras weights file: {exc}") from None
    _assign("model", groups["model"], state, arrays)
    _assign("optimizer", groups["optimizer"], state, arrays)


def restore_metrics(model: Any, state: ResumeState, arrays: Mapping[str, np.ndarray], data: Any) -> bool:
    """Restore the epoch's metric accumulators; ``data`` (a batch) builds metrics Keras has not built yet."""
    try:
        variables = _groups(model)["metrics"]
        if len(variables) != len(state.layout["metrics"]) and data is not None:
            from keras.utils import unpack_x_y_sample_weight

            x, y, _ = unpack_x_y_sample_weight(data)
            internals.build_compiled_metrics(model, y, model(x, training=False))
            variables = _groups(model)["metrics"]
        _assign("metrics", variables, state, arrays)
        return True
    except Exception as exc:  # only the logged training metrics of this epoch are affected, never the weights
        log.warning("could not restore this epoch's training-metric accumulators (%s); the epoch's logged training "
                    "metrics will cover only the batches after the resume", exc)
        return False


class ResumedEpoch:
    """The first epoch of a resumed fit, as the interrupted run had it: at its start the host random generators are
    put where they stood when it began (so it draws the same data order); mid-epoch, the ``k`` batches it had
    already trained are skipped through the backend's :class:`~cloudckpt.keras.trainers.SkipBatches`, and the last
    of them restores the epoch's metric accumulators and the generators as they stood at the save point.

    Args:
        model: the Keras model (variables already restored).
        trainer: the backend's adapter.
        state, arrays: the checkpoint's resume state and variables.
    """

    def __init__(self, model: Any, trainer: TrainerAdapter, state: ResumeState,
                 arrays: Mapping[str, np.ndarray]) -> None:
        self.epoch, self.k = state.epoch, state.batches_to_skip
        self._trainer, self._arrays = trainer, arrays
        self._rng_pending = True
        self._skip: SkipBatches | None = None
        if self.k:
            def skipped_all(data: Any) -> None:
                restore_metrics(model, state, arrays, data)
                trainer.randomness.restore(arrays)  # where the generators stood at the save point

            self._skip = trainer.skip_batches(model, self.k, state.logs, skipped_all)

    def begin_epoch(self) -> None:
        """At the resumed epoch's start (the first call only): the generators as they stood when it began."""
        if self._rng_pending:
            self._trainer.randomness.restore(self._arrays, EPOCH_RNG if self.k else "rng_")
            self._rng_pending = False

    def skipped(self, epoch: int, batch: int) -> bool:
        """Whether ``batch`` of ``epoch`` was trained before the interruption (and is skipped now)."""
        return epoch == self.epoch and batch < self.k

    def uninstall(self) -> None:
        """Put the trainer's own ``train_function`` back (idempotent)."""
        if self._skip is not None:
            self._skip.uninstall()
