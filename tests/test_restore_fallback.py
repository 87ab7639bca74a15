"""A hostile or damaged newest checkpoint on a real store (issue 21 item 7): the torch ``CheckpointManager.restore()``,
Lightning's ``pull_last`` and HF's ``pull_latest`` skip it, with a warning, for the newest older one that verifies and
reads — as the Keras callback resumes — and say IntegrityError when none does.

"Hostile" here is a writer that replaced the file and made the index and manifest agree with it (verification
passes; only the reader can refuse it); "damaged" is bytes changed under an unchanged index (verification fails).
"""

from __future__ import annotations

import json
import logging

import pytest

from cloudckpt import CheckpointStore
from cloudckpt.checksum import file_checksums
from cloudckpt.errors import IntegrityError
from cloudckpt.layout import manifest_key, object_key
from cloudckpt.manifest import Manifest, dump

torch = pytest.importorskip("torch")


@pytest.fixture(params=["local", "s3"])
def url(request) -> str:
    return request.getfixturevalue(f"{request.param}_url")


def _replace_file(url: str, cid: str, rel: str, data: bytes, tmp_path, *, consistent: bool) -> None:
    """Put ``data`` in place of checkpoint ``cid``'s file ``rel``; with ``consistent``, also rewrite the index
    entry and the manifest to match it (what a hostile writer with bucket access would do)."""
    with CheckpointStore(url) as store:
        store.backend.write_bytes(object_key(cid, rel), data)
        if not consistent:
            return
        local = tmp_path / "replacement"
        local.write_bytes(data)
        sums = file_checksums(local)
        raw, token = store.backend.read_index()
        doc = json.loads(raw)
        entry = next(c for c in doc["checkpoints"] if c["id"] == cid)
        for f in entry["files"]:
            if f["path"] == rel:
                f.update(size=len(data), crc32c=sums["crc32c"], sha256=None)
        entry["size"] = sum(f["size"] for f in entry["files"])
        store.backend.write_index(json.dumps(doc).encode(), token)
        fixed = next(c for c in store.index().checkpoints if c.id == cid)
        store.backend.write_bytes(manifest_key(cid), dump(Manifest(checkpoint=fixed)))


@pytest.mark.parametrize("how", ["hostile", "damaged"])
def test_torch_manager_restore_falls_back_to_an_older_checkpoint(url, tmp_path, caplog, how):
    from cloudckpt.torch import CheckpointManager

    with CheckpointManager(url, keep_best=None, keep_last=None, staging_dir=tmp_path) as mgr:
        for step in (1, 2, 3):
            mgr.save(step, {"w": torch.full((2,), float(step))})
            assert mgr.wait(120)  # each committed (a queued save may otherwise be coalesced into the next)
    with CheckpointStore(url) as store:
        newest = store.latest()
    good = (tmp_path / "good.pt")
    torch.save({"w": torch.zeros(2)}, good)
    bad = good.read_bytes()[:-30] if how == "hostile" else b"\x00" * newest.size
    _replace_file(url, newest.id, "state.pt", bad, tmp_path, consistent=how == "hostile")
    with CheckpointManager(url, staging_dir=tmp_path) as again, caplog.at_level(logging.WARNING):
        restored = again.restore()
        assert restored is not None and restored.step == 2
        assert torch.equal(restored.state["w"], torch.full((2,), 2.0))
        assert f"checkpoint {newest.id} can't be restored" in caplog.text
        with pytest.raises(IntegrityError):
            again.restore(newest.id)  # a named checkpoint never falls back


def test_torch_manager_restore_says_integrity_error_when_nothing_reads(local_url, tmp_path):
    from cloudckpt.torch import CheckpointManager

    with CheckpointManager(local_url, keep_best=None, keep_last=None, staging_dir=tmp_path) as mgr:
        mgr.save(1, {"w": torch.ones(2)})
    with CheckpointStore(local_url) as store:
        only = store.latest()
    _replace_file(local_url, only.id, "state.pt", b"PK\x03\x04 not a zip", tmp_path, consistent=True)
    with CheckpointManager(local_url, staging_dir=tmp_path) as again, pytest.raises(IntegrityError, match=only.id):
        again.restore()


def test_lightning_pull_last_falls_back_to_an_older_file(url, tmp_path):
    pytest.importorskip("lightning")
    from cloudckpt.lightning import CloudCheckpointIO, pull_last

    io = CloudCheckpointIO(url, staging_dir=tmp_path / "staging")
    for epoch in (1, 2):
        io.save_checkpoint({"epoch": epoch, "global_step": 10 * epoch, "state_dict": {"w": torch.ones(1) * epoch}},
                           tmp_path / "ckpts" / f"e{epoch}.ckpt")
    io.teardown()
    with CheckpointStore(url) as store:
        newest = store.latest()
    _replace_file(url, newest.id, "e2.ckpt", b"garbage" * 10, tmp_path, consistent=True)
    target = pull_last(url, tmp_path / "new")
    assert target is not None and target.name == "last.ckpt"
    assert CloudCheckpointIO().load_checkpoint(target)["epoch"] == 1
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == ["last.ckpt"]  # nothing of the refused one left


def test_hf_pull_latest_falls_back_to_an_older_checkpoint(url, tmp_path):
    pytest.importorskip("transformers")
    from cloudckpt.hf import pull_latest

    with CheckpointStore(url) as store:
        for step in (10, 20):
            src = tmp_path / f"checkpoint-{step}"
            src.mkdir()
            (src / "trainer_state.json").write_text(json.dumps({"global_step": step}))
            torch.save({"state": {}, "param_groups": []}, src / "optimizer.pt")
            store.push(src, step=step, meta={"framework": "hf"})
        newest = store.latest()
    _replace_file(url, newest.id, "optimizer.pt", b"\x80\x02cos\nsystem\n.", tmp_path, consistent=True)
    target = pull_latest(url, tmp_path / "out")
    assert target is not None and target.name == "checkpoint-10"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["checkpoint-10"]
