"""Keras on JAX, variables split across processes: every process stores its own shards, process 0 commits one
checkpoint, restore re-splits for any process count and layout (cloudckpt.keras.shards, shard_restore,
shard_format).

Real processes: two JAX processes on the CPU (jax.distributed, gloo, coordinator on 127.0.0.1) training on sklearn
digits under ModelParallel with the Dense kernels (and so their Adam slots) split by columns across the processes;
moto's S3 server and the local store. The hostile-metadata tests run in this process on a checkpoint pushed by hand.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as hs

from cloudckpt.errors import IntegrityError
from cloudckpt.store import CheckpointStore

pytest.importorskip("keras")

needs_jax = pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="jax is not installed")
SAVED = re.compile(r"process (\d) stored (\d+) shards \((\d+) bytes\) of checkpoint (\S+)")
READ = re.compile(r"read (\d+) shards \((\d+) bytes, (\d+) requests\) of checkpoint (\S+)")


def start(tmp: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    from test_keras_backends import JOB, backend_env

    tmp.mkdir(parents=True, exist_ok=True)
    err = open(tmp / f"stderr-{len(list(tmp.glob('stderr-*')))}.log", "w+")
    proc = subprocess.Popen([sys.executable, JOB, "--epochs", "1", *args], stdout=subprocess.PIPE, stderr=err,
                            text=True, env={**backend_env("jax", tmp.parent), **(env or {})}, cwd=tmp)
    proc.err_file = err
    return proc


def pair(tmp: Path, *args: str, env1: dict[str, str] | None = None) -> list:
    """Processes 0 and 1 of a model-parallel job, in ``tmp/p0`` and ``tmp/p1`` (``env1``: process 1's extra env)."""
    from test_keras_backends_multihost import free_port

    port = free_port()
    return [start(tmp / f"p{i}", *args, "--model-parallel", "--jax-processes", f"127.0.0.1:{port},2,{i}",
                  env=env1 if i == 1 else None) for i in range(2)]


def shard_values(store: CheckpointStore, step: int, to: Path) -> tuple[dict, dict]:
    """The checkpoint at ``step`` put together from its objects with numpy alone (no cloudckpt reader): every
    variable's whole value by key, and its path by key."""
    from cloudckpt.keras.shard_format import numpy_dtype

    entry = next(e for e in store.list() if e.step == step)
    folder = store.pull(entry.id, to=to).path
    md = json.loads((folder / "cloudckpt_shards/metadata.json").read_bytes())
    values, paths = {}, {}
    for v in md["variables"]:
        out = np.zeros(v["shape"], numpy_dtype(v["dtype"]))
        filled = np.zeros(v["shape"], bool)
        for s in v["shards"]:
            raw = (folder / s["object"]).read_bytes()[s["start"]:s["start"] + s["length"]]
            box = tuple(slice(a, b) for a, b in s["box"])
            out[box] = np.frombuffer(raw, out.dtype).reshape([b - a for a, b in s["box"]])
            assert not filled[box].any(), "each element stored once"
            filled[box] = True
        assert filled.all()
        values[v["key"]], paths[v["key"]] = out, v["path"]
    return values, paths


def assert_identical(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert a[k].tobytes() == b[k].tobytes(), f"{k} differs"


def split_and_replicated(values: dict, paths: dict) -> tuple[int, int]:
    """Bytes of the variables the job's layout splits (the Dense kernels and their Adam slots) and of the rest."""
    split = sum(v.nbytes for k, v in values.items() if "kernel" in paths[k])
    return split, sum(v.nbytes for v in values.values()) - split


def finish_all(procs: list) -> list:
    from test_keras_resume import finish

    return [finish(p) for p in procs]


@needs_jax
def test_each_process_uploads_its_shards_one_commit_a_failure_raises_on_all_then_restore_resplit(tmp_path, s3_url):
    # the second save (step 10) fails on process 1 (a full disk as it writes its shards): it raises on BOTH
    # processes (neither is left in a collective), nothing of it is listed or left behind but what gc collects
    saving = pair(tmp_path / "save", "--remote", s3_url, "--weights-only", "--save-freq", "5", "--shuffle",
                  "--filepath", "ckpt/m.weights.h5", "--dump-at", "5", "--dump", str(tmp_path / "at5.npz"),
                  env1={"CLOUDCKPT_FAILPOINT": "keras.shards.before_upload:2:enospc"})
    r0, r1 = finish_all(saving)
    assert (r0.rc, r1.rc) == (1, 1), r0.err + r1.err
    for r in (r0, r1):
        assert re.search(r"TransferError: .*ckpt-e000001-s0000000010-\w+ .*not committed.*process 1: OSError: "
                         r"\[Errno 28\]", r.err), r.err
        assert r.steps[-1] == 10
    store = CheckpointStore(s3_url)
    [entry] = store.list()
    assert entry.step == 5 and entry.meta["kind"] == "model" and entry.meta["processes"] == "2"
    left = [o.rel for o in store.backend.list_objects() if "-s0000000010-" in o.rel]
    assert left == [], "each process removed its own object of the failed save"
    values, paths = shard_values(store, 5, tmp_path / "pulled")
    with np.load(tmp_path / "at5.npz") as live:
        assert_identical(values, {k: live[k] for k in live.files})  # the store holds the live values, bit for bit

    # each process uploaded only its own shards: process 1 half the split variables, process 0 the other half
    # and every replicated variable once; one object each, both listed in the one commit
    split, replicated = split_and_replicated(values, paths)
    assert split > 0 and replicated > 0
    stored = {int(m[0]): int(m[2]) for r in (r0, r1) for m in SAVED.findall(r.err) if m[3] == entry.id}
    assert stored == {0: split // 2 + replicated, 1: split // 2}
    sizes = {f.path: f.size for f in entry.files}
    assert sizes["cloudckpt_shards/p00000.bin"] == split // 2 + replicated
    assert sizes["cloudckpt_shards/p00001.bin"] == split // 2
    assert "committed ckpt-" in r0.err and not re.search("committed ckpt-|claimed", r1.err), "process 0 commits"
    assert not list((tmp_path / "save").glob("p*/ckpt/*")), "no Keras file: it would need the gather"

    # restore on two processes with the kernels split by rows instead, and on one process: bit-identical
    rows = pair(tmp_path / "rows", "--remote", s3_url, "--weights-only", "--filepath", "m.weights.h5",
                "--kernel-split", "rows", "--dump-restored", "--dump", str(tmp_path / "rows.npz"))
    one = start(tmp_path / "one", "--remote", s3_url, "--weights-only", "--filepath", "m.weights.h5",
                "--dump-restored", "--dump", str(tmp_path / "one.npz"))
    for r in [*finish_all(rows), *finish_all([one])]:
        assert r.rc == 0 and "DUMPED" in r.out, r.err
        assert f"resumed from {entry.id}" in r.err
    for name in ("rows", "one"):
        with np.load(tmp_path / f"{name}.npz") as got:
            assert_identical({k: got[k] for k in got.files}, values)


@needs_jax
def test_process_one_sigkilled_mid_upload_lists_nothing_then_the_previous_restores_reading_only_its_part(tmp_path):
    remote = str(tmp_path / "store")
    common = ["--remote", remote, "--weights-only", "--save-freq", "5", "--shuffle", "--filepath",
              "ckpt/m.weights.h5"]
    # process 1 SIGKILLs itself inside its upload of the second save (step 10); process 0 then waits in a
    # collective its peer never enters, and is killed too (a job whose host died)
    saving = pair(tmp_path / "save", *common, "--dump-at", "5", "--dump", str(tmp_path / "at5.npz"),
                  env1={"CLOUDCKPT_FAILPOINT": "keras.shards.mid_upload:2"})
    assert saving[1].wait(timeout=300) == -signal.SIGKILL
    saving[0].kill()
    r0, r1 = finish_all(saving)
    assert len(SAVED.findall(r1.err)) == 1, "process 1 died inside its second save"
    store = CheckpointStore(remote)
    assert [e.step for e in store.list()] == [5], "nothing of the interrupted save is listed"
    values, paths = shard_values(store, 5, tmp_path / "pulled")
    with np.load(tmp_path / "at5.npz") as live:
        assert_identical(values, {k: live[k] for k in live.files})

    # restart on two processes, same layout: each reads only the shards its devices hold (its half of the split
    # variables, and the replicated ones), and the values are those saved at step 5
    again = pair(tmp_path / "again", *common, "--dump-restored", "--dump", str(tmp_path / "again.npz"))
    a0, a1 = finish_all(again)
    split, replicated = split_and_replicated(values, paths)
    for r in (a0, a1):
        assert r.rc == 0 and "DUMPED" in r.out, r.err
        assert re.search(r"resumed from ckpt-e000001-s0000000005-\w+ .*: epoch 1, 5 batches into it", r.err)
        [(_, nbytes, _, _)] = READ.findall(r.err)
        assert int(nbytes) == split // 2 + replicated
    with np.load(tmp_path / "again.npz") as got:
        assert_identical({k: got[k] for k in got.files}, values)
    [only] = store.list()
    store.gc(min_age=0)  # what the killed save stored, never listed, is collected
    assert {o.rel.split("/")[0] for o in store.backend.list_objects() if o.rel.startswith("ckpt-")} == {only.id}
    assert [v.ok for v in store.verify(all=True)] == [True]


# --- hostile metadata: validated before any shard is read ------------------------------------------------------


def _planted(tmp_path: Path, metadata: dict, bin_size: int = 64) -> tuple[CheckpointStore, object]:
    """A run whose only checkpoint is a sharded one (pushed by hand) with ``metadata``; its store's ranged reads
    recorded."""
    from cloudckpt.keras import state as st

    src = tmp_path / "src"
    layout = {"model": [["d/kernel", [4, 4]]], "optimizer": [], "metrics": []}
    state = st.ResumeState(format=3, shards="cloudckpt_shards/metadata.json", epoch=0, epoch_done=True,
                           initial_epoch=1, global_step=3, layout=layout)
    st.write_state(src, {}, state)
    (src / "cloudckpt_shards").mkdir()
    (src / "cloudckpt_shards/p00000.bin").write_bytes(np.arange(bin_size // 4, dtype=np.float32).tobytes())
    (src / "cloudckpt_shards/metadata.json").write_text(json.dumps(metadata))
    store = CheckpointStore(str(tmp_path / "store"))
    entry = store.push(src, epoch=1, step=3)
    reads: list[str] = []
    backend_read = store.backend.read_range
    store.backend.read_range = lambda rel, start, n: (reads.append(rel), backend_read(rel, start, n))[1]
    store.reads = reads
    return store, entry


def _metadata(**shard) -> dict:
    s = {"box": [[0, 4], [0, 4]], "object": "cloudckpt_shards/p00000.bin", "start": 0, "length": 64,
         "crc32c": "00000000", **shard}
    return {"format": "cloudckpt-keras-shards", "version": 1, "processes": 1,
            "variables": [{"key": "model_0", "path": "d/kernel", "dtype": "float32", "shape": [4, 4],
                           "shards": [s]}]}


@pytest.mark.parametrize("shard, why", [
    ({"object": "cloudckpt_state/state.json"}, "not a shard object of this checkpoint"),
    ({"object": "cloudckpt_shards/../../other-run/p00000.bin"}, "not a shard object of this checkpoint"),
    ({"object": "cloudckpt_shards/p00009.bin"}, "not a shard object of this checkpoint"),
    ({"start": 8}, "run past the end"),
    ({"length": 32}, "its box holds 16 float32 values"),
    ({"box": [[0, 4], [0, 5]]}, "outside the variable's shape"),
])
def test_hostile_metadata_is_an_integrity_error_before_any_shard_is_read(tmp_path, shard, why):
    from cloudckpt.keras import shard_restore

    store, entry = _planted(tmp_path, _metadata(**shard))
    with pytest.raises(IntegrityError, match=re.escape(why)):
        shard_restore.read_state_and_metadata(store, entry, tmp_path / "to")
    assert store.reads and not [r for r in store.reads if r.endswith(".bin")]


def test_planted_pickle_or_overlapping_shards_are_refused_and_resume_falls_back(tmp_path):
    import pickle

    from cloudckpt.keras import resume as rs
    from cloudckpt.keras import shard_format as sf

    good = _metadata()
    store, entry = _planted(tmp_path, good)
    state, _, md = __import__("cloudckpt.keras.shard_restore", fromlist=["x"]).read_state_and_metadata(
        store, entry, tmp_path / "ok")
    assert state.global_step == 3 and md.variables[0].shards[0].length == 64, "the same checkpoint, well formed"
    assert not [r for r in store.reads if r.endswith(".bin")], "metadata and state only"
    with pytest.raises(IntegrityError, match="not JSON"):
        sf.parse_metadata(pickle.dumps(good), {"cloudckpt_shards/p00000.bin": 64})
    twice = {**good, "variables": [{**good["variables"][0], "shards": [
        {**good["variables"][0]["shards"][0], "box": [[0, 2], [0, 4]], "length": 32},
        {**good["variables"][0]["shards"][0], "box": [[1, 3], [0, 4]], "length": 32, "start": 32}]}]}
    with pytest.raises(IntegrityError, match="exactly once"):
        sf.parse_metadata(json.dumps(twice).encode(), {"cloudckpt_shards/p00000.bin": 64})
    bad_store, _ = _planted(tmp_path / "bad", _metadata(start=4))
    with pytest.raises(IntegrityError, match="no checkpoint with resume state verifies.*run past the end"):
        rs.pull_resumable(bad_store, tmp_path / "resume")


@settings(max_examples=60, deadline=None)
@given(cuts=hs.lists(hs.integers(1, 15), max_size=4, unique=True), rows=hs.integers(1, 6),
       flaw=hs.sampled_from(["none", "shift", "grow", "drop", "object", "past_end"]))
def test_tilings_parse_exactly_when_they_cover_each_element_once_within_their_objects(cuts, rows, flaw):
    from cloudckpt.keras import shard_format as sf

    edges = [0, *sorted(cuts), 16]
    shards, start = [], 0
    for a, b in zip(edges, edges[1:], strict=False):
        n = rows * (b - a) * 4
        shards.append({"box": [[0, rows], [a, b]], "object": "cloudckpt_shards/p00000.bin", "start": start,
                       "length": n, "crc32c": "0000abcd"})
        start += n
    size = start
    s = shards[-1]
    if flaw == "shift":  # overlaps its neighbour (or leaves its first column uncovered)
        s["box"][1][0] = max(0, s["box"][1][0] - 1) if len(shards) > 1 else 1
        s["length"] = rows * (s["box"][1][1] - s["box"][1][0]) * 4
    elif flaw == "grow":
        s["length"] += 4
    elif flaw == "drop" and len(shards) > 1:
        shards.pop()
    elif flaw == "object":
        s["object"] = "cloudckpt_shards/p00001.bin"
    elif flaw == "past_end":
        s["start"] += 4
    md = {"processes": 1, "variables": [{"key": "optimizer_2", "path": "a/m", "dtype": "float32",
                                         "shape": [rows, 16], "shards": shards}]}
    files = {"cloudckpt_shards/p00000.bin": size}
    broken = flaw != "none" and not (flaw == "drop" and len(edges) == 2)
    if broken:
        with pytest.raises(IntegrityError):
            sf.parse_metadata(json.dumps(md).encode(), files)
    else:
        got = sf.parse_metadata(json.dumps(md).encode(), files)
        assert sum(math.prod(b - a for a, b in x.box) for x in got.variables[0].shards) == rows * 16


def _grid(shape: tuple[int, int], rows: list[int], cols: list[int]) -> list[tuple[tuple[int, int], ...]]:
    r = [0, *sorted(c for c in set(rows) if 0 < c < shape[0]), shape[0]]
    c = [0, *sorted(x for x in set(cols) if 0 < x < shape[1]), shape[1]]
    return [((r0, r1), (c0, c1)) for r0, r1 in zip(r, r[1:], strict=False) for c0, c1 in zip(c, c[1:], strict=False)]


@settings(max_examples=80, deadline=None)
@given(shape=hs.tuples(hs.integers(1, 12), hs.integers(1, 12)), data=hs.data())
def test_any_layout_is_assembled_from_any_saved_split_reading_only_overlapping_shards(shape, data):
    """Restore's re-split: a variable saved in one grid of shards (any process count and layout), restored into
    another, gives each restored part exactly the saved values, from the saved shards overlapping it alone."""
    from cloudckpt.keras.shard_format import intersect
    from cloudckpt.keras.shard_restore import assemble

    cuts = hs.lists(hs.integers(1, 11), max_size=3)
    saved_boxes = _grid(shape, data.draw(cuts), data.draw(cuts))
    wanted_boxes = _grid(shape, data.draw(cuts), data.draw(cuts))
    whole = np.arange(shape[0] * shape[1], dtype=np.float32).reshape(shape)
    saved = [(b, whole[b[0][0]:b[0][1], b[1][0]:b[1][1]].copy()) for b in saved_boxes]
    for box in wanted_boxes:
        overlapping = [(b, d) for b, d in saved if intersect(b, box) is not None]
        got = assemble(box, overlapping, np.dtype(np.float32))
        assert got.tobytes() == whole[box[0][0]:box[0][1], box[1][0]:box[1][1]].tobytes()
