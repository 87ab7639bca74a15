"""Training that survives preemption: the same command for the first run and every restart.

Run it, stop it with SIGTERM (``kill <pid>``, what Kubernetes or a spot VM's shutdown sends) or even SIGKILL, and
run it again: it resumes where it stopped — mid-epoch, with the optimizer state and the best value — and ends with
the same weights as a run that was never interrupted. After SIGTERM it exits with status 143 once the checkpoint is
committed.

    python examples/preemptible_training.py [--remote s3://bucket/runs/digits] [--dir ckpt] [--epochs 8]
"""

import argparse
import logging
import os

import keras
import tensorflow as tf
from _digits import digits, get_model

from cloudckpt.keras import CloudCheckpoint


class Progress(keras.callbacks.Callback):
    """One line every ``every`` trained steps (a resumed run skips, without training, the batches already done)."""

    def __init__(self, every=10):
        super().__init__()
        self.every = every

    def on_train_batch_end(self, batch, logs=None):
        step = int(self.model.optimizer.iterations.numpy())
        if step % self.every == 0 and step != getattr(self, "_last", None):
            self._last = step
            print(f"  step {step} (epoch {self.epoch + 1}, batch {batch + 1}): loss {logs['loss']:.4f}", flush=True)

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--remote", default=os.environ.get("CLOUDCKPT_REMOTE"))
    parser.add_argument("--dir", default="ckpt")
    parser.add_argument("--epochs", type=int, default=8)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="  cloudckpt: %(message)s")
    logging.getLogger("cloudckpt.restore").setLevel(logging.WARNING)

    keras.utils.set_random_seed(42)  # with deterministic ops, a resumed run ends bit-identical to an uninterrupted one
    tf.config.experimental.enable_op_determinism()
    (x_train, y_train), _ = digits()
    model = get_model()
    checkpoint = CloudCheckpoint(os.path.join(args.dir, "digits.keras"), monitor="val_accuracy", mode="max",
                                 save_best_only=True, remote=args.remote)
    model.fit(x_train, y_train, batch_size=32, epochs=args.epochs, validation_split=0.2, verbose=2,
              callbacks=[Progress(), checkpoint])
    print(f"training finished: {int(model.optimizer.iterations.numpy())} steps, best val_accuracy "
          f"{checkpoint.best:.4f}, store {checkpoint.remote}", flush=True)


if __name__ == "__main__":
    main()
