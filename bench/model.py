"""The digits MLP every training measurement trains (in this process and in the child processes they start), sized
by its weights in MB, and whether Keras is there to train it; its PyTorch twin for :mod:`bench.frameworks`."""

from __future__ import annotations

import importlib.util
import math
from typing import Any


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


def torch_mlp(mb: float):
    """The same MLP in PyTorch, seeded, sized so that its weights plus Adam's two moments take about ``mb`` MB."""
    import torch

    torch.manual_seed(0)
    h = hidden_width(mb / 3)
    return torch.nn.Sequential(torch.nn.Linear(64, h), torch.nn.ReLU(), torch.nn.Linear(h, h), torch.nn.ReLU(),
                               torch.nn.Linear(h, 10))


def torch_digits(n: int):
    """The first ``n`` digits as float32 and int64 tensors."""
    import torch

    x, y = digits()
    return torch.from_numpy(x[:n]), torch.from_numpy(y[:n]).long()


def tensor_mb(tree: Any) -> float:
    """MB (1e6 bytes) of the tensors in a state tree (dicts, lists, tuples)."""
    import torch

    if isinstance(tree, torch.Tensor):
        return tree.nelement() * tree.element_size() / 1e6
    if isinstance(tree, dict):
        return sum(tensor_mb(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(tensor_mb(v) for v in tree)
    return 0.0
