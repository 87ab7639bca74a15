"""The Keras integration: :class:`CloudCheckpoint`. This package is the only part of cloudckpt that imports Keras.

Importing it with a Keras older than :data:`cloudckpt.versions.MIN_KERAS` raises ConfigurationError: the callback
extends ``ModelCheckpoint`` internals that older 3.x releases lack (every save would be state-only).
"""

import keras as _keras

from ..versions import MIN_KERAS, require

require("keras", _keras.__version__, MIN_KERAS, "ModelCheckpoint._should_save_model",
        ok=hasattr(_keras.callbacks.ModelCheckpoint, "_should_save_model"))

from .callback import DEFAULT_STORE_DIR, EXIT_PREEMPTED, CloudCheckpoint  # noqa: E402 (after the version check)

__all__ = ["CloudCheckpoint", "DEFAULT_STORE_DIR", "EXIT_PREEMPTED"]
