"""DCP through cloudckpt on every kind of store (local, S3 on moto, GCS on fake-gcs-server, Azure on Azurite): a
save and a load in this process (one rank: the multi-rank paths are tests/test_torch_dcp.py), and the backends'
ranged read the loader relies on."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
dcp = pytest.importorskip("torch.distributed.checkpoint")

from cloudckpt import CheckpointStore  # noqa: E402
from cloudckpt.distributed_commit import forget_job_stores  # noqa: E402
from cloudckpt.errors import IntegrityError  # noqa: E402
from cloudckpt.torch.dcp import CloudStorageReader, CloudStorageWriter, load  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_job():
    forget_job_stores()
    yield
    forget_job_stores()


@pytest.mark.parametrize("stage_in_memory", [1 << 30, 0], ids=["staged-in-memory", "staged-in-files"])
def test_save_and_load_on_each_store(store_url, tmp_path, stage_in_memory):
    torch.manual_seed(0)
    saved = {"w": torch.randn(128, 64), "n": torch.arange(10, dtype=torch.int64), "extra": {"step": 3}}
    w = CloudStorageWriter(store_url, step=3, metrics={"loss": 0.5}, monitor="loss", files_per_rank=2,
                           stage_in_memory=stage_in_memory)
    dcp.save(saved, storage_writer=w)
    assert w.committed is not None and sorted(f.path for f in w.committed.files) == [
        "__0_0.distcp", "__0_1.distcp", "dcp_metadata.json"]
    target = {"w": torch.zeros(128, 64), "n": torch.zeros(10, dtype=torch.int64), "extra": {"step": 0}}
    reader = CloudStorageReader(store_url, "best")
    load(target, storage_reader=reader)
    assert torch.equal(target["w"], saved["w"]) and torch.equal(target["n"], saved["n"])
    assert target["extra"] == {"step": 3}
    assert reader.entry is not None and reader.entry.id == w.committed.id
    store = CheckpointStore(store_url)
    assert [v.ok for v in store.verify(all=True)] == [True]
    pulled = store.pull("latest", to=tmp_path / "pulled").path
    again = {"w": torch.zeros(128, 64), "n": torch.zeros(10, dtype=torch.int64), "extra": {"step": 0}}
    dcp.load(again, storage_reader=dcp.FileSystemReader(str(pulled)))
    assert torch.equal(again["w"], saved["w"]) and again["extra"] == {"step": 3}


def test_ranged_reads_on_each_store(store_url):
    store = CheckpointStore(store_url)
    data = bytes(range(256)) * 40
    store.backend.write_bytes("ckpt-s0000000001-0badf00d/x.bin", data)
    rel = "ckpt-s0000000001-0badf00d/x.bin"
    for start, length in [(0, 1), (7, 300), (len(data) - 5, 5), (100, 0)]:
        assert store.backend.read_range(rel, start, length) == data[start:start + length]
    with pytest.raises(IntegrityError):  # past the end: the store returns less (or refuses the range)
        store.backend.read_range(rel, len(data) - 5, 10)
    with pytest.raises(FileNotFoundError):
        store.backend.read_range("ckpt-s0000000001-0badf00d/missing.bin", 0, 4)


def test_a_dtype_a_checkpoint_cant_hold_is_refused_before_anything_is_stored(local_url):
    with pytest.raises(BaseException) as info:  # DCP wraps the rank's error (a CheckpointException)
        dcp.save({"z": torch.zeros(4, dtype=torch.complex32)}, storage_writer=CloudStorageWriter(local_url, step=1))
    assert "ConfigurationError" in str(info.value) and "complex32" in str(info.value)
    assert not any(p.name.startswith("ckpt-") for p in Path(local_url).glob("*"))
