"""Seed example 2, adapted: save the full model every epoch, named by epoch and validation accuracy.

The Keras tutorial's code with ``keras.callbacks.ModelCheckpoint(`` replaced by ``CloudCheckpoint(`` plus
``remote=...``. Keras still writes ``model-01-0.91.keras``, ``model-02-0.94.keras``, ... locally; each is also
committed to the store, whose retention keeps the best (by ``val_accuracy``) and the last two.

    python examples/02_every_epoch_full_model.py [--remote gs://bucket/runs/example2] [--dir ckpt2]
"""

import argparse
import glob
import os

import keras
from _digits import digits, get_model

from cloudckpt.keras import CloudCheckpoint

parser = argparse.ArgumentParser()
parser.add_argument("--remote", default=os.environ.get("CLOUDCKPT_REMOTE"))
parser.add_argument("--dir", default="/tmp/ckpt2")
parser.add_argument("--epochs", type=int, default=5)
args = parser.parse_args()

(x_train, y_train), (x_test, y_test) = digits()
model = get_model()

checkpoint_filepath = os.path.join(args.dir, "model-{epoch:02d}-{val_accuracy:.2f}.keras")
model_checkpoint_callback = CloudCheckpoint(
    filepath=checkpoint_filepath,
    monitor="val_accuracy",
    mode="max",
    save_best_only=False,
    remote=args.remote,
)

# The full model is saved at the end of every epoch.
model.fit(x_train, y_train, epochs=args.epochs, validation_split=0.2, callbacks=[model_checkpoint_callback])

saved = sorted(glob.glob(os.path.join(args.dir, "model-*.keras")))
print("saved:", ", ".join(os.path.basename(p) for p in saved))
restored = keras.models.load_model(saved[-1])
loss, accuracy = restored.evaluate(x_test, y_test, verbose=0)
print(f"{os.path.basename(saved[-1])}: test accuracy {accuracy:.4f}")
