"""NaN/inf metrics and malformed index entries (issue 21 item 1), on real stores, the CLI as real processes.

A non-finite metric is recorded as no value on every path (never ranked best), what a writer writes it can read
back, an index with ``null`` metrics written by older cloudckpt still lists and restores, and a malformed entry is
named with the command that repairs it (``cloudckpt repair``), which rewrites the index through compare-and-swap.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hst

from cloudckpt import CheckpointStore
from cloudckpt.changes import Change
from cloudckpt.errors import IntegrityError
from cloudckpt.layout import manifest_key, segment_key
from cloudckpt.manifest import Index, parse_index

CLI = [sys.executable, "-m", "cloudckpt"]


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full = {**os.environ, **(env or {})}
    full.pop("CLOUDCKPT_DEBUG", None)
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=120, env=full)


def ls(url: str) -> list[dict]:
    proc = run("ls", "--remote", url, "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.fixture
def ckpt(tmp_path) -> Path:
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "model.pt").write_bytes(os.urandom(3000))
    return d


@pytest.fixture(params=["local", "s3"])
def url(request) -> str:
    return request.getfixturevalue(f"{request.param}_url")


def _push(url: str, path: Path, *extra: str) -> dict:
    proc = run("push", str(path), "--remote", url, "--json", *extra)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_cli_push_of_nan_and_inf_keeps_the_run_readable(url, ckpt, tmp_path):
    """`push --metric val_loss=nan` (and inf, -inf) commits with no value: ls, pull latest and later pushes work,
    the best is the best finite value, and the warning says what was done."""
    first = _push(url, ckpt, "--epoch", "1", "--metric", "val_loss=0.5", "--monitor", "val_loss")
    proc = run("push", str(ckpt), "--remote", url, "--json", "--epoch", "2", "--metric", "val_loss=nan",
               "--metric", "acc=0.75")
    assert proc.returncode == 0, proc.stderr
    assert "'val_loss' is nan: recorded as no value" in proc.stderr
    nan = json.loads(proc.stdout)
    assert nan["metrics"] == {"acc": 0.75}
    inf = _push(url, ckpt, "--epoch", "3", "--metric", "val_loss=-inf")  # would rank best in mode min
    rows = ls(url)
    assert [r["id"] for r in rows] == [first["id"], nan["id"], inf["id"]]
    assert [r["metrics"] for r in rows] == [{"val_loss": 0.5}, {"acc": 0.75}, {}]
    assert rows[0]["tags"] == ["best"] and rows[2]["tags"] == ["latest"]
    pulled = run("pull", "latest", "--remote", url, "--to", str(tmp_path / "out"))
    assert pulled.returncode == 0, pulled.stderr
    last = _push(url, ckpt, "--epoch", "4", "--metric", "val_loss=0.25")  # a later writer reads and writes the index
    assert [r["tags"] for r in ls(url)][-1] == ["best", "latest"] and last["metrics"] == {"val_loss": 0.25}


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(values=hst.lists(hst.floats(allow_nan=True, allow_infinity=True, width=64), min_size=1, max_size=6))
def test_api_push_of_any_float_is_read_back_and_never_ranks_a_non_finite_value(tmp_path_factory, values):
    """Any sequence of float metrics pushed through the API: a fresh reader reads the run, each entry holds exactly
    the finite values, and the best is the first minimal finite value."""
    src = tmp_path_factory.mktemp("src") / "w.bin"
    src.write_bytes(b"w")
    url = str(tmp_path_factory.mktemp("run") / "r")
    with CheckpointStore(url) as store:
        ids = [store.push(src, epoch=i, metrics={"val_loss": v}, monitor="val_loss").id for i, v in enumerate(values)]
    with CheckpointStore(url) as reader:
        index = reader.index()
        assert [c.id for c in index.checkpoints] == ids
        for c, v in zip(index.checkpoints, values):
            assert c.metrics == ({"val_loss": v} if math.isfinite(v) else {})
        finite = [(v, i) for i, v in enumerate(values) if math.isfinite(v)]
        assert index.best == (ids[min(finite)[1]] if finite else None)


def test_a_writer_never_writes_an_index_it_could_not_read_back(local_url, ckpt):
    """An index update whose result would not read back (a NaN slipped into an entry past validation) is refused
    at the writer with IntegrityError, and the stored index is unchanged."""
    with CheckpointStore(local_url) as store:
        entry = store.push(ckpt, epoch=1, metrics={"val_loss": 0.5}, monitor="val_loss")
        before = store.backend.read_index()[0]
        bad = entry.model_copy(update={"metrics": {"val_loss": float("nan")}})  # bypasses the entry's validation

        def change(index: Index) -> Change:
            return Change(index.model_copy(update={"checkpoints": (bad,)}))

        with pytest.raises(IntegrityError, match="could not read back"):
            store.keeper.apply(change)
        assert store.backend.read_index()[0] == before


def _old_writer_index(url: str, mutate) -> None:
    """Rewrite the run's index as a writer would that serialized ``mutate(raw index)`` (conditional write)."""
    with CheckpointStore(url) as store:
        data, token = store.backend.read_index()
        raw = json.loads(data)
        mutate(raw)
        store.backend.write_index(json.dumps(raw).encode(), token)


def test_torch_manager_nan_metric_then_a_restarted_manager_restores(url, tmp_path):
    torch = pytest.importorskip("torch")
    from cloudckpt.torch import CheckpointManager

    with CheckpointManager(url, monitor="val_loss", staging_dir=tmp_path) as mgr:
        mgr.save(1, {"w": torch.ones(2)}, metrics={"val_loss": 0.5})
        mgr.save(2, {"w": torch.full((2,), 2.0)}, metrics={"val_loss": float("nan")})
        mgr.save(3, {"w": torch.full((2,), 3.0)}, metrics={"val_loss": float("inf")})
    with CheckpointManager(url, monitor="val_loss", staging_dir=tmp_path) as again:
        latest = again.restore("latest")
        best = again.restore("best")
        assert latest is not None and latest.step == 3 and latest.metrics == {}
        assert best is not None and best.step == 1 and best.metrics == {"val_loss": 0.5}
        assert torch.equal(latest.state["w"], torch.full((2,), 3.0))


def test_lightning_inf_score_is_committed_with_no_value(local_url, tmp_path):
    """Lightning reports an infinite score (its start value): the file is committed, with no value, no error."""
    pytest.importorskip("lightning")
    import torch

    from cloudckpt.lightning import CloudCheckpointIO

    io = CloudCheckpointIO(local_url, staging_dir=tmp_path / "staging")
    key = "ModelCheckpoint{'monitor': 'val_loss', 'mode': 'min', 'every_n_train_steps': 0, 'every_n_epochs': 1}"
    for epoch, score in ((0, float("inf")), (1, 0.5)):  # Lightning records a NaN val_loss as inf in its top-k
        path = tmp_path / "ckpts" / f"e{epoch}.ckpt"
        ckpt = {"epoch": epoch, "global_step": epoch + 1, "state_dict": {},
                "callbacks": {key: {"monitor": "val_loss", "current_score": score,
                                    "best_k_models": {str(path): torch.tensor(score)}}}}
        io.save_checkpoint(ckpt, path)
    io.teardown()
    with CheckpointStore(local_url) as store:
        entries = store.list()
        assert [c.metrics for c in entries] == [{}, {"val_loss": 0.5}]
        assert store.best().id == entries[1].id


def test_hf_eval_nan_is_recorded_as_no_value():
    pytest.importorskip("transformers")
    from transformers import TrainerState

    from cloudckpt.hf import CloudCheckpointCallback

    state = TrainerState(global_step=4, log_history=[{"step": 4, "eval_loss": float("nan"), "eval_acc": 0.5}])
    cb = CloudCheckpointCallback.__new__(CloudCheckpointCallback)
    cb.monitor, cb.mode, cb._best = "eval_loss", "min", None
    metrics = cb._metrics_at(state, 4)
    assert metrics == {"eval_acc": 0.5} and not cb._improves(metrics)


def test_null_metrics_from_an_older_writer_still_list_restore_and_repair(url, ckpt, tmp_path):
    """An index where an older cloudckpt wrote `"val_loss": null` (its NaN): ls and pull work, the warning names the
    entry and `cloudckpt repair`; repair rewrites the index without the null, keeping every checkpoint."""
    ids = [_push(url, ckpt, "--epoch", str(e), "--metric", f"val_loss={v}", "--monitor", "val_loss")["id"]
           for e, v in ((1, 0.5), (2, 0.1), (3, 0.4))]

    def old_nan(raw: dict) -> None:  # what an older cloudckpt wrote for a NaN: null, never the best
        raw["checkpoints"][1]["metrics"]["val_loss"] = None
        raw["best"] = ids[2]

    _old_writer_index(url, old_nan)
    with CheckpointStore(url) as store:  # its manifest too
        key = manifest_key(ids[1])
        manifest = json.loads(store.backend.read_bytes(key))
        manifest["checkpoint"]["metrics"]["val_loss"] = None
        store.backend.write_bytes(key, json.dumps(manifest).encode())
    proc = run("ls", "--remote", url, "--json")
    assert proc.returncode == 0, proc.stderr
    assert f"checkpoint '{ids[1]}' has metric 'val_loss' = null" in proc.stderr and "cloudckpt repair" in proc.stderr
    rows = json.loads(proc.stdout)
    assert [r["id"] for r in rows] == ids and rows[1]["metrics"] == {} and rows[2]["tags"] == ["best", "latest"]
    for args in (("pull", ids[1], "--to", str(tmp_path / "out")), ("verify", "--all")):
        proc = run(*args, "--remote", url)
        assert proc.returncode == 0, proc.stderr
    dry = run("repair", "--remote", url, "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    assert json.loads(dry.stdout)["problems"] == [
        {"where": "index", "id": ids[1], "fix": "metric 'val_loss' is null: dropped (no value)"}]
    fixed = run("repair", "--remote", url, "--json")
    assert fixed.returncode == 0 and json.loads(fixed.stdout)["rewritten"], fixed.stderr
    with CheckpointStore(url) as store:
        data = store.backend.read_index()[0]
    assert [c["metrics"] for c in json.loads(data)["checkpoints"]] == [{"val_loss": 0.5}, {}, {"val_loss": 0.4}]
    again = run("ls", "--remote", url, "--json")
    assert again.returncode == 0 and "null" not in again.stderr, again.stderr
    assert [r["id"] for r in json.loads(again.stdout)] == ids
    assert [r["tags"] for r in json.loads(again.stdout)] == [[], [], ["best", "latest"]]
    assert json.loads(run("repair", "--remote", url, "--json").stdout) == {"dry_run": False, "rewritten": False,
                                                                          "problems": []}


@pytest.mark.parametrize("breakage", ["unsafe path", "bad id", "wrong size"])
def test_a_malformed_entry_is_named_and_repair_drops_it(url, ckpt, tmp_path, breakage):
    """One malformed entry: every read names it and `cloudckpt repair`, exit 4; repair removes that entry only (its
    files are never acted on), after which the others list and restore, and best/latest are recomputed."""
    ids = [_push(url, ckpt, "--epoch", str(e), "--metric", f"val_loss={v}", "--monitor", "val_loss")["id"]
           for e, v in ((1, 0.5), (2, 0.1), (3, 0.4))]

    def mutate(raw: dict) -> None:
        entry = raw["checkpoints"][1]
        if breakage == "unsafe path":
            entry["files"][0]["path"] = "../../escape"
        elif breakage == "bad id":
            entry["id"] = "../ckpt"
            raw["best"] = None  # what a hostile writer would also make consistent
        else:
            entry["size"] += 1

    _old_writer_index(url, mutate)
    for args in (("ls",), ("pull", "latest", "--to", str(tmp_path / "x")), ("verify", "--all")):
        proc = run(*args, "--remote", url)
        assert proc.returncode == 4, proc.stderr
        assert "checkpoint entry checkpoints.1" in proc.stderr and "cloudckpt repair --remote URL" in proc.stderr
    assert not (tmp_path / "x").exists()
    fixed = run("repair", "--remote", url, "--json")
    assert fixed.returncode == 0, fixed.stderr
    problems = json.loads(fixed.stdout)["problems"]
    assert len(problems) == 1 and problems[0]["fix"].startswith("entry removed")
    rows = ls(url)
    assert [r["id"] for r in rows] == [ids[0], ids[2]]
    assert rows[1]["tags"] == ["best", "latest"]  # 0.1 was the removed one's
    pulled = run("pull", "best", "--remote", url, "--to", str(tmp_path / "out"))
    assert pulled.returncode == 0, pulled.stderr
    assert not (tmp_path.parent / "escape").exists()


def test_bad_entries_in_sealed_segments_are_read_named_and_repaired(local_url, ckpt, monkeypatch):
    """Index segments hold older writers' entries too: a null metric there is read as no value, a malformed entry
    there is named; repair seals every kept entry again and the run lists them all."""
    env = {"CLOUDCKPT_INDEX_HEAD_MAX": "2"}
    monkeypatch.setenv("CLOUDCKPT_INDEX_HEAD_MAX", "2")
    ids = []
    for e in range(1, 7):
        proc = run("push", str(ckpt), "--remote", local_url, "--json", "--epoch", str(e),
                   "--metric", f"val_loss={1.0 / e}", "--monitor", "val_loss", env=env)
        assert proc.returncode == 0, proc.stderr
        ids.append(json.loads(proc.stdout)["id"])
    with CheckpointStore(local_url) as store:
        head = parse_index(store.backend.read_index()[0])
        assert head.segments, "the test needs sealed segments"
        ref = head.segments[0]
        seg = json.loads(store.backend.read_bytes(segment_key(ref.sha256)))

        def rewrite(mutate) -> None:
            mutate(seg["checkpoints"])
            data = json.dumps(seg).encode()
            digest = hashlib.sha256(data).hexdigest()
            store.backend.write_bytes(segment_key(digest), data)
            _old_writer_index(local_url, lambda raw: raw["segments"][0].update(sha256=digest))

        middle = seg["checkpoints"][1]["id"]
        rewrite(lambda cps: cps[1]["metrics"].update(val_loss=None))  # an unscored entry: summaries still hold
        _old_writer_index(local_url, lambda raw: raw["segments"][0].update(
            scored=raw["segments"][0]["scored"] - 1,
            top=[t for t in raw["segments"][0]["top"] if t[1] != 1]))
        proc = run("ls", "--remote", local_url, "--json", env=env)
        assert proc.returncode == 0, proc.stderr
        assert [r["id"] for r in json.loads(proc.stdout)] == ids
        assert f"checkpoint '{middle}' has metric 'val_loss' = null" in proc.stderr
        rewrite(lambda cps: cps[1].update(size=-1))
        proc = run("ls", "--remote", local_url, env=env)
        assert proc.returncode == 4 and "cloudckpt repair --remote URL" in proc.stderr, proc.stderr
        assert f"(id '{middle}')" in proc.stderr
    fixed = run("repair", "--remote", local_url, "--json", env=env)
    assert fixed.returncode == 0, fixed.stderr
    assert [p["id"] for p in json.loads(fixed.stdout)["problems"]][0] == middle
    rows = ls(local_url)
    assert [r["id"] for r in rows] == [i for i in ids if i != middle]
    assert rows[-1]["tags"] == ["best", "latest"]
    with CheckpointStore(local_url) as store:
        assert parse_index(store.backend.read_index()[0]).segments  # sealed again
        assert all(r.ok for r in store.verify(all=True))



def test_repair_rebuilds_an_index_whose_entries_are_sound_but_not_the_whole(local_url, ckpt):
    ids = [_push(local_url, ckpt, "--epoch", str(e), "--metric", f"val_loss={v}", "--monitor", "val_loss")["id"]
           for e, v in ((1, 0.5), (2, 0.1))]
    _old_writer_index(local_url, lambda raw: raw.update(latest="ckpt-00000000", best=ids[0]))
    assert run("ls", "--remote", local_url).returncode == 4
    fixed = run("repair", "--remote", local_url, "--json")
    assert fixed.returncode == 0, fixed.stderr
    assert [r["tags"] for r in ls(local_url)] == [[], ["best", "latest"]]
