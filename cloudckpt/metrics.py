"""A checkpoint's metrics as the index records them: finite numbers only. Pure, but for one warning per name.

The index's JSON has no NaN or infinity, so a non-finite value (a diverged loss, Lightning's ``inf`` score before a
first evaluation, an HF eval returning NaN) is recorded as *no value*: the metric is left out of the checkpoint's
metrics, so it is never ranked best (a checkpoint without the monitored metric never is), and a warning names it
once per process. Every path that commits metrics (``cloudckpt push --metric``, ``CheckpointStore.push``, the torch
``CheckpointManager``, Lightning's ``CloudCheckpointIO``, the HF callback and the Keras callback) goes through
:func:`finite_metrics`.

Example:
    >>> finite_metrics({"val_loss": float("nan"), "acc": 0.9})
    {'acc': 0.9}
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Mapping

from .errors import ConfigurationError

log = logging.getLogger(__name__)

_warned: set[str] = set()
_lock = threading.Lock()


def finite_metrics(metrics: Mapping[str, object] | None) -> dict[str, float]:
    """``metrics`` as floats without the non-finite ones (each name warned about once per process).

    Raises:
        ConfigurationError: a value is not a number.
    """
    out: dict[str, float] = {}
    for name, value in (metrics or {}).items():
        try:
            number = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise ConfigurationError(f"metric {name!r} is not a number. Received: {value!r}") from None
        if math.isfinite(number):
            out[name] = number
        else:
            _warn_once(str(name), number)
    return out


def _warn_once(name: str, value: float) -> None:
    with _lock:
        if name in _warned:
            return
        _warned.add(name)
    log.warning("metric %r is %s: recorded as no value (left out of the checkpoint's metrics, never ranked best); "
                "warned once per metric name", name, value)
