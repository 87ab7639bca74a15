"""The private members of Keras 3 that CloudCheckpoint reads or sets, in one place (Keras 3.10 to 3.15).

The background capture (:mod:`cloudckpt.keras.capture`) runs Keras' own saving walk (``saving_lib._save_state``)
into a recording store and replays it later into Keras' own ``H5IOStore``; those private names are here too.

Besides these, :class:`~cloudckpt.keras.callback.CloudCheckpoint` overrides two hooks of ``ModelCheckpoint``
(``_should_save_model``, ``_save_model``; :mod:`cloudckpt.keras` refuses a Keras without them) and
:mod:`cloudckpt.keras.trainers` swaps ``model.train_function``. When a Keras release moves one of these, this module
is where to adapt.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import keras
from keras import ops
from keras.src.saving import saving_lib as _saving_lib

H5IOStore = _saving_lib.H5IOStore
"""Keras' weights store (an HDF5 file, or one inside a ``.keras`` zip): the class the saving walk accepts."""
CONFIG_JSON, METADATA_JSON = _saving_lib._CONFIG_FILENAME, _saving_lib._METADATA_FILENAME
WEIGHTS_H5, ASSETS_DIR = f"{_saving_lib._VARS_FNAME}.h5", _saving_lib._ASSETS_DIRNAME


@dataclass(frozen=True)
class SaveCounters:
    """ModelCheckpoint's integer ``save_freq`` counters (``_batches_seen_since_last_saving``, ``_last_batch_seen``)."""

    batches_seen_since_last_saving: int = 0
    last_batch_seen: int | None = None


def save_counters(callback: Any) -> SaveCounters:
    """The counters as ``callback`` (a ``ModelCheckpoint``) holds them now."""
    last = callback._last_batch_seen
    return SaveCounters(int(callback._batches_seen_since_last_saving), None if last is None else int(last))


def set_save_counters(callback: Any, counters: SaveCounters) -> None:
    """Put ``callback``'s counters where ``counters`` say (a new callback's, or a checkpoint's)."""
    callback._batches_seen_since_last_saving = counters.batches_seen_since_last_saving
    callback._last_batch_seen = counters.last_batch_seen


def file_path(callback: Any, epoch: int, batch: int | None, logs: dict[str, Any]) -> str:
    """The file ``callback`` (a ``ModelCheckpoint``) writes at this save point."""
    return str(callback._get_file_path(epoch, batch, logs))


def monitor_mode(callback: Any) -> Literal["min", "max"]:
    """Whether ``callback``'s monitored value improves downwards or upwards (``"min"`` when Keras can't tell yet)."""
    if callback.monitor_op is None:
        try:
            callback._set_monitor_op()
        except ValueError:
            return "min"
    # ask the comparison itself: Keras 3.10 sets np.greater/np.less, later releases ops.greater/ops.less
    return "max" if bool(ops.convert_to_numpy(callback.monitor_op(1.0, 0.0))) else "min"


def set_initial_epoch(model: Any, epoch: int | None) -> None:
    """Make the next ``fit`` start at ``epoch`` (read by Keras' ``fit`` through ``model._initial_epoch``); None
    clears it."""
    if epoch is not None or getattr(model, "_initial_epoch", None) is not None:
        model._initial_epoch = epoch


def build_compiled_metrics(model: Any, y: Any, y_pred: Any) -> None:
    """Build the compiled metrics and loss trackers Keras builds lazily at the first step."""
    for part in (getattr(model, "_compile_metrics", None), getattr(model, "_compile_loss", None)):
        if part is not None and not part.built:
            part.build(y, y_pred)


# --- Keras' saving library (saving_lib), as ``model.save`` / ``model.save_weights`` use it --------------------------


def keras_saves(model: Any) -> bool:
    """Whether ``model`` saves with Keras' own ``Model.save`` and ``Model.save_weights`` (not an override)."""
    cls = type(model)
    return cls.save is keras.Model.save and cls.save_weights is keras.Model.save_weights


_SKIPSETS: dict[str, set] = {}


def _cached_skipset(obj_type: str) -> set:
    if obj_type not in _SKIPSETS:
        _SKIPSETS[obj_type] = _KERAS_SKIPSET(obj_type)
    return _SKIPSETS[obj_type]


_KERAS_SKIPSET = _saving_lib.get_attr_skipset


def walk_state(model: Any, weights_store: Any, assets_store: Any | None) -> None:
    """Keras' own state walk of ``model.save``/``save_weights``: every saveable's ``save_own_variables`` into
    ``weights_store`` and (``.keras``) ``save_assets`` into ``assets_store``, at the paths Keras gives them.

    Keras 3.15's ``get_attr_skipset`` means to cache, per kind of saveable, the attributes the walk skips, but stores
    it under another key than it reads (``saving_attr_skipset_*`` / ``saving_attr_skiplist_*``), so every save
    builds a reference ``Layer``, ``Optimizer``... again (~0.2 s per save here, most of it the optimizer). During
    this walk it is cached for real (the set depends only on the kind)."""
    _saving_lib.get_attr_skipset = _cached_skipset
    try:
        _saving_lib._save_state(model, weights_store=weights_store, assets_store=assets_store, inner_path="",
                                visited_saveables=set())
    finally:
        _saving_lib.get_attr_skipset = _KERAS_SKIPSET


def model_json(model: Any) -> tuple[str, str]:
    """The ``config.json`` and ``metadata.json`` texts ``model.save`` writes into a ``.keras`` file."""
    return _saving_lib._serialize_model_as_json(model)


def new_assets_store() -> Any:
    """An assets store writing into a fresh temporary directory (``.working_dir``; ``.tmp_dir`` to remove)."""
    return _saving_lib.DiskIOStore(ASSETS_DIR, mode="w")


def zip_assets(archive: Any, assets_store: Any) -> None:
    """Add the assets ``assets_store`` holds to the ``.keras`` zip ``archive`` under ``assets/``, as Keras does."""
    _saving_lib._write_to_zip_recursively(archive, assets_store.working_dir, ASSETS_DIR)


def print_msg(message: str) -> None:
    """Print as ``ModelCheckpoint``'s ``verbose`` messages do (Keras' ``io_utils.print_msg``: stdout, or the absl
    log when interactive logging is off)."""
    from keras.src.utils import io_utils

    io_utils.print_msg(message)


def as_float(value: Any) -> float | None:
    return None if value is None else float(value)


def numeric(value: Any) -> bool:
    """Whether ``float(value)`` works (a log value Keras reports may be anything)."""
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


def finite(value: Any) -> bool:
    return numeric(value) and math.isfinite(float(value))
