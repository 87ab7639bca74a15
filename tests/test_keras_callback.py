"""CloudCheckpoint in-process: drop-in parity with keras.callbacks.ModelCheckpoint (validation, file names, save
decisions, local files), commits to local/S3/GCS stores, complete resume state, best value across restarts, and
failures that must not pass silently."""

from __future__ import annotations

import os

import pytest

keras = pytest.importorskip("keras")
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from support.keras_job import build_model, data  # noqa: E402

from cloudckpt.errors import CommitFailedError, StaleWriterError  # noqa: E402
from cloudckpt.keras import CloudCheckpoint  # noqa: E402
from cloudckpt.keras import resume as rs  # noqa: E402
from cloudckpt.keras import state as st  # noqa: E402
from cloudckpt.store import CheckpointStore  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Skipping variable loading for optimizer")

X, Y = data()
X, Y = X[:640], Y[:640]  # 8 training batches of 64 + 2 validation batches per epoch


def fit(callbacks, epochs=3, seed=3, model=None):
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()
    model = model or build_model()
    model.fit(X, Y, batch_size=64, epochs=epochs, validation_split=0.2, shuffle=False, verbose=0, callbacks=callbacks)
    return model


@pytest.mark.parametrize("kwargs", [
    dict(filepath="x.weights.h5", save_freq="batch"),
    dict(filepath="x.h5", save_weights_only=True),
    dict(filepath="x.keras", save_weights_only=True),
    dict(filepath="x.ckpt"),
    dict(filepath="x.weights"),
])
def test_argument_validation_matches_model_checkpoint(kwargs):
    with pytest.raises(ValueError) as theirs:
        keras.callbacks.ModelCheckpoint(**kwargs)
    with pytest.raises(ValueError) as ours:
        CloudCheckpoint(**kwargs, remote="unused")
    assert str(ours.value) == str(theirs.value)


@pytest.mark.parametrize("bad", [dict(keep_best=-1), dict(keep_last=1.5), dict(keep_every_n_epochs=0),
                                 dict(preemption_deadline=0)])
def test_own_arguments_are_validated(bad):
    with pytest.raises(ValueError, match="Received: " + next(iter(bad))):
        CloudCheckpoint("x.keras", remote="unused", **bad)


@pytest.mark.parametrize("pattern,kwargs", [
    ("e{epoch:02d}.weights.h5", dict(save_weights_only=True)),
    ("m-{epoch:02d}-{val_loss:.3f}.keras", dict()),
    ("b{epoch}-{batch}.weights.h5", dict(save_weights_only=True, save_freq=3)),
    ("best.keras", dict(monitor="val_accuracy", mode="max", save_best_only=True, verbose=1)),
    ("best.weights.h5", dict(monitor="val_loss", save_best_only=True, save_weights_only=True, verbose=1)),
])
def test_same_files_and_decisions_as_model_checkpoint(tmp_path, capsys, pattern, kwargs):
    keras_dir, ours_dir = tmp_path / "keras", tmp_path / "ours"
    fit([keras.callbacks.ModelCheckpoint(str(keras_dir / pattern), **kwargs)])
    theirs_out = capsys.readouterr().out.replace(str(keras_dir), "DIR")
    cb = CloudCheckpoint(str(ours_dir / pattern), remote=str(tmp_path / "store"), **kwargs)
    fit([cb])
    ours_out = capsys.readouterr().out.replace(str(ours_dir), "DIR")
    assert sorted(os.listdir(ours_dir)) == sorted(os.listdir(keras_dir)), "same local files, nothing else"
    assert ours_out == theirs_out, "same verbose messages, so the same save decisions"
    for name in os.listdir(keras_dir):  # same content: both loaded back give the same weights
        a, b = build_model(), build_model()
        a.load_weights(keras_dir / name)
        b.load_weights(ours_dir / name)
        for wa, wb in zip(a.get_weights(), b.get_weights()):
            np.testing.assert_array_equal(wa, wb)
    store = CheckpointStore(str(tmp_path / "store"))
    assert store.latest().step == 3 * 8, "the last commit is the final state, at the final global step"
    store.close()


def test_commits_to_each_store_with_complete_resume_state(store_url, tmp_path):
    path = tmp_path / "ckpt" / "checkpoint.model.weights.h5"
    cb = CloudCheckpoint(str(path), save_weights_only=True, save_best_only=True, monitor="val_loss", remote=store_url,
                         keep_best=1, keep_last=2)
    model = fit([cb], epochs=3)
    assert os.listdir(path.parent) == [path.name], "staging lives outside the checkpoint folder"
    with CheckpointStore(store_url) as store:
        index = store.index()
        assert index.run.monitor == "val_loss" and index.run.mode == "min"
        latest = store.latest()
        assert latest.step == int(model.optimizer.iterations.numpy()) == 24
        best = store.best()
        assert best.meta["kind"] == "model" and best.meta["file"] == path.name
        assert best.metrics["val_loss"] == pytest.approx(cb.best)
        pulled = store.pull("best", to=tmp_path / "pulled")
        assert (pulled.path / path.name).read_bytes() == path.read_bytes()
        state, arrays = st.read_state(pulled.path)
        names = [p for p, _ in state.layout["optimizer"]]
        assert any("iteration" in n for n in names) and any("momentum" in n for n in names), \
            "optimizer state is in the checkpoint even with save_weights_only"
        assert len(store.list()) <= 3  # keep_best=1 + keep_last=2 (overlapping)


class SavesOneVariableLess(keras.layers.Dense):
    """A layer with its own ``save_own_variables``: its file no longer holds exactly the model's weights."""

    def save_own_variables(self, store):
        store["0"] = self.kernel


def _model_with(layer_cls):
    model = keras.Sequential([keras.Input((64,)), layer_cls(32, activation="relu"), keras.layers.Dropout(0.2),
                              keras.layers.Dense(10)])
    model.compile(optimizer=keras.optimizers.Adam(1e-2),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    return model


@pytest.mark.filterwarnings("ignore:You are saving your model as an HDF5 file")
@pytest.mark.parametrize("name, weights_only, layer_cls, from_file", [
    ("m.weights.h5", True, keras.layers.Dense, True),  # Keras 3 weights file: model + optimizer inside
    ("m.keras", False, keras.layers.Dense, True),  # .keras zip: the same weights store inside
    ("m.h5", False, keras.layers.Dense, False),  # legacy HDF5 full model: everything captured
    ("m.weights.h5", True, SavesOneVariableLess, False),  # the file misses a weight: everything captured
])
def test_resume_state_reuses_the_keras_file_only_when_it_holds_the_variables(tmp_path, name, weights_only,
                                                                             layer_cls, from_file):
    remote = str(tmp_path / "store")

    def run(epochs, seed):
        keras.utils.set_random_seed(seed)
        model = _model_with(layer_cls)
        cb = CloudCheckpoint(str(tmp_path / "ckpt" / name), save_weights_only=weights_only, remote=remote)
        model.fit(X, Y, batch_size=64, epochs=epochs, validation_split=0.2, shuffle=False, verbose=0, callbacks=[cb])
        return model, cb

    tf.config.experimental.enable_op_determinism()
    run(2, seed=3)
    with CheckpointStore(remote) as store:
        models = [c for c in store.list() if c.meta["kind"] == "model"]
        assert models, "Keras wrote a file at every epoch"
        state, arrays = st.read_state(store.pull(models[-1].id, to=tmp_path / "pulled").path)
    n_model, n_opt = len(state.layout["model"]), len(state.layout["optimizer"])
    in_npz = {k for k in arrays if not k.startswith(("metrics_", "rng_"))}  # rng_: host generators, not variables
    if from_file:
        assert state.weights_file == name and state.covered is not None
        assert len(state.covered["optimizer"]) == n_opt and len(state.covered["model"]) == n_model - 1
        assert in_npz == {f"model_{i}" for i in range(n_model) if i not in state.covered["model"]}, \
            "only what the Keras file lacks (the dropout seed state) is stored a second time"
    else:
        assert state.weights_file is None and state.covered is None
        assert len(in_npz) == n_model + n_opt, "everything is captured when the file can't stand in"
    resumed, cb = run(3, seed=99)  # another seed: every variable must come from the checkpoint
    assert cb.resumed_from is not None
    keras.utils.set_random_seed(3)
    straight = _model_with(layer_cls)
    straight.fit(X, Y, batch_size=64, epochs=3, validation_split=0.2, shuffle=False, verbose=0)
    for a, b in zip(straight.variables + straight.optimizer.variables,
                    resumed.variables + resumed.optimizer.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)


def test_a_format_1_checkpoint_with_every_variable_in_the_npz_still_restores(tmp_path):
    model = fit([], epochs=1)
    plan = rs.StatePlan(model)
    st.write_state(tmp_path, plan.capture(), st.ResumeState(epoch=0, epoch_done=True, initial_epoch=1, global_step=8,
                                                            layout=plan.layout))
    path = tmp_path / st.STATE_DIR / st.STATE_JSON
    path.write_text(path.read_text().replace('"format": 2', '"format": 1'))
    state, arrays = st.read_state(tmp_path)
    other = fit([], epochs=1, seed=7)
    rs.restore_variables(other, state, arrays)
    for a, b in zip(model.variables + model.optimizer.variables, other.variables + other.optimizer.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_default_remote_is_a_local_store_beside_the_files(tmp_path, monkeypatch):
    monkeypatch.delenv("CLOUDCKPT_REMOTE", raising=False)
    path = tmp_path / "ckpt" / "m.keras"
    cb = CloudCheckpoint(str(path))
    assert cb.remote == str(tmp_path / "ckpt" / ".cloudckpt-store")
    fit([cb], epochs=1)
    assert sorted(os.listdir(tmp_path / "ckpt")) == [".cloudckpt-store", "m.keras"]
    with CheckpointStore(cb.remote) as store:
        assert store.latest().epoch == 1


def test_best_value_survives_a_restart(tmp_path, capsys):
    remote, path = str(tmp_path / "store"), tmp_path / "ckpt" / "best.weights.h5"
    first = CloudCheckpoint(str(path), save_weights_only=True, save_best_only=True, remote=remote, verbose=1)
    fit([first], epochs=2)
    best = float(first.best)
    path.unlink()  # a new machine: the local file is gone
    capsys.readouterr()
    second = CloudCheckpoint(str(path), save_weights_only=True, save_best_only=True, remote=remote, verbose=1)
    fit([second], epochs=3, seed=99)  # another seed: the weights must come from the checkpoint
    out = capsys.readouterr().out
    assert second.resumed_from is not None
    assert "Epoch 3:" in out and "Epoch 1:" not in out and "Epoch 2:" not in out
    assert f"from {best:.5f}" in out, "the first epoch after the restart compares with the saved best, not None"
    assert path.exists(), "the best file is restored locally from the store"


def test_final_state_that_cannot_be_committed_raises(s3_url, tmp_path):
    import boto3

    bucket = s3_url.split("/")[2]
    cb = CloudCheckpoint(str(tmp_path / "ckpt" / "m.weights.h5"), save_weights_only=True, remote=s3_url,
                         store_budget=5)

    class DropBucket(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 1:
                assert cb.flush(60)
                s3 = boto3.resource("s3")
                s3.Bucket(bucket).objects.all().delete()
                s3.Bucket(bucket).delete()

    with pytest.raises(CommitFailedError, match=r"not committed to .*: epoch 2 step \d+"):
        fit([DropBucket(), cb], epochs=2)


def test_a_newer_writer_stops_training(tmp_path):
    remote = str(tmp_path / "store")
    cb = CloudCheckpoint(str(tmp_path / "ckpt" / "m.weights.h5"), save_weights_only=True, remote=remote)

    class Takeover(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 0:
                cb.flush(60)
                with CheckpointStore(remote) as other:
                    other.claim()

    with pytest.raises(StaleWriterError):
        fit([cb, Takeover()], epochs=4)


def test_captured_state_is_a_snapshot_unchanged_by_later_training():
    model = fit([], epochs=1)
    plan = rs.StatePlan(model)
    arrays, layout = plan.capture(), plan.layout
    frozen = {k: v.copy() for k, v in arrays.items()}
    fit([], epochs=1, model=model)  # the uploader writes `arrays` later, while training goes on
    assert all(np.array_equal(arrays[k], frozen[k]) for k in arrays)
    assert any(not np.array_equal(arrays[f"model_{i}"], w) for i, w in enumerate(model.get_weights()))
    assert len(layout["optimizer"]) > 2 and layout["metrics"]


def test_a_second_fit_in_the_same_process_trains_on_like_model_checkpoint(tmp_path):
    cb = CloudCheckpoint(str(tmp_path / "ckpt" / "m.weights.h5"), save_weights_only=True, remote=str(tmp_path / "s"))
    model = fit([cb], epochs=2)
    model.fit(X, Y, batch_size=64, epochs=2, validation_split=0.2, verbose=0, callbacks=[cb])
    assert int(model.optimizer.iterations.numpy()) == 4 * 8, "no resume inside one process: fit() trains its epochs"
    with CheckpointStore(str(tmp_path / "s")) as store:
        assert store.latest().step == 32


def test_prune_local_applies_retention_to_local_files(tmp_path):
    ckpt = tmp_path / "ckpt"
    cb = CloudCheckpoint(str(ckpt / "e{epoch:02d}.weights.h5"), save_weights_only=True, remote=str(tmp_path / "s"),
                         keep_best=None, keep_last=2, prune_local=True)
    fit([cb], epochs=4)
    with CheckpointStore(str(tmp_path / "s")) as store:
        listed = [c.meta["file"] for c in store.list()]
    # keep_last=2 keeps the last two committed; an upload that fell behind may have been superseded (e03 never
    # committed when e04 was queued behind it), so which two depends on the machine's speed: the local files follow
    assert len(listed) == 2 and listed[-1] == "e04.weights.h5"
    assert sorted(os.listdir(ckpt)) == listed
    kept = CloudCheckpoint(str(tmp_path / "k" / "e{epoch:02d}.weights.h5"), save_weights_only=True,
                           remote=str(tmp_path / "s2"), keep_best=None, keep_last=2)
    fit([kept], epochs=4)
    assert len(os.listdir(tmp_path / "k")) == 4, "by default every local file stays, as with ModelCheckpoint"


def test_in_process_crash_and_resume_with_steps_per_execution(tmp_path):
    """A crash (an exception out of fit) mid-epoch, then a fresh model and callback resume: with
    steps_per_execution=2 and shuffle=True the final weights equal an uninterrupted run's, bit for bit."""

    def model():
        m = build_model()
        m.compile(optimizer=keras.optimizers.Adam(1e-2), steps_per_execution=2,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
        return m

    def train(callbacks):
        keras.utils.set_random_seed(5)
        tf.config.experimental.enable_op_determinism()
        m = model()
        m.fit(X, Y, batch_size=64, epochs=3, validation_split=0.2, shuffle=True, verbose=0, callbacks=callbacks)
        return m

    expected = train([]).get_weights()
    remote, path = str(tmp_path / "s"), str(tmp_path / "ckpt" / "m.weights.h5")
    first = CloudCheckpoint(path, save_weights_only=True, save_freq=4, remote=remote)

    class Crash(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if int(self.model.optimizer.iterations.numpy()) == 14:  # epoch 2, batch 6; committed at step 12
                first.flush(60)
                raise RuntimeError("crash")

    with pytest.raises(RuntimeError, match="crash"):
        train([first, Crash()])
    first._watch.stop()
    second = CloudCheckpoint(path, save_weights_only=True, save_freq=4, remote=remote)
    got = train([second]).get_weights()
    assert second.batches_skipped == 4  # 12 - 8: four batches into epoch 2, skipped two per call
    for a, b in zip(got, expected):
        assert a.tobytes() == b.tobytes()


def test_mode_max_is_recorded_as_max_and_best_is_the_highest(tmp_path):
    """On every admitted Keras (3.10 sets np.greater, later ones ops.greater) a `mode="max"` run is ranked as max,
    so `pull best` returns the highest val_accuracy, not the lowest."""
    remote = str(tmp_path / "store")
    cb = CloudCheckpoint(str(tmp_path / "ckpt" / "m-{epoch}.weights.h5"), monitor="val_accuracy", mode="max",
                         save_weights_only=True, remote=remote, keep_best=1, keep_last=5)
    fit([cb], epochs=3)
    with CheckpointStore(remote) as store:
        index = store.index()
        assert index.run.monitor == "val_accuracy" and index.run.mode == "max"
        scored = [c for c in index.checkpoints if "val_accuracy" in c.metrics]
        assert len(scored) == 3
        assert store.best().metrics["val_accuracy"] == max(c.metrics["val_accuracy"] for c in scored)


def test_a_new_runs_first_log_line_says_it_has_no_checkpoint(tmp_path, caplog):
    """The callback's claim writes an index with no checkpoint: that is a new run, not a store of foreign
    checkpoints."""
    import logging

    src = tmp_path / "src"
    src.mkdir()
    (src / "model.pt").write_bytes(b"torch")
    with CheckpointStore(str(tmp_path / "store")) as store, caplog.at_level(logging.INFO, logger="cloudckpt"):
        store.claim()
        assert rs.pull_resumable(store, tmp_path / "resume") is None
        assert [r.getMessage() for r in caplog.records if r.name == "cloudckpt.keras.resume"] == [
            f"no checkpoint in {store.url} yet: starting from scratch"]
        caplog.clear()
        store.push(src, epoch=1)  # another writer's checkpoint, without resume state
        assert rs.pull_resumable(store, tmp_path / "resume") is None
        (record,) = [r for r in caplog.records if r.name == "cloudckpt.keras.resume"]
        assert record.levelno == logging.WARNING and "none written by CloudCheckpoint" in record.getMessage()
