"""The digits MLP every training measurement trains (in this process and in the child processes they start), sized
by its weights in MB, and whether Keras is there to train it."""

from __future__ import annotations

import importlib.util
import math


def keras_available() -> str | None:
    """None when the training benchmarks can run, else why not."""
    for mod in ("tensorflow", "keras"):
        if importlib.util.find_spec(mod) is None:
            return f"{mod} is not installed"
    if importlib.util.find_spec("cloudckpt.keras") is None:
        return "cloudckpt.keras (CloudCheckpoint) is not in this checkout yet"
    return None


def hidden_width(mb: float) -> int:
    """Width h of a 64 -> h -> h -> 10 MLP whose float32 weights take ``mb`` MB (1e6 bytes)."""
    params = mb * 1e6 / 4
    return max(8, int((-75 + math.sqrt(75 ** 2 + 4 * params)) / 2))


def build_model(mb: float, seed: int = 0):
    import keras

    keras.utils.set_random_seed(seed)
    h = hidden_width(mb)
    model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(h, activation="relu"),
                              keras.layers.Dense(h, activation="relu"), keras.layers.Dense(10)])
    model.compile(optimizer=keras.optimizers.SGD(0.001),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def digits(repeat: int = 1):
    import numpy as np
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype("float32")
    return np.tile(x, (repeat, 1)), np.tile(y.astype("int32"), repeat)


def weights_mb(model) -> float:
    return sum(int(w.numpy().nbytes) for w in model.weights) / 1e6
