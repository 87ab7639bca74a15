"""Seed example 1, adapted: keep the best weights by validation loss — now also in a store, resumable.

The Keras tutorial's code with one change: ``keras.callbacks.ModelCheckpoint(`` became ``CloudCheckpoint(`` plus
``remote=...`` (here ``$CLOUDCKPT_REMOTE`` or, when unset, the local store ``/tmp/ckpt/.cloudckpt-store``-style
default beside the checkpoint file). Run it twice: the second run finds the finished run and trains nothing more.

    python examples/01_best_weights.py [--remote s3://bucket/runs/example1] [--dir /tmp/ckpt]
"""

import argparse
import os

from _digits import digits, get_model

from cloudckpt.keras import CloudCheckpoint

parser = argparse.ArgumentParser()
parser.add_argument("--remote", default=os.environ.get("CLOUDCKPT_REMOTE"))
parser.add_argument("--dir", default="/tmp/ckpt")
parser.add_argument("--epochs", type=int, default=10)
args = parser.parse_args()

(x_train, y_train), (x_test, y_test) = digits()
model = get_model()

checkpoint_filepath = os.path.join(args.dir, "checkpoint.model.weights.h5")
model_checkpoint_callback = CloudCheckpoint(
    filepath=checkpoint_filepath,
    monitor="val_loss",
    mode="min",
    save_weights_only=True,
    save_best_only=True,
    remote=args.remote,
)

# Model weights are saved at the end of every epoch, if it's the best seen so far.
model.fit(x_train, y_train, epochs=args.epochs, validation_split=0.2, callbacks=[model_checkpoint_callback])

# The model weights (that are considered the best) are loaded into the model.
model.load_weights(checkpoint_filepath)
loss, accuracy = model.evaluate(x_test, y_test, verbose=0)
print(f"best weights from {checkpoint_filepath}: test loss {loss:.4f}, test accuracy {accuracy:.4f}")
print(f"store: {model_checkpoint_callback.remote}")
