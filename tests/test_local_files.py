"""``prune_local``'s promise, explored: a local file Keras wrote is removed only once its checkpoint was committed
and then pruned from the store (or superseded before its upload, so it never will be committed). Files whose
checkpoints are still queued, uploading or failed, and every file a listed checkpoint names, stay.

The store is a real local store with retention (keep_best=1, keep_last=2, the setting of the reported bug); uploads
finish in any order, fail or are superseded, and ``prune`` runs at any moment (as the uploader's commit hook does).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as s
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

pytest.importorskip("keras")

from cloudckpt.errors import CheckpointNotFoundError  # noqa: E402
from cloudckpt.keras.local_files import LocalFiles  # noqa: E402
from cloudckpt.keras.state import CheckpointMeta, RunPolicy, SavePoint  # noqa: E402
from cloudckpt.store import CheckpointStore  # noqa: E402
from cloudckpt.uploader import Job  # noqa: E402


def _push(store: CheckpointStore, root: Path, name: str, epoch: int, loss: float) -> object:
    src = root.parent / "stage" / name
    src.mkdir(parents=True)
    shutil.copy2(root / name, src / name)
    meta = CheckpointMeta(kind="model", batch=0, epoch_done=True, file=name, local_file=name)
    policy = RunPolicy(monitor="val_loss", mode="min", keep_best=1, keep_last=2, keep_every=None)
    entry = store.push(src, **SavePoint(epoch, epoch * 10, {"val_loss": loss}, meta, policy).push_args())
    shutil.rmtree(src)
    return entry


class LocalPruning(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        import tempfile

        self.tmp = Path(tempfile.mkdtemp())
        self.root = self.tmp / "ckpt"
        self.root.mkdir()
        self.store = CheckpointStore(str(self.tmp / "store"))
        self.local = LocalFiles(str(self.root / "m-{epoch:02d}.weights.h5"))
        self.epoch = 0
        self.pending: dict[str, tuple[int, float, Job]] = {}  # written, upload not finished
        self.failed: set[str] = set()  # upload failed: the file must stay (it may be retried)

    def teardown(self) -> None:
        self.store.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    @rule(loss=s.floats(0.0, 1.0))
    def keras_writes(self, loss: float) -> None:
        self.epoch += 1
        name = f"m-{self.epoch:02d}.weights.h5"
        (self.root / name).write_bytes(b"w" * self.epoch)
        self.local.wrote(str(self.root / name))
        job = Job(self.root / name, {})
        self.local.queued(str(self.root / name), job)
        self.pending[name] = (self.epoch, loss, job)

    @precondition(lambda self: self.pending)
    @rule(data=s.data())
    def upload_finishes(self, data: s.DataObject) -> None:
        name = data.draw(s.sampled_from(sorted(self.pending)))
        epoch, loss, job = self.pending.pop(name)
        outcome = data.draw(s.sampled_from(["committed", "failed", "superseded"]))
        entry = None
        if outcome == "committed":
            entry = _push(self.store, self.root, name, epoch, loss)
            job.entry = entry  # type: ignore[assignment]
        elif outcome == "failed":  # held for a retry: not done
            job.error = OSError("refused")
            self.failed.add(name)
        else:
            job.superseded = True
        if outcome != "failed":
            job.done.set()
        self.local.prune(self.store, committed=entry)  # type: ignore[arg-type]

    @rule()
    def prune_runs(self) -> None:
        self.local.prune(self.store)

    @invariant()
    def what_may_be_needed_is_kept(self) -> None:
        present = {p.name for p in self.root.iterdir()}
        try:
            listed = {c.meta["local_file"] for c in self.store.list()}
        except CheckpointNotFoundError:
            listed = set()
        assert listed <= present, f"a listed checkpoint's local file was removed: {sorted(listed - present)}"
        uploading = set(self.pending)
        assert uploading <= present, f"a file still uploading was removed: {sorted(uploading - present)}"
        assert self.failed <= present, f"a file whose upload failed was removed: {sorted(self.failed - present)}"


TestLocalPruning = LocalPruning.TestCase
TestLocalPruning.settings = settings(max_examples=60, stateful_step_count=25, deadline=None,
                                     suppress_health_check=[HealthCheck.too_slow])


def test_a_file_still_uploading_is_kept_and_a_pruned_one_removed(tmp_path):
    """The reported case: epoch 1's upload is slow, epoch 2 (the new best) is queued behind it, epoch 3 is written;
    epoch 1's commit prunes locally. m-02 must stay (it is about to be the store's best); once everything committed
    with keep_best=1, keep_last=2, only m-01 is removed."""
    root = tmp_path / "ckpt"
    root.mkdir()
    local = LocalFiles(str(root / "m-{epoch:02d}.weights.h5"))
    jobs = {}
    for e in (1, 2, 3):
        (root / f"m-0{e}.weights.h5").write_bytes(b"w")
        local.wrote(str(root / f"m-0{e}.weights.h5"))
        jobs[e] = Job(root / f"m-0{e}.weights.h5", {})
        local.queued(str(root / f"m-0{e}.weights.h5"), jobs[e])
    with CheckpointStore(str(tmp_path / "s")) as store:
        local.prune(store, committed=_push(store, root, "m-01.weights.h5", 1, 0.9))  # type: ignore[arg-type]
        assert sorted(p.name for p in root.iterdir()) == ["m-01.weights.h5", "m-02.weights.h5", "m-03.weights.h5"]
        _push(store, root, "m-02.weights.h5", 2, 0.5)
        removed = local.prune(store, committed=_push(store, root, "m-03.weights.h5", 3, 0.7))  # type: ignore
        assert [Path(p).name for p in removed] == ["m-01.weights.h5"]
        assert sorted(p.name for p in root.iterdir()) == ["m-02.weights.h5", "m-03.weights.h5"]
        assert store.best().meta["local_file"] == "m-02.weights.h5"
