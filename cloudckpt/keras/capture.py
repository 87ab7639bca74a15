"""Background capture of a Keras save: copy the variables on the training thread, write Keras' file later.

``model.save_weights(path)`` and ``model.save(path)`` (Keras 3, ``.weights.h5`` / ``.keras``) walk the model's
saveables (layers, the optimizer...) and each one's ``save_own_variables`` assigns its variables into an HDF5 store at
paths Keras chooses. :func:`capture` runs that same walk (Keras' own, :func:`~cloudckpt.keras.internals.walk_state`)
on the training thread into a :class:`RecordingStore` that keeps, in order, each group Keras makes (its path and
metadata) and a host copy (``np.array(..., copy=True)``: JAX may donate a buffer and a torch CPU tensor shares memory
with NumPy, so never a view) of every value assigned there. For a ``.keras`` it also serializes the model's
``config.json``/``metadata.json`` and lets layers write their assets (vocabularies...) into a temporary directory.
That :class:`Snapshot` is all the training thread pays for.

:meth:`Snapshot.write` then runs on a background thread: it replays the groups into Keras' own ``H5IOStore`` (for a
``.keras``, inside the zip with ``metadata.json``, ``config.json`` and the assets, in Keras' order), so the file is the
one Keras would have written from the same values and ``model.load_weights`` / ``keras.models.load_model`` read it
as usual. The file is written under a temporary name on the target's file system and renamed over the target: a
crash mid-write never leaves a torn file under the user's name.

Example:
    >>> import keras, numpy as np, tempfile, os
    >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    >>> snap = capture(model, "weights")
    >>> path = os.path.join(tempfile.mkdtemp(), "m.weights.h5")
    >>> snap.write(path)
    >>> model.load_weights(path)
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import keras
import numpy as np

from .. import failpoints, localfs
from . import internals

log = logging.getLogger(__name__)

Kind = Literal["weights", "keras"]


def host_copy(value: Any) -> np.ndarray:
    """A host array that shares no memory with ``value`` (a Keras variable, a backend tensor or an array).

    A variable's ``numpy()`` is one copy on every backend (TensorFlow copies the tensor; JAX and torch go through
    ``np.array``, which copies); anything that still is a view on another buffer is copied again."""
    arr = np.asarray(value.numpy() if isinstance(value, keras.Variable) else keras.ops.convert_to_numpy(value))
    if arr.base is not None or not arr.flags.owndata:
        arr = np.array(arr, copy=True)
    return arr


def copy_into(out: np.ndarray, value: Any) -> bool:
    """Copy ``value`` into the host array ``out`` (one memcpy into memory already mapped, from a read-only view of
    the backend's buffer: TensorFlow and JAX on the CPU); False, nothing done, when no such view is to be had (a
    torch parameter) or it differs in shape or dtype."""
    try:
        raw = value.value if isinstance(value, keras.Variable) else value
        if hasattr(raw, "read_value"):  # a tf.Variable: its current value as a tensor (whose __array__ is a view)
            raw = raw.read_value()
        view = np.asarray(raw)
    except Exception:  # e.g. torch: a tensor that requires grad has no NumPy view
        return False
    if view.shape != out.shape or view.dtype != out.dtype or view.dtype.kind in "OUSV":
        return False
    np.copyto(out, view)
    return True


class BufferPool:
    """The host arrays of the last snapshot written (or dropped), kept for the next capture to copy into: a fresh
    100 MB array costs its page faults at every save (tens to hundreds of ms on a loaded machine), a reused one a
    memcpy. The pool holds at most one snapshot's arrays, and :meth:`take` empties it, so snapshots alive plus the
    pool never exceed the two copies the writer allows (a snapshot's arrays come here only as it is released)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._arrays: dict[tuple[str, str], np.ndarray] = {}

    def take(self) -> dict[tuple[str, str], np.ndarray]:
        with self._lock:
            arrays, self._arrays = self._arrays, {}
        return arrays

    def give(self, groups: list[Group]) -> None:
        arrays = {(g.path, k): v for g in groups for k, v in g.items}
        with self._lock:
            self._arrays = arrays

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(v.nbytes for v in self._arrays.values())


@dataclass
class Group:
    """One group Keras' walk made: its path in the file, its metadata, and the values assigned there, in order."""

    path: str
    metadata: dict | None
    items: list[tuple[str, np.ndarray]] = field(default_factory=list)


class RecordingStore(internals.H5IOStore):
    """Stands in for Keras' ``H5IOStore`` (write mode) during the saving walk: records instead of writing.

    Only the write side of the store's interface is served (``make``, item assignment, and the reads a
    ``save_own_variables`` may make of what it assigned). Values are copied to host memory as they are assigned.
    """

    def __init__(self, reuse: dict[tuple[str, str], np.ndarray] | None = None) -> None:  # no file, unlike Keras'
        self._reuse = reuse or {}
        self.mode = "w"
        self.archive = None
        self.io_file = None
        self.groups: list[Group] = []
        self._group: Group | None = None

    def __bool__(self) -> bool:
        return True

    def make(self, path: str, metadata: dict | None = None) -> RecordingStore:
        self._group = Group(path, dict(metadata) if metadata else None)
        self.groups.append(self._group)
        return self

    def _current(self) -> Group:
        if self._group is None:
            raise ValueError("a value was assigned before the saving walk made a group")
        return self._group

    def __setitem__(self, key: str, value: Any) -> None:
        group = self._current()
        out = self._reuse.pop((group.path, str(key)), None)
        if out is None or not copy_into(out, value):
            out = host_copy(value)
        group.items.append((str(key), out))

    def __getitem__(self, key: str) -> np.ndarray:
        for k, v in self._current().items:
            if k == key:
                return v
        raise KeyError(key)

    def __delitem__(self, key: str) -> None:
        group = self._current()
        group.items = [(k, v) for k, v in group.items if k != key]

    def __contains__(self, key: object) -> bool:
        return any(k == key for k, _ in self._current().items)

    def __len__(self) -> int:
        return len(self._current().items)

    def keys(self) -> list[str]:
        return [k for k, _ in self._current().items]

    def close(self) -> None:
        pass

    def replay(self, store: Any) -> None:
        """Make the same groups in Keras' ``store`` and assign the same values, in the same order."""
        for group in self.groups:
            store.make(group.path, metadata=group.metadata)
            for key, value in group.items:
                store[key] = value

    @property
    def nbytes(self) -> int:
        return sum(v.nbytes for g in self.groups for _, v in g.items)

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        """The shape of every value recorded (what the file will hold)."""
        return [tuple(v.shape) for g in self.groups for _, v in g.items]


@dataclass
class Snapshot:
    """What one save copied on the training thread, enough to write Keras' file later (:meth:`write`).

    Attributes:
        kind: ``"weights"`` (``save_weights``, a ``.weights.h5``) or ``"keras"`` (``save``, a ``.keras`` zip).
        weights: the recorded walk.
        config_json, metadata_json: a ``.keras``'s model config and metadata, serialized at the save point.
        assets: a ``.keras``'s assets store (a temporary directory), or None.
    """

    kind: Kind
    weights: RecordingStore
    config_json: str | None = None
    metadata_json: str | None = None
    assets: Any = None
    pool: BufferPool | None = None

    @property
    def nbytes(self) -> int:
        """Host memory the copied values take."""
        return self.weights.nbytes

    def write(self, path: str, tmp_dir: str | None = None) -> None:
        """Write the Keras file to ``path``: under a temporary name in ``tmp_dir`` (default: ``path``'s directory;
        it must be on the same file system), flushed to disk and renamed over ``path`` (the rename flushed too).
        Nothing is left under ``path`` or the temporary name if writing fails."""
        directory = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".cloudckpt-tmp",
                                   dir=tmp_dir or directory)
        os.close(fd)
        try:
            if self.kind == "weights":
                self._write_weights(tmp)
            else:
                self._write_keras(tmp, directory if tmp_dir is None else tmp_dir)
            localfs.publish(tmp, path)  # the umask's mode, as Keras' own file; whole on disk before the rename
        except BaseException:
            if os.path.lexists(tmp):
                os.unlink(tmp)
            raise
        finally:
            self.discard()

    def _write_weights(self, out: str) -> None:
        store = internals.H5IOStore(out, mode="w")
        try:
            self.weights.replay(store)
            failpoints.hit("keras.write.before_close")
        finally:
            store.close()

    def _write_keras(self, out: str, scratch: str) -> None:
        # Keras' order: metadata.json, config.json, model.weights.h5, assets/. The HDF5 part goes through a
        # temporary file (as Keras does for a model too large for memory) rather than a second copy in memory.
        fd, h5 = tempfile.mkstemp(prefix=".weights.", suffix=".cloudckpt-tmp", dir=scratch)
        os.close(fd)
        try:
            self._write_weights(h5)
            with open(out, "wb") as f, zipfile.ZipFile(f, "w") as archive:
                archive.writestr(internals.METADATA_JSON, (self.metadata_json or "").encode())
                archive.writestr(internals.CONFIG_JSON, (self.config_json or "").encode())
                archive.write(h5, internals.WEIGHTS_H5)
                if self.assets is not None:
                    internals.zip_assets(archive, self.assets)
        finally:
            os.unlink(h5)

    def discard(self) -> None:
        """Release the copied values (to the pool, if any) and the assets' temporary directory."""
        if self.pool is not None and self.weights.groups:
            self.pool.give(self.weights.groups)
        self.weights.groups = []
        if self.assets is not None and self.assets.tmp_dir:
            shutil.rmtree(self.assets.tmp_dir, ignore_errors=True)
        self.assets = None


def kind_of(path: str) -> Kind | None:
    """The snapshot kind of a local file Keras writes (``.weights.h5`` or ``.keras``); None for anything else (a
    legacy ``.h5``, a remote path), which is saved synchronously by Keras."""
    if "://" in path:
        return None
    if path.endswith(".weights.h5"):
        return "weights"
    if path.endswith(".keras"):
        return "keras"
    return None


def capture(model: Any, kind: Kind, pool: BufferPool | None = None) -> Snapshot:
    """Run Keras' saving walk over ``model`` on this (the training) thread, copying every value to host memory (into
    ``pool``'s arrays where they fit); the snapshot gives its arrays back to ``pool`` once written or dropped."""
    weights = RecordingStore(pool.take() if pool is not None else None)
    if kind == "weights":
        if not model.built:  # what save_weights says
            raise ValueError("You are saving a model that has not yet been built. Try building the model first by "
                             "calling it on some data or by using `build()`.")
        internals.walk_state(model, weights, None)
        return Snapshot(kind, weights, pool=pool)
    config_json, metadata_json = internals.model_json(model)
    assets = internals.new_assets_store()
    try:
        internals.walk_state(model, weights, assets)
    except BaseException:
        shutil.rmtree(assets.tmp_dir, ignore_errors=True)
        raise
    return Snapshot(kind, weights, config_json, metadata_json, assets, pool)


def tmp_dir_for(target: str, staging: Path | None) -> str | None:
    """Where to write ``target``'s temporary file: the staging directory when it is on the target's file system
    (so a crash leaves nothing beside the user's files; the next run sweeps abandoned staging), else None (beside
    the target)."""
    if staging is None:
        return None
    try:
        same = os.stat(staging).st_dev == os.stat(os.path.dirname(os.path.abspath(target))).st_dev
    except OSError:
        return None
    return str(staging) if same else None
