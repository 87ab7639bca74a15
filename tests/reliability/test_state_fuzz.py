"""Hostile state files (issue 21 item 7): every adapter's state reader, fed mutations of a valid state file
(truncations, byte flips, replaced structures, a pickle that would run code), returns plain data or raises
IntegrityError — never AssertionError, KeyError, OSError... — and no code of the file runs (``weights_only`` holds).
"""

from __future__ import annotations

import io
import json
import math
import pickle
import random
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hst

from cloudckpt.errors import IntegrityError

torch = pytest.importorskip("torch")

from cloudckpt.torch.state import copy_to_cpu, read_state, rng_state, write_state  # noqa: E402

EXAMPLES = 120
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
#: a pickle that, if anything unpickled it without weights_only, would create the file named by MARK
MARK = "cloudckpt-fuzz-ran-code"


def _evil(mark: Path) -> bytes:
    return b"cos\nsystem\n(S'touch " + str(mark).encode() + b"'\ntR."


json_values = hst.recursive(hst.none() | hst.booleans() | hst.integers(-2**70, 2**70)
                            | hst.floats(allow_nan=True, allow_infinity=True) | hst.text(max_size=8),
                            lambda inner: hst.lists(inner, max_size=4) | hst.dictionaries(hst.text(max_size=8), inner,
                                                                                         max_size=4), max_leaves=12)
plain_trees = hst.recursive(hst.none() | hst.booleans() | hst.integers(-2**62, 2**62) | hst.floats()
                            | hst.text(max_size=8) | hst.binary(max_size=8),
                            lambda inner: hst.lists(inner, max_size=4) | hst.dictionaries(hst.text(max_size=6), inner,
                                                                                         max_size=4), max_leaves=12)


@hst.composite
def mutated(draw, data: bytes) -> bytes:
    """``data`` truncated, with bytes flipped, or both."""
    out = bytearray(data)
    if draw(hst.booleans()):
        for _ in range(draw(hst.integers(1, 8))):
            pos = draw(hst.integers(0, len(out) - 1))
            out[pos] ^= draw(hst.integers(1, 255))
    if draw(hst.booleans()) or out == data:
        out = out[:draw(hst.integers(0, len(out) - 1))]
    return bytes(out)


def _replace_member(data: bytes, suffix: str, new: bytes) -> bytes:
    """The zip archive ``data`` with the member ending in ``suffix`` replaced by ``new`` (torch's file format)."""
    src, dst = zipfile.ZipFile(io.BytesIO(data)), io.BytesIO()
    with zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as out:
        for info in src.infolist():
            out.writestr(info, new if info.filename.endswith(suffix) else src.read(info))
    return dst.getvalue()


@hst.composite
def torch_files(draw, valid: bytes, mark: Path) -> bytes:
    """A mutation of the valid torch file ``valid``: raw bytes, or its pickle replaced (a plain structure, a
    truncated or flipped pickle, a pickle naming a global that would run code)."""
    kind = draw(hst.sampled_from(["bytes", "structure", "pickle", "evil"]))
    if kind == "bytes":
        return draw(mutated(valid))
    pkl = zipfile.ZipFile(io.BytesIO(valid)).read(next(n for n in zipfile.ZipFile(io.BytesIO(valid)).namelist()
                                                      if n.endswith("data.pkl")))
    if kind == "structure":
        return _replace_member(valid, "data.pkl", pickle.dumps(draw(plain_trees), protocol=2))
    if kind == "pickle":
        return _replace_member(valid, "data.pkl", draw(mutated(pkl)))
    return _replace_member(valid, "data.pkl", _evil(mark))


def _torch_state() -> dict:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "rng": rng_state(), "data": {"epoch": 1}}


@pytest.fixture(scope="module")
def torch_valid(tmp_path_factory) -> bytes:
    d = tmp_path_factory.mktemp("torch-valid")
    write_state(copy_to_cpu(_torch_state()), d)
    return (d / "state.pt").read_bytes()


def _ran_code(mark: Path) -> bool:
    return mark.exists()


@FUZZ
@given(data=hst.data())
def test_torch_state_reader_returns_plain_data_or_integrity_error(tmp_path, torch_valid, data, figures):
    mark = tmp_path / MARK
    blob = data.draw(torch_files(torch_valid, mark))
    d = tmp_path / "ckpt"
    d.mkdir(exist_ok=True)
    (d / "state.pt").write_bytes(blob)
    try:
        state = read_state(d)
    except IntegrityError:
        figures["state fuzz"]["torch refused"] += 1
    else:
        copy_to_cpu(state, copy=False)  # what it returned is tensors and plain data
        figures["state fuzz"]["torch read"] += 1
    assert not _ran_code(mark)


@pytest.fixture(scope="module")
def lightning_valid(tmp_path_factory) -> bytes:
    pytest.importorskip("lightning")
    from cloudckpt.lightning.checkpoint_io import RNG_KEY

    d = tmp_path_factory.mktemp("lightning-valid")
    state = _torch_state()
    ckpt = {"epoch": 2, "global_step": 20, "state_dict": state["model"], "optimizer_states": [state["optimizer"]],
            "callbacks": {"ModelCheckpoint{'monitor': 'val_loss', 'mode': 'min'}": {
                "monitor": "val_loss", "best_model_score": torch.tensor(0.5), "current_score": torch.tensor(0.5),
                "best_k_models": {"/x/a.ckpt": torch.tensor(0.5)}}},
            "loops": {"fit_loop": {"epoch_progress": {"current": {"completed": 2}}}}, RNG_KEY: rng_state()}
    torch.save(ckpt, d / "last.ckpt")
    return (d / "last.ckpt").read_bytes()


@FUZZ
@given(data=hst.data())
def test_lightning_checkpoint_reader_returns_a_checkpoint_or_integrity_error(tmp_path, lightning_valid, data,
                                                                            figures):
    from cloudckpt.lightning import CloudCheckpointIO

    mark = tmp_path / MARK
    path = tmp_path / "last.ckpt"
    path.write_bytes(data.draw(torch_files(lightning_valid, mark)))
    before = (torch.get_rng_state(), np.random.get_state(), random.getstate())
    try:
        ckpt = CloudCheckpointIO(str(tmp_path / "store")).load_checkpoint(path)
    except IntegrityError:
        figures["state fuzz"]["lightning refused"] += 1
    else:
        assert isinstance(ckpt, dict)
        figures["state fuzz"]["lightning read"] += 1
    finally:  # a load that sets the generators must not leak into the next example
        torch.set_rng_state(before[0])
        np.random.set_state(before[1])
        random.setstate(before[2])
    assert not _ran_code(mark)


@pytest.fixture(scope="module")
def hf_valid(tmp_path_factory) -> dict[str, bytes]:
    pytest.importorskip("transformers")
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("hf-valid")
    state = _torch_state()
    save_file({k: v.contiguous() for k, v in state["model"].items()}, d / "model.safetensors")
    torch.save(state["optimizer"], d / "optimizer.pt")
    torch.save({"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.get_rng_state()},
               d / "rng_state.pth")
    (d / "trainer_state.json").write_text(json.dumps({"global_step": 20, "log_history": [{"step": 20, "loss": 0.5}]}))
    return {p.name: p.read_bytes() for p in d.iterdir()}


@FUZZ
@given(data=hst.data())
def test_hf_checkpoint_reader_reads_or_raises_integrity_error(tmp_path, hf_valid, data, figures):
    from cloudckpt.hf.state import check_checkpoint

    mark = tmp_path / MARK
    folder = tmp_path / "checkpoint-20"
    folder.mkdir(exist_ok=True)
    for name, blob in hf_valid.items():
        (folder / name).write_bytes(blob)
    name = data.draw(hst.sampled_from(sorted(hf_valid)))
    blob = hf_valid[name]
    if name.endswith(".json"):
        new = data.draw(hst.one_of(mutated(blob), json_values.map(lambda v: json.dumps(v).encode())))
    elif name.endswith(".safetensors"):
        new = data.draw(mutated(blob))
    else:
        new = data.draw(torch_files(blob, mark))
    (folder / name).write_bytes(new)
    try:
        check_checkpoint(folder)
    except IntegrityError:
        figures["state fuzz"]["hf refused"] += 1
    else:
        figures["state fuzz"]["hf read"] += 1
    assert not _ran_code(mark)


@pytest.fixture(scope="module")
def keras_valid(tmp_path_factory) -> dict[str, bytes]:
    pytest.importorskip("keras")
    from cloudckpt.keras import state as st

    d = tmp_path_factory.mktemp("keras-valid")
    layout = {"model": [("dense/kernel", [2, 3]), ("seed_generator/state", [2])],
              "optimizer": [("adam/iteration", [])], "metrics": [("loss/total", [])]}
    arrays = {"model_0": np.ones((2, 3), np.float32), "model_1": np.array([1, 2], np.uint32),
              "optimizer_0": np.array(7, np.int64), "metrics_0": np.array(0.5, np.float32)}
    state = st.ResumeState(epoch=1, epoch_done=False, batches_done=3, initial_epoch=1, global_step=11,
                           logs={"loss": 0.25}, best=math.inf, layout=layout)
    st.write_state(d, arrays, state)
    return {p.name: p.read_bytes() for p in (d / st.STATE_DIR).iterdir()}


@hst.composite
def json_doc_mutation(draw, blob: bytes) -> bytes:
    """The JSON document ``blob`` with one key's value replaced, a key dropped, or its bytes mutated."""
    doc = json.loads(blob)
    kind = draw(hst.sampled_from(["replace", "drop", "bytes", "whole"]))
    if kind == "bytes":
        return draw(mutated(blob))
    if kind == "whole":
        return json.dumps(draw(json_values)).encode()
    key = draw(hst.sampled_from(sorted(doc)))
    if kind == "drop":
        doc.pop(key)
    else:
        doc[key] = draw(json_values)
    return json.dumps(doc).encode()


@FUZZ
@given(data=hst.data())
def test_keras_state_reader_reads_or_raises_integrity_error(tmp_path, keras_valid, data, figures):
    from cloudckpt.keras import state as st

    folder = tmp_path / "ckpt"
    (folder / st.STATE_DIR).mkdir(parents=True, exist_ok=True)
    for name, blob in keras_valid.items():
        (folder / st.STATE_DIR / name).write_bytes(blob)
    name = data.draw(hst.sampled_from(sorted(keras_valid)))
    blob = keras_valid[name]
    new = data.draw(json_doc_mutation(blob) if name.endswith(".json") else mutated(blob))
    (folder / st.STATE_DIR / name).write_bytes(new)
    try:
        state, arrays = st.read_state(folder)
    except IntegrityError:
        figures["state fuzz"]["keras refused"] += 1
    else:
        st.check_arrays(state, arrays)
        figures["state fuzz"]["keras read"] += 1
