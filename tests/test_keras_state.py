"""The resume state's format (cloudckpt/keras/state.py) without training: what the callback writes reads back the
same, and whatever a bucket holds instead reads back as an IntegrityError, never a KeyError or TypeError."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

pytest.importorskip("keras")
from cloudckpt.errors import IntegrityError  # noqa: E402
from cloudckpt.keras import state as st  # noqa: E402

LAYOUT = {"model": [("dense/kernel", [2, 3]), ("seed_generator/state", [2])],
          "optimizer": [("adam/iteration", [])], "metrics": [("loss/total", [])]}


def _arrays() -> dict[str, np.ndarray]:
    return {"model_0": np.ones((2, 3), np.float32), "model_1": np.array([1, 2], np.uint32),
            "optimizer_0": np.array(7, np.int64), "metrics_0": np.array(0.5, np.float32)}


def _state(**changes: object) -> st.ResumeState:
    fields: dict = dict(epoch=1, epoch_done=False, batches_done=3, initial_epoch=1, global_step=11,
                        logs={"loss": 0.25}, best=math.inf, best_seen=None, batches_seen_since_last_saving=2,
                        last_batch_seen=2, user_file=None, keras_version="3.15.1", layout=LAYOUT)
    return st.ResumeState(**{**fields, **changes})


def test_what_the_callback_writes_reads_back_the_same(tmp_path):
    state = _state()
    st.write_state(tmp_path, _arrays(), state)
    doc = json.loads((tmp_path / st.STATE_DIR / st.STATE_JSON).read_text())
    assert doc["format"] == st.FORMAT and doc["best"] == math.inf, "an infinite best stays a float (Infinity)"
    read, arrays = st.read_state(tmp_path)
    assert read == state and read.batches_to_skip == 3
    assert sorted(arrays) == sorted(_arrays())


def _write_raw(tmp_path, doc: dict, arrays: dict) -> None:
    st.write_state(tmp_path, arrays, _state())
    (tmp_path / st.STATE_DIR / st.STATE_JSON).write_text(json.dumps(doc))


def _doc(**changes: object) -> dict:
    return {**_state().model_dump(), **changes}


@pytest.mark.parametrize("doc, arrays, says", [
    (_doc(), {**_arrays(), "model_0": np.full((2, 3), "x")}, "not numbers"),
    (_doc(), {**_arrays(), "model_0": np.ones((3, 2), np.float32)}, "its layout says"),
    (_doc(), {k: v for k, v in _arrays().items() if k != "optimizer_0"}, "lacks optimizer variable"),
    (_doc(covered={"model": [0]}), _arrays(), "without a weights_file"),
    (_doc(weights_file="m.weights.h5", covered={"model": [5]}), _arrays(), "beyond its layout"),
    (_doc(layout={"model": [["k", [-1]]], "optimizer": [], "metrics": []}), _arrays(), "layout"),
    (_doc(logs=[1, 2]), _arrays(), "logs"),
    (_doc(epoch_done=False, batches_done=None), _arrays(), "without batches_done"),
    (["not", "an", "object"], _arrays(), "format"),
])
def test_a_malformed_state_is_an_integrity_error(tmp_path, doc, arrays, says):
    _write_raw(tmp_path, doc, arrays)
    with pytest.raises(IntegrityError, match=says):
        st.read_state(tmp_path)


def test_a_weights_file_the_checkpoint_lacks_is_an_integrity_error(tmp_path):
    _write_raw(tmp_path, _doc(weights_file="m.weights.h5", covered={"model": [0]}), _arrays())
    with pytest.raises(IntegrityError, match="not in the checkpoint"):
        st.read_state(tmp_path, files=["cloudckpt_state/state.json"])


def test_checkpoint_meta_round_trips_as_strings_and_rejects_what_the_callback_never_writes():
    meta = st.CheckpointMeta(kind="model", batch=3, epoch_done=False, file="m.keras", local_file="run/m.keras")
    assert meta.to_meta() == {"kind": "model", "batch": "3", "epoch_done": "false", "file": "m.keras",
                              "local_file": "run/m.keras"}
    assert st.CheckpointMeta.of({**meta.to_meta(), "added_later": "x"}) == meta
    for bad in ({"file": "../../etc/passwd"}, {"local_file": "/abs.keras"}, {"batch": "-1"}, {"kind": "weights"},
                {"epoch_done": "perhaps"}):
        with pytest.raises(IntegrityError):
            st.CheckpointMeta.of(bad)
