"""Keras' own ModelCheckpoint tests (shipped in the keras wheel) run against CloudCheckpoint: every behaviour they
check — argument validation, file naming with {epoch}/{batch}/metrics, save_best_only decisions, save_freq,
warnings, loading — must hold unchanged. Each callback commits to its own fresh local store."""

from __future__ import annotations

import importlib
import tempfile
import types
import warnings

import pytest

pytest.importorskip("keras")

from cloudckpt.keras import CloudCheckpoint  # noqa: E402

with warnings.catch_warnings():  # its own marker (requires_trainable_backend) is unknown outside Keras' repo
    warnings.simplefilter("ignore")
    keras_tests = importlib.import_module("keras.src.callbacks.model_checkpoint_test")
CREATED: list[CloudCheckpoint] = []
# Keras words one warning with the class's own name ("<Class> mode 'x' is unknown"); the subclass is named like
# Keras' class so that message reads the same. Nothing else differs.
Named = type("ModelCheckpoint", (CloudCheckpoint,), {})


def cloud_checkpoint(*args, **kwargs):
    cb = Named(*args, **kwargs, remote=tempfile.mkdtemp(prefix="cloudckpt-parity-"), resume=False,
                         preemption=None)
    CREATED.append(cb)
    return cb


@pytest.fixture(autouse=True)
def use_cloud_checkpoint(monkeypatch):
    proxy = types.SimpleNamespace(**{n: getattr(keras_tests.callbacks, n) for n in dir(keras_tests.callbacks)
                                     if not n.startswith("__")})
    proxy.ModelCheckpoint = cloud_checkpoint
    monkeypatch.setattr(keras_tests, "callbacks", proxy)
    CREATED.clear()


@pytest.mark.parametrize("name", ["test_model_checkpoint_options", "test_model_checkpoint_loading"])
def test_keras_model_checkpoint_suite(name):
    case = keras_tests.ModelCheckpointTest(name)
    case.setUp()
    try:
        getattr(case, name)()
    finally:
        case.tearDown()
    assert CREATED, "the Keras tests really built CloudCheckpoint callbacks"
    assert any(cb.uploader is not None and cb.uploader.committed for cb in CREATED), "and they committed"
