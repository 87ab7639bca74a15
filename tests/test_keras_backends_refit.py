"""The same CloudCheckpoint object, fit again: Keras' BackupAndRestore tests interrupt ``fit`` with an exception and
call ``fit`` again with the same callback (what a notebook user does after an error); it must resume exactly as a
new CloudCheckpoint on the same store would. A counting layer (Keras' own ``CanaryLayer``) counts the batches
computed. Runs in-process on the backend this process runs (TensorFlow here; tests/test_keras_backends.py runs this
file again under JAX and PyTorch)."""

from __future__ import annotations

from pathlib import Path

import pytest

keras = pytest.importorskip("keras")
import numpy as np  # noqa: E402
from support.keras_job import deterministic  # noqa: E402

from cloudckpt.keras import CloudCheckpoint  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Skipping variable loading for optimizer")

BATCHES_PER_EPOCH = 3  # 10 samples, batches of 4


class Canary(keras.layers.Layer):
    """Counts the batches the model computes (a non-trainable weight, saved and restored with the model)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.counter = self.add_weight(shape=(), initializer="zeros", dtype="float32", trainable=False)

    def call(self, x):
        self.counter.assign_add(1)
        return x


class Interrupt(keras.callbacks.Callback):
    """Raises after the ``steps``-th batch or the ``epochs``-th epoch (Keras' InterruptingCallback)."""

    def __init__(self, steps=None, epochs=None):
        super().__init__()
        self.steps, self.epochs, self.batch_count, self.epoch_count = steps, epochs, 0, 0

    def on_epoch_end(self, epoch, logs=None):
        self.epoch_count += 1
        if self.epochs is not None and self.epoch_count == self.epochs:
            raise RuntimeError("EpochInterruption")

    def on_train_batch_end(self, batch, logs=None):
        self.batch_count += 1
        if self.steps is not None and self.batch_count == self.steps:
            raise RuntimeError("StepsInterruption")


def interrupted_then_fit_again(tmp: Path, save_freq, interrupt: Interrupt, first_epochs: int, reuse: bool):
    """Fit until ``interrupt`` raises, then fit 5 epochs with the same callback (``reuse``) or a new one."""
    deterministic(11)
    model = keras.Sequential([keras.Input((3,)), Canary(), keras.layers.Dense(1)])
    model.compile(loss="mse", optimizer="sgd", metrics=["mse"])
    x, y = np.random.random((10, 3)), np.random.random((10, 1))

    def callback():
        return CloudCheckpoint(str(tmp / "ckpt" / "m.weights.h5"), save_weights_only=True, save_freq=save_freq,
                               remote=str(tmp / "store"), preemption=None)

    cb = callback()
    with pytest.raises(RuntimeError, match="Interruption"):
        model.fit(x, y, batch_size=4, epochs=first_epochs, verbose=0, callbacks=[cb, interrupt])
    if not reuse:
        if cb.writer is not None:  # async_save: the save points still being written first
            cb.writer.close()
        cb.uploader.close()  # a new callback resumes from what is committed: let the last upload finish
        cb = callback()
    history = model.fit(x, y, batch_size=4, epochs=5, verbose=0, callbacks=[cb])
    return model, cb, history


@pytest.mark.parametrize("save_freq, interrupt, first_epochs", [
    (1, Interrupt(steps=2), 2),  # mid-epoch: 2 batches of epoch 1 done and committed
    ("epoch", Interrupt(epochs=2), 6),  # after epoch 2
], ids=["save_freq=1", "epoch"])
def test_the_same_callback_fit_again_resumes_like_a_new_one(tmp_path, save_freq, interrupt, first_epochs):
    model, cb, history = interrupted_then_fit_again(tmp_path / "reused", save_freq, interrupt, first_epochs, True)
    interrupt.batch_count = interrupt.epoch_count = 0
    fresh_model, fresh, _ = interrupted_then_fit_again(tmp_path / "new", save_freq, interrupt, first_epochs, False)
    position = lambda ckpt_id: ckpt_id.rsplit("-", 1)[0]  # noqa: E731  (epoch and step; the suffix is random)
    assert cb.resumed_from is not None and fresh.resumed_from is not None
    assert position(cb.resumed_from) == position(fresh.resumed_from)
    assert cb.batches_skipped == fresh.batches_skipped
    assert history.epoch[-1] == 4
    counter = int(np.asarray(model.layers[0].counter.numpy()))
    assert counter == 5 * BATCHES_PER_EPOCH, "every batch of the 5 epochs computed once, none twice"
    for a, b in zip(model.get_weights(), fresh_model.get_weights()):
        assert a.tobytes() == b.tobytes(), "the reused callback resumed exactly as a new one"


def test_a_fit_after_a_finished_fit_trains_on_from_the_model(tmp_path):
    """After a fit that ended normally, the same callback does not resume: the next fit trains its epochs from the
    model as it is (like ModelCheckpoint, and BackupAndRestore, which deletes its backup at the end of training)."""
    deterministic(11)
    model = keras.Sequential([keras.Input((3,)), Canary(), keras.layers.Dense(1)])
    model.compile(loss="mse", optimizer="sgd")
    x, y = np.random.random((10, 3)), np.random.random((10, 1))
    cb = CloudCheckpoint(str(tmp_path / "m.weights.h5"), save_weights_only=True, remote=str(tmp_path / "s"),
                         preemption=None)
    model.fit(x, y, batch_size=4, epochs=2, verbose=0, callbacks=[cb])
    model.fit(x, y, batch_size=4, epochs=2, verbose=0, callbacks=[cb])
    assert cb.resumed_from is None
    assert int(np.asarray(model.layers[0].counter.numpy())) == 4 * BATCHES_PER_EPOCH
