"""What each checkpoint holds (issue 24 items 1 and 6): a checkpoint of resume state without a model (a Keras save
point where Keras wrote no file: meta kind "state") keeps every metric but is never the run's best nor among the
kept best; `ls`/`show`/`pull --json` say what each holds, in one schema; `pull` of one says so on stderr and
`latest-model` selects the newest with a model. CLI checks run the command as a real process."""

from __future__ import annotations

import json
import os
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_cli import one_line_error, run

from cloudckpt import CheckpointStore
from cloudckpt.changes import commit_checkpoint, prune_checkpoints
from cloudckpt.manifest import CheckpointEntry, FileEntry, Index
from cloudckpt.retention import Retention
from cloudckpt.segments import Sealing, full_view, seal

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
STATE = {"kind": "state", "batch": "0", "epoch_done": "true"}


def entry(i: int, value: float, state_only: bool) -> CheckpointEntry:
    meta = STATE if state_only else {"kind": "model", "file": "m.weights.h5"}
    files = (FileEntry(path="cloudckpt_state/state.json", size=1, crc32c="00000000"),)
    if not state_only:
        files += (FileEntry(path="m.weights.h5", size=2, crc32c="00000000"),)
    return CheckpointEntry(id=f"ckpt-e{i:06d}-0000abcd", epoch=i, created=T0 + timedelta(seconds=i),
                           metrics={"val_loss": value}, files=files, size=sum(f.size for f in files), meta=meta)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 10, allow_nan=False), st.booleans()), min_size=1, max_size=14),
       st.integers(0, 4), st.integers(2, 5))
def test_a_checkpoint_without_a_model_is_never_best_nor_kept_as_best(draws, keep_best, head_max):
    """Commits through the pure index changes, with sealing into segments on the way: the run's best is the best
    checkpoint that holds a model, and keep_best keeps the K best of those (a state-only one stays only as latest)."""
    loaded: dict[str, tuple[CheckpointEntry, ...]] = {}

    def load(ref):
        return loaded[ref.sha256]

    index = Index()
    policy = Retention(monitor="val_loss", mode="min", keep_best=keep_best)
    entries = [entry(i, v, s) for i, (v, s) in enumerate(draws)]
    for e in entries:
        index = commit_checkpoint(index, e, policy, prune=False, busy=frozenset(), load=load).index
        index, made = seal(index, Sealing(head_max=head_max, segment_max=3), load)
        loaded.update({m.ref.sha256: m.entries for m in made})
    models = sorted((e for e in entries if e.holds_model), key=lambda e: (e.metrics["val_loss"], e.epoch))
    assert index.best == (models[0].id if models else None)
    assert all(e.metrics == {"val_loss": v} for e, (v, _) in zip(full_view(index, load).checkpoints, draws))
    pruned = {c.id for c in prune_checkpoints(index, None, busy=frozenset(), load=load).pruned}
    kept = {e.id for e in entries} - pruned
    assert {e.id for e in models[:keep_best]} <= kept
    assert kept - {e.id for e in models[:max(keep_best, 1)]} <= {entries[-1].id}  # else only the latest


def push_with(url: str, tmp_path: Path, name: str, epoch: int, loss: float, *, model: bool) -> CheckpointEntry:
    src = tmp_path / name
    (src / "cloudckpt_state").mkdir(parents=True)
    (src / "cloudckpt_state" / "state.json").write_text(json.dumps({"epoch": epoch}))
    meta = dict(STATE)
    if model:
        (src / "m.weights.h5").write_bytes(os.urandom(300))
        meta = {"kind": "model", "file": "m.weights.h5"}
    with CheckpointStore(url) as store:
        return store.push(src, epoch=epoch, metrics={"val_loss": loss, "val_accuracy": 0.5}, meta=meta,
                          monitor="val_loss")


def test_pull_of_resume_state_says_so_and_latest_model_gets_the_model(tmp_path, local_url):
    first = push_with(local_url, tmp_path, "a", 1, 0.9, model=True)
    push_with(local_url, tmp_path, "b", 2, 0.5, model=False)  # better, but no model: not the best
    last = push_with(local_url, tmp_path, "c", 3, 0.4, model=False)
    proc = run("pull", "latest", "-r", local_url, "--to", str(tmp_path / "out"), "--json")
    assert proc.returncode == 0, proc.stderr
    line = one_line_error(proc)
    assert last.id in line and "no model file" in line and "cloudckpt pull latest-model" in line
    pulled = json.loads(proc.stdout)
    assert (pulled["id"], pulled["model"], pulled["model_file"], pulled["resume_state"]) == (last.id, False, None, True)
    assert pulled["metrics"]["val_loss"] == 0.4 and pulled["tags"] == ["latest"]
    proc = run("pull", "latest-model", "-r", local_url, "--to", str(tmp_path / "m"), "--json")
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    pulled = json.loads(proc.stdout)
    assert (pulled["id"], pulled["model"], pulled["model_file"]) == (first.id, True, "m.weights.h5")
    assert (tmp_path / "m" / "m.weights.h5").is_file() and pulled["tags"] == ["best"]
    rows = json.loads(run("ls", "-r", local_url, "--json").stdout)
    assert [(r["model"], r["resume_state"]) for r in rows] == [(True, True), (False, True), (False, True)]
    text = run("ls", "-r", local_url).stdout.splitlines()
    assert "HOLDS" in text[0] and " model+state " in text[1] and " state " in text[3]


def test_one_json_schema_per_entry_in_ls_show_pull_push(tmp_path, local_url, ckpt):
    """The same keys and values for one checkpoint from push, ls, show and pull (pull adds its local paths); the
    tags are the run's (`pull best --json` said "tags": [] while `show best --json` said ["best"])."""
    proc = run("push", str(ckpt), "-r", local_url, "--epoch", "1", "--metric", "loss=1", "--monitor", "loss", "--json")
    assert proc.returncode == 0, proc.stderr
    pushed = json.loads(proc.stdout)
    run("push", str(ckpt), "-r", local_url, "--epoch", "2", "--metric", "loss=2")
    [listed] = [r for r in json.loads(run("ls", "-r", local_url, "--json").stdout) if r["id"] == pushed["id"]]
    shown = json.loads(run("show", "best", "-r", local_url, "--json").stdout)
    proc = run("pull", "best", "-r", local_url, "--to", str(tmp_path / "out"), "--json")
    pulled = json.loads(proc.stdout)
    keys = {"id", "epoch", "step", "created", "metrics", "files", "size", "writer", "pinned", "meta", "tags",
            "model", "model_file", "resume_state"}
    assert set(listed) == set(shown) == keys and set(pulled) == keys | {"path", "local_files", "skipped", "sources"}
    assert listed == shown == {k: pulled[k] for k in keys} and shown["tags"] == ["best"]
    assert pushed == {**listed, "tags": ["best", "latest"]}  # as it was then: the second push took latest
    assert pulled["path"] == str(tmp_path / "out") and pulled["skipped"] == []


@pytest.fixture
def ckpt(tmp_path) -> Path:
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "model.weights.h5").write_bytes(os.urandom(500))
    return d
