"""async_save: a save point costs the training thread a host copy of the variables; Keras' file is written by the
background writer (cloudckpt.keras.capture / writer), loads to the same values, and is never torn under its name."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from keras.src.saving import saving_lib  # noqa: E402  (Keras' own HDF5 store, spied on)

from cloudckpt.errors import CheckpointWriteError  # noqa: E402
from cloudckpt.keras import CloudCheckpoint  # noqa: E402
from cloudckpt.keras.writer import Writer, WriteTask  # noqa: E402
from cloudckpt.store import CheckpointStore  # noqa: E402

X = np.random.default_rng(0).random((64, 8), dtype=np.float32)
Y = (X.sum(axis=1) > 4).astype("int64")
JOB = str(Path(__file__).parent / "support" / "keras_job.py")


def small_model(extra=None):
    layers = [keras.Input((8,)), keras.layers.Dense(16, activation="relu")] + ([extra] if extra else [])
    model = keras.Sequential(layers + [keras.layers.Dense(2)])
    model.compile(optimizer=keras.optimizers.Adam(1e-2),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


@pytest.fixture
def writes(monkeypatch):
    """The threads on which Keras' own HDF5 store was opened for writing (the file being written)."""
    threads: list[str] = []
    real = saving_lib.H5IOStore.__init__

    def spy(self, path_or_io, archive=None, mode="r"):
        if mode == "w":
            threads.append(threading.current_thread().name)
        real(self, path_or_io, archive=archive, mode=mode)

    monkeypatch.setattr(saving_lib.H5IOStore, "__init__", spy)
    return threads


@pytest.mark.parametrize("name", ["m.weights.h5", "m.keras"])
def test_the_keras_file_is_written_off_the_training_thread_and_loads_the_same_values(tmp_path, writes, name):
    model = small_model()
    cb = CloudCheckpoint(str(tmp_path / name), save_weights_only=name.endswith(".weights.h5"), monitor="loss",
                         remote=str(tmp_path / "store"), preemption=None)
    model.fit(X, Y, epochs=2, batch_size=16, verbose=0, callbacks=[cb])
    assert writes and set(writes) == {"cloudckpt-writer"}, writes  # never the training thread
    assert sorted(os.listdir(tmp_path)) == sorted([name, "store"]), "no temporary file left beside it"
    loaded = keras.models.load_model(tmp_path / name) if name.endswith(".keras") else small_model()
    if not name.endswith(".keras"):
        loaded.optimizer.build(loaded.trainable_variables)  # so the file's optimizer variables load too
        loaded.load_weights(tmp_path / name)
    for a, b in zip(model.weights + model.optimizer.variables, loaded.weights + loaded.optimizer.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
    assert len(CheckpointStore(str(tmp_path / "store")).list()) == 2


def test_async_save_false_writes_on_the_training_thread(tmp_path, writes):
    cb = CloudCheckpoint(str(tmp_path / "m.weights.h5"), save_weights_only=True, monitor="loss",
                         remote=str(tmp_path / "store"), preemption=None, async_save=False)
    small_model().fit(X, Y, epochs=2, batch_size=16, verbose=0, callbacks=[cb])
    assert cb.writer is None and writes == [threading.main_thread().name] * 2


class UnwritableState(keras.layers.Layer):
    """Saves a value HDF5 can't store (object dtype): Keras' store refuses it when the file is written."""

    def call(self, x):
        return x

    def save_own_variables(self, store):
        store["0"] = np.array(["a", None], dtype=object)


def test_a_failing_background_write_makes_fit_raise(tmp_path):
    cb = CloudCheckpoint(str(tmp_path / "m.weights.h5"), save_weights_only=True, monitor="loss",
                         remote=str(tmp_path / "store"), preemption=None)
    with pytest.raises(CheckpointWriteError) as info:
        small_model(UnwritableState()).fit(X, Y, epochs=2, batch_size=16, verbose=0, callbacks=[cb])
    assert "m.weights.h5" in str(info.value) and "object" in str(info.value)  # which file, and Keras' refusal
    assert not (tmp_path / "m.weights.h5").exists(), "no file at all rather than a torn one"


def test_coalescing_keeps_every_file_the_pending_best_and_always_the_latest():
    gate, order = threading.Event(), []
    w = Writer()

    def task(label, target, protected=False, block=False):
        def run():
            if block:
                gate.wait(30)
            order.append(label)
        return WriteTask(run, label, protected=protected, target=target)

    def blocked_submit(label, target, protected=False):
        t = threading.Thread(target=lambda: (w.make_room(protected=protected, target=target),
                                             w.submit(task(label, target, protected))))
        t.start()
        t.join(0.3)
        return t

    try:
        w.submit(task("busy", "m.keras", block=True))  # being written: holds the worker
        while w._pending is not None or w.pending() != 1:
            threading.Event().wait(0.01)
        w.submit(task("plain", "m.keras"))
        w.make_room(protected=True, target="m.keras")  # the same file, newer: the pending one is dropped
        w.submit(task("best", "m.keras", protected=True))
        waited = blocked_submit("latest", "m.keras")
        assert waited.is_alive(), "a non-best save point waits rather than drop the pending best"
        gate.clear()
        order.append("release")
        gate.set()
        waited.join(30)
        assert w.flush(30)
        gate.clear()
        w.submit(task("busy2", "e1.keras", block=True))
        while w._pending is not None or w.pending() != 1:
            threading.Event().wait(0.01)
        w.submit(task("e2", "e2.keras"))
        other = blocked_submit("e3", "e3.keras")
        assert other.is_alive(), "another file waits: every file Keras would write is written"
        gate.set()
        other.join(30)
        assert w.flush(30)
        assert order == ["release", "busy", "best", "latest", "busy2", "e2", "e3"] and w.dropped == ["plain"]
    finally:
        gate.set()
        w.close(30)


def test_sigkill_mid_write_leaves_no_torn_file_and_the_restart_resumes(tmp_path):
    remote, ckpt = str(tmp_path / "store"), tmp_path / "ckpt"
    args = [sys.executable, JOB, "--remote", remote, "--filepath", str(ckpt / "m.weights.h5"), "--weights-only",
            "--epochs", "3", "--preemption", "none", "--out", str(tmp_path / "final.npz")]
    env = {**os.environ, "CLOUDCKPT_FAILPOINT": "keras.write.before_close:2"}  # the second epoch's write
    killed = subprocess.run(args, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert os.listdir(ckpt) == ["m.weights.h5"], "the first epoch's file, whole; the torn one never under a name"
    sys.path.insert(0, str(Path(JOB).parent))
    try:
        import keras_job
    finally:
        sys.path.pop(0)
    keras_job.build_model().load_weights(ckpt / "m.weights.h5")  # a whole HDF5 file
    done = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "RESUMED_FROM ckpt-" in done.stdout
    final = np.load(tmp_path / "final.npz")
    model = keras_job.build_model()
    model.load_weights(ckpt / "m.weights.h5")
    for i, w in enumerate(model.weights):
        np.testing.assert_array_equal(w.numpy(), final[f"arr_{i}"])


@pytest.mark.parametrize("name", ["m.weights.h5", "m.keras"])
def test_the_background_file_is_on_disk_before_its_name_and_has_keras_own_mode(tmp_path, monkeypatch, name):
    """README promises a whole local file after a crash: the written bytes are fsynced before the rename over the
    name, and the folder (the rename) after it. The mode is the one Keras' own ModelCheckpoint gives its file."""
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst, **kw):
        events.append(("replace", str(dst)))
        return real_replace(src, dst, **kw)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    weights_only = name.endswith(".weights.h5")
    own = keras.callbacks.ModelCheckpoint(str(tmp_path / "keras" / name), save_weights_only=weights_only,
                                          monitor="loss")
    small_model().fit(X, Y, epochs=1, batch_size=16, verbose=0, callbacks=[own])
    cb = CloudCheckpoint(str(tmp_path / "ours" / name), save_weights_only=weights_only, monitor="loss",
                         remote=str(tmp_path / "store"), preemption=None)
    small_model().fit(X, Y, epochs=1, batch_size=16, verbose=0, callbacks=[cb])
    target = str(tmp_path / "ours" / name)
    renamed = events.index(("replace", target))
    synced = [i for i, (kind, what) in enumerate(events[:renamed]) if kind == "fsync"
              and os.path.basename(what).startswith(f".{name}.") and what.endswith(".cloudckpt-tmp")]
    assert synced, f"the temporary file was not fsynced before its rename: {events[:renamed + 1]}"
    assert ("fsync", str(tmp_path / "ours")) in events[renamed:], "the rename was not flushed (folder fsync)"
    mode = os.stat(target).st_mode & 0o777
    assert mode == os.stat(tmp_path / "keras" / name).st_mode & 0o777, oct(mode)
