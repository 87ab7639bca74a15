"""One worker of a two-worker MultiWorkerMirroredStrategy training on digits, with CloudCheckpoint; run by
tests/test_keras_multiworker.py as a real process per worker on 127.0.0.1.

Keras 3.15 / TensorFlow 2.21 cannot run ``model.fit`` under a multi-worker MultiWorkerMirroredStrategy at all
(keras-team/keras#20585, tensorflow/tensorflow#72388): ``_maybe_symbolic_build`` hands a tuple of PerReplica values
to ``strategy.reduce``, which the collective strategy cannot convert (``ValueError: Attempt to convert a value
(PerReplica:{...}) with an unsupported type``); past that, ``reduce_per_replica`` reduces scalar logs with ``axis=0``
(``Invalid reduction dimension 0 for input with 0 dimensions``). :func:`shim_keras_multi_worker` replaces those two
functions of Keras' TensorFlow trainer in this process only, so the test can exercise real multi-worker training.
It is a test shim for an upstream bug, not part of cloudckpt.

Prints ``HANG <epoch>`` (and, on the chief, after its commit) when ``--hang-after-epoch`` is reached, then waits to be
killed; at the end prints ``RESULT {json}``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import threading

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ["CUDA_VISIBLE_DEVICES"] = ""


def shim_keras_multi_worker() -> None:
    """Work around keras-team/keras#20585 in this process (see the module docstring)."""
    import tensorflow as tf
    from keras.src import tree
    from keras.src.backend.tensorflow import trainer as tt

    build = tt.TensorFlowTrainer._maybe_symbolic_build

    def maybe_symbolic_build(self, iterator=None, data_batch=None):
        if iterator is not None and self._distribute_strategy is not None:
            for _, _, it in iterator:  # one local batch is enough to build the model symbolically
                data_batch = tree.map_structure(
                    lambda v: self.distribute_strategy.experimental_local_results(v)[0]
                    if isinstance(v, tf.distribute.DistributedValues) else v, next(it))
                break
        return build(self, data_batch=data_batch)

    reduce_per_replica = tt.reduce_per_replica

    def reduce_scalars_too(values, strategy, reduction):
        if reduction in ("auto", "mean") and tt._collective_all_reduce_multi_worker(strategy):
            return tree.map_structure(lambda v: strategy.reduce("MEAN", v, axis=None), values)
        return reduce_per_replica(values, strategy, reduction)

    tt.TensorFlowTrainer._maybe_symbolic_build = maybe_symbolic_build
    tt.reduce_per_replica = reduce_scalars_too


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--index", type=int, required=True)
    p.add_argument("--ports", required=True, help="comma-separated worker ports on 127.0.0.1")
    p.add_argument("--remote", required=True)
    p.add_argument("--dir", required=True, help="this worker's checkpoint folder")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--hang-after-epoch", type=int)
    p.add_argument("--no-shim", action="store_true")
    a = p.parse_args(argv)
    os.environ["TF_CONFIG"] = json.dumps({"cluster": {"worker": [f"127.0.0.1:{port}" for port in a.ports.split(",")]},
                                          "task": {"type": "worker", "index": a.index}})
    logging.basicConfig(level=logging.INFO,
                        format=f"w{a.index} %(relativeCreated)6d %(name)s %(levelname)s %(message)s")

    import keras
    import numpy as np
    import tensorflow as tf
    from sklearn.datasets import load_digits

    from cloudckpt.keras import CloudCheckpoint

    if not a.no_shim:
        shim_keras_multi_worker()
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    keras.utils.set_random_seed(7)
    x, y = load_digits(return_X_y=True)
    x, y = (x[:800] / 16.0).astype("float32"), y[:800].astype("int64")  # 10 steps of 64 per epoch: a quick test
    with strategy.scope():
        model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(32, activation="relu"),
                                  keras.layers.Dense(10)])
        model.compile(optimizer=keras.optimizers.Adam(1e-2),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    ckpt = CloudCheckpoint(os.path.join(a.dir, "model.weights.h5"), save_weights_only=True, remote=a.remote,
                           preemption=None, keep_last=10)

    class Hang(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if a.hang_after_epoch is not None and epoch + 1 == a.hang_after_epoch:
                if ckpt.uploader is not None:
                    ckpt.flush(60)
                print(f"HANG {epoch + 1}", flush=True)
                threading.Event().wait()  # until the test SIGKILLs this worker

    history = model.fit(x, y, batch_size=64, epochs=a.epochs, validation_split=0.2, shuffle=False, verbose=0,
                        callbacks=[ckpt, Hang()])
    weights = model.get_weights()
    digest = hashlib.sha256(b"".join(np.ascontiguousarray(w).tobytes() for w in weights)).hexdigest()
    print("RESULT " + json.dumps({
        "index": a.index, "is_chief": ckpt.role.is_chief, "writer_id": ckpt.store.keeper.writer_id,
        "resumed_from": ckpt.resumed_from, "epochs_run": len(history.history.get("loss", [])),
        "weights_sha256": digest, "local_file": os.path.exists(os.path.join(a.dir, "model.weights.h5")),
        "loss": history.history.get("loss", []),
    }), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
