"""A save_best_only run's checkpoints where Keras wrote no file (issue 24 item 1): resume state alone, meta kind
"state", with every metric the epoch logged (the monitored one was stripped), never the run's best; the CLI pulls
the newest with a model by `latest-model`."""

from __future__ import annotations

import json

import pytest

keras = pytest.importorskip("keras")
from support.keras_job import build_model, data  # noqa: E402
from test_cli import run  # noqa: E402

from cloudckpt.keras import CloudCheckpoint  # noqa: E402
from cloudckpt.store import CheckpointStore  # noqa: E402


def test_state_only_saves_keep_every_metric_and_never_become_best(tmp_path, local_url):
    x, y = data()
    keras.utils.set_random_seed(3)
    model = build_model()
    # mode="max" on a falling val_loss: Keras writes the file at epoch 1 only; later epochs commit resume state
    cb = CloudCheckpoint(str(tmp_path / "ck" / "m.weights.h5"), save_weights_only=True, save_best_only=True,
                         monitor="val_loss", mode="max", remote=local_url, keep_best=None)
    model.fit(x[:640], y[:640], batch_size=64, epochs=3, validation_split=0.2, shuffle=False, verbose=0,
              callbacks=[cb])
    with CheckpointStore(local_url) as store:
        index = store.index()
    kinds = [c.meta.get("kind") for c in index.checkpoints]
    assert kinds[0] == "model" and "state" in kinds[1:], kinds
    for c in index.checkpoints:
        assert {"val_loss", "val_accuracy", "loss", "accuracy"} <= set(c.metrics), (c.meta, c.metrics)
    assert index.get(index.best).meta["kind"] == "model"
    latest = index.get(index.latest)
    proc = run("pull", "latest-model", "-r", local_url, "--to", str(tmp_path / "m"), "--json")
    assert proc.returncode == 0, proc.stderr
    pulled = json.loads(proc.stdout)
    assert pulled["model_file"] == "m.weights.h5" and (tmp_path / "m" / "m.weights.h5").is_file()
    if latest.meta["kind"] == "state":
        assert pulled["id"] != latest.id
