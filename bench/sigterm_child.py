"""The training process of measurement 6: ``python -m bench.sigterm_child URL WORKDIR MB`` (from the repo root).

Trains a ~MB model with CloudCheckpoint (every epoch) to URL. Once its first checkpoint is committed, it prints
``READY <step>`` from the middle of the next epoch and keeps training (each batch slowed a little so that the
signal lands mid-epoch); the parent then sends SIGTERM and times the preemption checkpoint.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main() -> None:
    url, workdir, mb = sys.argv[1], Path(sys.argv[2]), float(sys.argv[3])
    import keras

    from bench.model import build_model, digits
    from cloudckpt import CheckpointStore
    from cloudckpt.keras import CloudCheckpoint

    model = build_model(mb)
    x, y = digits()
    x, y = x[:32 * 40], y[:32 * 40]
    store = CheckpointStore(url)
    ckpt = CloudCheckpoint(str(workdir / "ckpt" / "model.weights.h5"), save_weights_only=True, monitor="loss",
                           remote=url, resume=False, preemption=["sigterm"])

    class Announce(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.step = 0
            self.ready = False

        def on_train_batch_end(self, batch, logs=None):
            self.step += 1
            if not self.ready and batch == 10:
                try:
                    listed = store.list()
                except Exception:
                    listed = []
                if listed:
                    self.ready = True
                    print(f"READY {self.step}", flush=True)
            time.sleep(0.05)

    model.fit(x, y, batch_size=32, epochs=1000, verbose=0, callbacks=[ckpt, Announce()], shuffle=False)


if __name__ == "__main__":
    main()
