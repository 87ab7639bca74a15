"""The resume state of a Keras training run: what a checkpoint holds besides the user's file, and how to restore it.

Every checkpoint the callback pushes carries ``cloudckpt_state/``: ``state.json`` with the position (epoch, batches
done in it, global step), the callback's best value and save-frequency counters, and ``variables.npz`` with the
variables needed to resume: every model variable (including dropout seed-generator states), every optimizer variable
(iterations, learning rate, slots) and the training metrics' variables. When the checkpoint also holds the file Keras
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

import json
import logging
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, Strict, ValidationError, field_validator

from ..errors import ConfigurationError, IntegrityError
from ..manifest import check_relative_path

log = logging.getLogger(__name__)

STATE_DIR = "cloudckpt_state"
STATE_JSON = "state.json"
VARIABLES = "variables.npz"
FORMAT = 2
READABLE_FORMATS = (1, 2)  # 1: every variable in variables.npz (cloudckpt 0.1)
KERAS_WEIGHT_FILES = (".weights.h5", ".keras")  # Keras 3 saves whose weights store holds the optimizer too
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


def _h5_shapes(path: str) -> list[tuple[int, ...]]:
    """Shapes of every dataset in a Keras 3 weights file (``.weights.h5``, or the one inside a ``.keras`` zip);
    reads metadata only."""
    import h5py

    shapes: list[tuple[int, ...]] = []

    def visit(_name: str, obj: Any) -> None:
        if isinstance(obj, h5py.Dataset):
            shapes.append(tuple(obj.shape))

    if path.endswith(".keras"):
        import zipfile

        with zipfile.ZipFile(path) as archive, archive.open("model.weights.h5") as member, \
                h5py.File(member, "r") as f:
            f.visititems(visit)
    else:
        with h5py.File(path, "r") as f:
            f.visititems(visit)
    return shapes


def file_coverage(model: Any, path: str) -> dict[str, list[int]] | None:
    """Which of the model's and optimizer's variables (indices into the groups of :func:`capture`) the Keras file
    ``path``, just written by Keras' save, holds; None when it isn't a Keras 3 weights file or doesn't hold exactly
    the model's weights and the optimizer's variables (a custom ``save_own_variables``, a legacy ``.h5``...), in
    which case everything is captured as before."""
    if not path.endswith(KERAS_WEIGHT_FILES):
        return None
    groups = _groups(model)
    weight_ids = {id(w) for w in model.weights}
    model_idx = [i for i, v in enumerate(groups["model"]) if id(v) in weight_ids]
    if len(model_idx) != len(weight_ids):
        return None
    expected = [tuple(groups["model"][i].shape) for i in model_idx] + [tuple(v.shape) for v in groups["optimizer"]]
    try:
        found = _h5_shapes(path)
    except Exception as exc:  # unreadable as a Keras 3 weights file: capture everything
        log.debug("%s is not readable as a Keras weights file (%s): capturing all variables", path, exc)
        return None
    if sorted(found) != sorted(expected):
        log.info("%s does not hold exactly the model's and optimizer's variables: capturing all of them", path)
        return None
    return {"model": model_idx, "optimizer": list(range(len(groups["optimizer"])))}


class StatePlan:
    """What a save copies on the training thread, worked out once per fit: every model, optimizer and metric
    variable except those ``covered`` by the file Keras has just written (see :func:`file_coverage`), and the layout
    (path and shape of every variable, copied or not) that restore checks against."""

    def __init__(self, model: Any, covered: Mapping[str, list[int]] | None = None) -> None:
        self.covered = {g: list(ix) for g, ix in (covered or {}).items()} or None
        self.layout: dict[str, list] = {}
        self.copies: list[tuple[str, Any]] = []
        for group, variables in _groups(model).items():
            skip = set((covered or {}).get(group, ()))
            self.layout[group] = [[v.path, list(v.shape)] for v in variables]
            self.copies += [(f"{group}_{i}", v) for i, v in enumerate(variables) if i not in skip]

    def capture(self, *, metrics: bool = True, to_host: Callable[[Any], np.ndarray] | None = None
                ) -> dict[str, np.ndarray]:
        """Copy the variables to host memory now; :func:`write_state` writes them later on the uploader's thread.
        ``metrics=False`` leaves out the training metrics' accumulators (only a mid-epoch resume needs them);
        ``to_host`` reads one variable (default ``v.numpy()``, a copy on every backend)."""
        read = to_host or (lambda v: np.asarray(v.numpy()))
        return {key: read(v) for key, v in self.copies if metrics or not key.startswith("metrics_")}


def capture(model: Any, covered: Mapping[str, list[int]] | None = None
            ) -> tuple[dict[str, np.ndarray], dict[str, list]]:
    """Copy the variables not ``covered`` by a Keras file (all by default) now; return them and the layout."""
    plan = StatePlan(model, covered)
    return plan.capture(), plan.layout


def write_state(directory: Path, arrays: Mapping[str, np.ndarray], layout: Mapping[str, list],
                info: Mapping[str, Any]) -> Path:
    """Write ``cloudckpt_state/`` (the captured variables + ``info`` as JSON) into ``directory``; return it."""
    out = Path(directory) / STATE_DIR
    out.mkdir(parents=True, exist_ok=True)
    with open(out / VARIABLES, "wb") as f:
        named: dict[str, Any] = dict(arrays)  # savez's own keywords are typed too: a Mapping would not pass
        np.savez(f, **named)
    doc = {"format": FORMAT, **info, "layout": dict(layout)}
    (out / STATE_JSON).write_text(json.dumps(doc, indent=1, default=float))
    return out


_Count = Annotated[int, Strict(), Field(ge=0)]
_Variable = Annotated[tuple[Annotated[str, Strict()], list[_Count]], Strict(False)]  # [path, shape] (a JSON list)


class ResumeState(BaseModel):
    """What ``state.json`` must hold to be acted on: read back from the store, so checked like a manifest (types,
    ranges, a weights file that is a plain name the checkpoint holds). Unknown fields are ignored."""

    model_config = ConfigDict(extra="ignore", strict=True)

    format: Literal[1, 2]
    epoch: _Count
    epoch_done: bool
    batches_done: _Count | None = None
    initial_epoch: _Count
    global_step: _Count
    logs: dict[str, float] = {}
    best: float | None = None
    best_seen: float | None = None
    batches_seen_since_last_saving: _Count = 0
    last_batch_seen: int | None = None
    weights_file: str | None = None
    covered: dict[Literal["model", "optimizer"], list[_Count]] | None = None
    layout: dict[Literal["model", "optimizer", "metrics"], list[_Variable]]

    @field_validator("weights_file")
    @classmethod
    def _plain_name(cls, v: str | None) -> str | None:
        if v is not None and "/" in check_relative_path(v):
            raise ValueError(f"weights file {v!r} is not a plain file name")
        return v

    @field_validator("layout")
    @classmethod
    def _groups(cls, v: dict) -> dict:
        if set(v) != set(GROUPS):
            raise ValueError(f"layout must name the groups {GROUPS}")
        return v


def check_state(info: Any, files: Any = None) -> dict[str, Any]:
    """``info`` (a parsed ``state.json``) if it is a valid resume state whose weights file is one of ``files`` (the
    checkpoint's paths, when given); IntegrityError otherwise."""
    try:
        state = ResumeState.model_validate(info)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise IntegrityError(f"invalid resume state at {'.'.join(map(str, err['loc'])) or '<root>'}: "
                             f"{err['msg']}") from None
    except ValueError as exc:  # check_relative_path's UnsafePathError
        raise IntegrityError(f"invalid resume state: {exc}") from None
    if not state.epoch_done and state.batches_done is None:
        raise IntegrityError("invalid resume state: a mid-epoch state without batches_done")
    if state.weights_file and files is not None and f"{state.weights_file}" not in set(files):
        raise IntegrityError(f"the resume state's weights file {state.weights_file!r} is not in the checkpoint")
    return info


def read_state(directory: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Read a checkpoint's state JSON and variables; IntegrityError when it holds none or they are malformed."""
    src = Path(directory) / STATE_DIR
    try:
        info = json.loads((src / STATE_JSON).read_text())
        with np.load(src / VARIABLES, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except FileNotFoundError as exc:
        raise IntegrityError(f"{directory}: checkpoint holds no cloudckpt resume state ({exc.filename})") from None
    except (ValueError, RecursionError, OSError, EOFError, KeyError, zipfile.BadZipFile) as exc:
        raise IntegrityError(f"{directory}: unreadable resume state: {str(exc)[:200]}") from None
    if not isinstance(info, dict) or info.get("format") not in READABLE_FORMATS:
        shown = info.get("format") if isinstance(info, dict) else info
        raise IntegrityError(f"{directory}: unknown resume state format {shown!r}")
    return info, arrays


def _check_count(group: str, variables: list, info: Mapping[str, Any]) -> None:
    layout = info["layout"][group]
    if len(layout) != len(variables):
        raise ConfigurationError(
            f"the checkpoint's {group} has {len(layout)} variables but this model's has {len(variables)}: "
            "resume needs the same model and optimizer as the run that saved it")


def _assign(group: str, variables: list, info: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> None:
    _check_count(group, variables, info)
    layout = info["layout"][group]
    covered = set((info.get("covered") or {}).get(group, ()))
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


def restore_variables(model: Any, info: Mapping[str, Any], arrays: Mapping[str, np.ndarray],
                      directory: Path | None = None) -> None:
    """Assign the saved model and optimizer variables (the optimizer is built first): those the checkpoint's Keras
    file covers through Keras' ``load_weights`` from ``directory`` (the pulled checkpoint), the rest from ``arrays``."""
    ensure_optimizer_built(model)
    groups = _groups(model)
    name = info.get("weights_file")
    if name:
        for group in ("model", "optimizer"):
            _check_count(group, groups[group], info)
        if directory is None or not (Path(directory) / name).is_file():
            raise IntegrityError(f"the resume state's weights file {name} is not in the checkpoint")
        try:
            model.load_weights(str(Path(directory) / name))
        except ValueError as exc:
            raise ConfigurationError(f"the checkpoint's {name} does not fit this model: {exc}") from None
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
    if not index.checkpoints:  # a new run: the callback's claim wrote an index with no checkpoint yet
        log.info("no checkpoint in %s yet: starting from scratch", store.url)
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
            check_state(info, [f.path for f in entry.files])
        except IntegrityError as exc:
            log.warning("checkpoint %s can't be resumed from (%s); trying an older one", entry.id, exc)
            failures.append(f"{entry.id}: {exc}")
            continue
        if failures:
            log.warning("resuming from %s: %d newer checkpoint(s) failed verification", entry.id, len(failures))
        return entry, pulled.path, info, arrays
    raise IntegrityError(f"{store.url}: no checkpoint with resume state verifies: " + "; ".join(failures))
