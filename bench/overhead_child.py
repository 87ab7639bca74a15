"""One fit of measurement 2: ``python -m bench.overhead_child VARIANT WORKDIR MB EPOCHS THREADS REPEAT
[URL]``.

Trains the digits MLP (scikit-learn digits xREPEAT, batch 32) for EPOCHS epochs with no checkpoint, Keras'
``ModelCheckpoint`` (local) or ``CloudCheckpoint`` (URL) saving every epoch, TensorFlow limited to THREADS intra- and
inter-op threads (0: TensorFlow's default), and prints one JSON line: the wall and CPU (this process, all threads)
seconds of every epoch, each stamped after every callback's ``on_epoch_end``, and that CPU split by thread: the
Python main thread (Keras' loop and the callbacks' hooks), cloudckpt's threads (``cloudckpt-*``: writer, uploader,
checksum pool) and the rest (TensorFlow's own threads, anything else). The split is CPU time, so a stop of the
whole process (the virtual machine descheduling it) does not show in it. A fresh process per fit, so no fit
inherits another's threads, memory or page cache state from this process.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def main() -> None:
    variant, workdir, mb, epochs, threads = sys.argv[1], Path(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), \
        int(sys.argv[5])
    repeat = int(sys.argv[6])
    url = sys.argv[7] if len(sys.argv) > 7 else None
    import tensorflow as tf

    if threads:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    import keras

    from bench.epoch_overhead import EpochClock
    from bench.model import build_model, digits

    model = build_model(mb)
    x, y = digits(repeat)
    path = str(workdir / "model.weights.h5")
    common = dict(save_weights_only=True, monitor="loss", save_freq="epoch")
    callbacks = []
    if variant == "keras":
        callbacks.append(keras.callbacks.ModelCheckpoint(path, **common))
    elif variant == "cloud":
        from cloudckpt.keras import CloudCheckpoint

        callbacks.append(CloudCheckpoint(path, remote=url, keep_last=1, resume=False, **common))
    clock = EpochClock()
    model.fit(x, y, batch_size=32, epochs=epochs, verbose=0, callbacks=callbacks + [clock], shuffle=True)
    wall = [b - a for a, b in zip(clock.stamps, clock.stamps[1:])]
    cpu = [b - a for a, b in zip(clock.cpu, clock.cpu[1:])]
    split = {k: [round(b.get(k, 0.0) - a.get(k, 0.0), 4) for a, b in zip(clock.threads, clock.threads[1:])]
             for k in ("main", "cloudckpt", "other")}
    steal = [round(b - a, 2) for a, b in zip(clock.steal, clock.steal[1:])]
    print(json.dumps({"wall": wall, "cpu": cpu, "threads": split, "steal": steal, "samples": len(x)}), flush=True)


if __name__ == "__main__":
    main()
