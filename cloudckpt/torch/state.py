"""Training state as PyTorch sees it: copied to CPU memory, checked to be plain data, written and read back safely.

A state is a tree of dicts (string or integer keys), lists and tuples whose leaves are tensors or plain values
(None, bool, int, float, str, bytes) — what ``model.state_dict()``, ``optimizer.state_dict()``,
``scheduler.state_dict()`` and :func:`rng_state` return. It is written with ``torch.save`` and read with
``torch.load(weights_only=True)``, which rebuilds tensors and plain containers only and refuses any other object a
file names, so a checkpoint from the bucket can't run code on load.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ConfigurationError, IntegrityError

STATE_FILE = "state.pt"
_PLAIN = (type(None), bool, int, float, str, bytes, torch.dtype, torch.Size)


def copy_to_cpu(state: Any, path: str = "state", *, copy: bool = True) -> Any:
    """A copy of ``state`` whose tensors live in CPU memory and share nothing with the originals (with
    ``copy=False``: only the check below, ``state`` is returned as it is).

    Raises:
        ConfigurationError: a leaf is neither a tensor nor plain data (its place in the tree is named).
    """
    if isinstance(state, torch.Tensor):
        return state.detach().to("cpu", copy=True) if copy else state
    if isinstance(state, _PLAIN):
        return state
    if isinstance(state, Mapping):
        out = {}
        for k, v in state.items():
            if not isinstance(k, (str, int)):
                raise ConfigurationError(f"{path}: keys must be str or int. Received: {k!r}")
            out[k] = copy_to_cpu(v, f"{path}[{k!r}]", copy=copy)
        return out if copy else state
    if isinstance(state, (list, tuple)):
        items = [copy_to_cpu(v, f"{path}[{i}]", copy=copy) for i, v in enumerate(state)]
        if not copy:
            return state
        return items if isinstance(state, list) else tuple(items)
    raise ConfigurationError(
        f"{path}: only tensors, plain data (None, bool, int, float, str, bytes) and dicts/lists/tuples of them can "
        f"be checkpointed. Received: {type(state).__name__}")


def write_state(state: Any, directory: Path) -> Path:
    path = Path(directory) / STATE_FILE
    torch.save(state, path)
    return path


def read_state(directory: Path, map_location: Any = "cpu") -> Any:
    """Load ``state.pt`` from ``directory`` with ``weights_only=True``; anything but tensors and plain data is an
    :class:`~cloudckpt.errors.IntegrityError` (nothing of it is run)."""
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        raise IntegrityError(f"{path.parent}: no {STATE_FILE}; not a checkpoint written by cloudckpt.torch")
    return load_plain(path, map_location)


def load_plain(path: Path, map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)``, checked to be a tree of tensors and plain data. Whatever a damaged
    or hostile file makes torch raise (UnpicklingError, AssertionError, KeyError, OSError, RecursionError...) is an
    :class:`~cloudckpt.errors.IntegrityError`; ``weights_only`` runs none of its code."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
        copy_to_cpu(state, copy=False)  # refuses any leaf that is not a tensor or plain data
    except Exception as exc:  # noqa: BLE001 - any failure to read a file from the bucket is an integrity failure
        shown = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise IntegrityError(f"{path}: refused to load: not plain tensors and data ({shown})") from exc
    return state


def rng_state() -> dict[str, Any]:
    """The host random generators (``torch``, ``numpy``'s global one, Python's ``random``) as plain data."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": _to_lists(random.getstate()),
    }


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def _to_lists(value: Any) -> Any:
    return [_to_lists(v) for v in value] if isinstance(value, tuple) else value
