"""A DCP checkpoint's metadata and items are input: hostile ones (objects outside the checkpoint, ranges past an
object's end, pickles, altered items) are a typed error before anything is read outside or unpickled; and the
pure parts of the reader (range planning, metadata validation) explored with hypothesis."""

from __future__ import annotations

import io
import json
import pathlib
import pickle
import shutil
import zipfile
from pathlib import Path

import google_crc32c
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")
dcp = pytest.importorskip("torch.distributed.checkpoint")

from cloudckpt import CheckpointStore  # noqa: E402
from cloudckpt.distributed_commit import forget_job_stores  # noqa: E402
from cloudckpt.errors import IntegrityError  # noqa: E402
from cloudckpt.torch.dcp import CloudStorageReader, CloudStorageWriter, load  # noqa: E402
from cloudckpt.torch.dcp_format import METADATA_NAME, StoredItem, parse_metadata  # noqa: E402
from cloudckpt.torch.dcp_read import ranges  # noqa: E402


class Planted:
    """Unpickling this creates the marker file: proof that something from the store was unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


def state(seed: int, extra: object = 7) -> dict:
    torch.manual_seed(seed)
    return {"w": torch.randn(64, 32), "b": torch.randn(64), "extra": {"step": extra}}


@pytest.fixture
def run(tmp_path) -> str:
    forget_job_stores()
    url = str(tmp_path / "store" / "run")
    dcp.save(state(0), storage_writer=CloudStorageWriter(url, step=1))
    yield url
    forget_job_stores()


def plant(run: str, tmp_path: Path, edit) -> str:
    """Commit a copy of the latest checkpoint whose folder ``edit`` changed (the attacker controls the bucket, so
    the index's checksums match the planted objects); return its id."""
    store = CheckpointStore(run)
    folder = store.pull("latest", to=tmp_path / "copy").path
    for name in (".metadata", ".cloudckpt.json"):
        (folder / name).unlink()
    edit(folder)
    cid = store.push(folder, step=99, meta={"format": "torch-dcp"}).id
    shutil.rmtree(folder)
    return cid


def edit_metadata(change):
    def edit(folder: Path) -> None:
        doc = json.loads((folder / METADATA_NAME).read_text())
        change(doc)
        (folder / METADATA_NAME).write_text(json.dumps(doc))

    return edit


def load_fails(run: str, cid: str) -> tuple[BaseException, CloudStorageReader, dict]:
    target = state(1, extra=0)
    before = {k: v.clone() for k, v in target.items() if isinstance(v, torch.Tensor)}
    reader = CloudStorageReader(run, cid)
    with pytest.raises(BaseException) as info:
        load(target, storage_reader=reader)  # dcp.load, raising the reader's typed error
    for k, v in before.items():  # DCP saw nothing of a checkpoint that failed its checks
        assert torch.equal(target[k], v), k
    return info.value, reader, target


@pytest.mark.parametrize("where", ["../../outside.distcp", "ckpt-s0000000001-0badf00d/__0_0.distcp",
                                   "_cloudckpt_manifest.json", "__7_0.distcp"])
def test_metadata_naming_an_object_outside_the_checkpoint_is_refused_before_any_read(run, tmp_path, where):
    outside = Path(run).parent / "outside.distcp"
    outside.write_bytes(b"not the checkpoint's")
    cid = plant(run, tmp_path, edit_metadata(lambda doc: doc["storage"][0].update(file=where)))
    err, reader, _ = load_fails(run, cid)
    assert isinstance(err, IntegrityError) and "not an object of this checkpoint" in str(err)
    assert reader.stats["bytes"] == 0


@pytest.mark.parametrize("field,value", [("start", 10**6), ("length", 10**6)])
def test_metadata_with_a_range_past_the_object_end_is_refused(run, tmp_path, field, value):
    cid = plant(run, tmp_path, edit_metadata(lambda doc: doc["storage"][-1].update({field: value})))
    err, reader, _ = load_fails(run, cid)
    assert isinstance(err, IntegrityError) and "past the end" in str(err) and reader.stats["bytes"] == 0


def test_a_pickled_metadata_object_is_never_unpickled(run, tmp_path):
    marker = tmp_path / "unpickled"

    def edit(folder: Path) -> None:
        (folder / METADATA_NAME).write_bytes(pickle.dumps(Planted(marker)))

    cid = plant(run, tmp_path, edit)
    err, _, _ = load_fails(run, cid)
    assert isinstance(err, IntegrityError) and "not JSON" in str(err)
    with pytest.raises(BaseException, match="not JSON"):  # DCP's own load names it too, wrapped
        dcp.load(state(1), storage_reader=CloudStorageReader(run, cid))
    assert not marker.exists()


def test_an_altered_item_is_refused_before_dcp_sees_it(run, tmp_path):
    def edit(folder: Path) -> None:  # one byte of the last item changed; the object's own checksum is recomputed
        data = bytearray((folder / "__0_0.distcp").read_bytes())
        data[-100] ^= 0xFF
        (folder / "__0_0.distcp").write_bytes(bytes(data))

    cid = plant(run, tmp_path, edit)
    err, _, _ = load_fails(run, cid)
    assert isinstance(err, IntegrityError) and "crc32c" in str(err)


def test_a_non_tensor_value_holding_an_object_is_refused_and_not_run(tmp_path):
    forget_job_stores()
    url, marker = str(tmp_path / "run"), tmp_path / "unpickled"
    dcp.save(state(0, extra=Planted(marker)), storage_writer=CloudStorageWriter(url, step=1))
    assert not marker.exists()
    err, _, _ = load_fails(url, "latest")
    assert isinstance(err, IntegrityError) and "not plain data" in str(err)
    assert not marker.exists()


def test_a_tensor_item_is_read_without_running_its_pickle(run, tmp_path):
    """The archive of a tensor item carries a pickle (data.pkl); the reader takes only the raw storage record, so
    a planted data.pkl is never run and the tensor still loads from its record."""
    marker = tmp_path / "unpickled"

    def evil(item: bytes) -> bytes:
        out = io.BytesIO()
        with zipfile.ZipFile(io.BytesIO(item)) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
            for info in src.infolist():
                body = pickle.dumps(Planted(marker)) if info.filename.endswith("/data.pkl") else src.read(info)
                dst.writestr(info.filename, body)
        return out.getvalue()

    def edit(folder: Path) -> None:
        doc = json.loads((folder / METADATA_NAME).read_text())
        blob, new = (folder / "__0_0.distcp").read_bytes(), bytearray()
        for s in sorted(doc["storage"], key=lambda s: s["start"]):
            data = blob[s["start"]:s["start"] + s["length"]]
            data = evil(data) if s["fqn"] == "w" else data
            s.update(start=len(new), length=len(data), crc32c=google_crc32c.Checksum(data).digest().hex())
            new += data
        (folder / "__0_0.distcp").write_bytes(bytes(new))
        (folder / METADATA_NAME).write_text(json.dumps(doc))

    cid = plant(run, tmp_path, edit)
    target = state(1, extra=0)
    dcp.load(target, storage_reader=CloudStorageReader(run, cid))
    assert torch.equal(target["w"], state(0)["w"]) and torch.equal(target["b"], state(0)["b"])
    assert not marker.exists()


# --- the pure parts, explored ------------------------------------------------------------------------------------

items = st.lists(st.tuples(st.sampled_from(["__0_0.distcp", "__1_0.distcp"]), st.integers(0, 5),
                           st.integers(1, 50)), min_size=1, max_size=30)


@settings(max_examples=200, deadline=None)
@given(items, st.integers(1, 200), st.data())
def test_ranges_read_exactly_the_wanted_items_bytes(layout, coalesce, data):
    """Items of a file laid end to end (gaps between some); any subset wanted: the reads cover every wanted byte,
    no byte of an unwanted item, each read within ``coalesce`` unless it is one item, and an item of ``alone``
    bytes or more read by itself."""
    stored, pos = [], {}
    for i, (file, gap, length) in enumerate(layout):
        start = pos.get(file, 0) + gap
        stored.append(StoredItem(fqn=f"t{i}", file=file, start=start, length=length, crc32c="00000000"))
        pos[file] = start + length
    wanted = data.draw(st.lists(st.sampled_from(stored), min_size=1, unique_by=lambda s: s.fqn))
    alone = data.draw(st.integers(1, 60))
    plan = ranges(wanted, coalesce, alone)
    read = {(f, b) for f, start, length, _ in plan for b in range(start, start + length)}
    want = {(s.file, b) for s in wanted for b in range(s.start, s.start + s.length)}
    assert read == want
    assert sorted(s.fqn for *_, group in plan for s in group) == sorted(s.fqn for s in wanted)
    for _, _, length, group in plan:
        assert length <= coalesce or len(group) == 1
        assert len(group) == 1 or all(s.length < alone for s in group)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_parsed_metadata_never_points_outside_its_objects(run, data):
    """Any edit of a valid metadata's storage fields: either IntegrityError, or every item lies inside an object of
    the checkpoint."""
    store = CheckpointStore(run)
    entry = store.latest()
    files = {f.path: f.size for f in entry.files if f.path != METADATA_NAME}
    doc = json.loads(store.backend.read_bytes(f"{entry.id}/{METADATA_NAME}"))
    for _ in range(data.draw(st.integers(1, 3))):
        s = data.draw(st.sampled_from(doc["storage"]))
        field = data.draw(st.sampled_from(["file", "start", "length", "offset", "fqn", "record"]))
        if field == "record" and s.get("record"):
            key = data.draw(st.sampled_from(["start", "size", "block"]))
            s["record"][key] = data.draw(st.integers(-5, 2 * max(files.values())))
            continue
        s[field] = data.draw({
            "file": st.sampled_from([*files, "../x", "", "dcp_metadata.json", "a/../../b"]),
            "start": st.integers(-5, 2 * max(files.values())), "length": st.integers(-5, 2 * max(files.values())),
            "offset": st.one_of(st.none(), st.lists(st.integers(0, 70), max_size=3)),
            "fqn": st.sampled_from(["w", "b", "extra.step", "nope"]), "record": st.none()}[field])
    try:
        md = parse_metadata(json.dumps(doc).encode(), files)
    except IntegrityError:
        return
    for s in md.storage:
        assert s.file in files and s.start + s.length <= files[s.file]
        if s.record is not None:  # a part of a tensor is read inside its item, one checksum per block
            assert s.record.start + s.record.size <= s.length
            assert len(s.record.crc32c) * s.record.block >= s.record.size


def test_a_part_of_a_tensor_is_read_and_checked_by_its_blocks_only(tmp_path):
    """Rows of a saved tensor are fetched as the blocks holding them, each checked against its recorded crc32c:
    a changed byte in a block that isn't needed is never read; in one that is, it is an IntegrityError."""
    from cloudckpt.torch.dcp_read import read_items, resolve_entry

    forget_job_stores()
    url = str(tmp_path / "run")
    saved = state(0)  # w: 64 rows x 32 float32 = 128 bytes a row, 8 KiB: two blocks of 4 KiB (rows 0-31, 32-63)
    dcp.save(saved, storage_writer=CloudStorageWriter(url, step=1, block_size=4096))
    store = CheckpointStore(url)
    entry, md, _ = resolve_entry(store, "latest")
    [w] = [s for s in md.storage if s.fqn == "w"]
    assert w.record is not None and len(w.record.crc32c) == 2
    obj = Path(url) / entry.id / w.file
    data = bytearray(obj.read_bytes())
    data[w.start + w.record.start + 4096 + 10] ^= 0xFF  # a byte of row 32..63's block
    obj.write_bytes(bytes(data))
    stats = {"bytes": 0, "requests": 0, "items": 0}
    [part] = read_items(store, entry.id, [(w, [8, 0], [16, 32])], md.items, coalesce=2**26, stats=stats)
    assert torch.equal(part, saved["w"][8:24]) and stats["bytes"] == 4096  # one block, nothing else of the item
    with pytest.raises(IntegrityError, match="block 1"):
        read_items(store, entry.id, [(w, [40, 0], [4, 32])], md.items, coalesce=2**26, stats=stats)
    forget_job_stores()
