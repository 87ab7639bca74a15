"""gc planning is pure: it sees objects, the index and the time."""

from __future__ import annotations

from cloudckpt.backends import ObjectInfo
from cloudckpt.garbage import plan_gc
from cloudckpt.manifest import MANIFEST_NAME, CheckpointEntry, FileEntry, Index, utcnow


def test_plan_deletes_only_old_unlisted_cloudckpt_objects():
    listed = CheckpointEntry(id="ckpt-e000001-aaaaaaaa", created=utcnow(), size=1,
                             files=(FileEntry(path="w.bin", size=1, crc32c="00000000"),))
    index = Index().with_checkpoint(listed)
    objs = [
        ObjectInfo("index.json", 10, 0),
        ObjectInfo("ckpt-e000001-aaaaaaaa/w.bin", 1, 0),
        ObjectInfo(f"ckpt-e000001-aaaaaaaa/{MANIFEST_NAME}", 5, 0),
        ObjectInfo("ckpt-e000001-aaaaaaaa/stray.bin", 7, 0),          # not in the entry: garbage
        ObjectInfo("ckpt-e000002-bbbbbbbb/w.bin", 100, 0),            # crashed commit, old
        ObjectInfo("ckpt-e000003-cccccccc/w.bin", 100, 0),            # in flight: one object is young
        ObjectInfo("ckpt-e000003-cccccccc/x.bin", 100, 995),
        ObjectInfo("ckpt-e000004-dddddddd/.cloudckpt-tmp-1-w.bin", 3, 0),  # temp file
        ObjectInfo("someone-elses/data.csv", 1000, 0),                # not ours: never touched
        ObjectInfo("notes.txt", 1, 0),
    ]
    plan = plan_gc(objs, index, now=1000, min_age=60)
    assert plan.delete == ["ckpt-e000001-aaaaaaaa/stray.bin", "ckpt-e000004-dddddddd/.cloudckpt-tmp-1-w.bin"]
    assert plan.condemn == {"ckpt-e000002-bbbbbbbb": ["ckpt-e000002-bbbbbbbb/w.bin"]}  # deleted once condemned
    assert plan.everything() == ["ckpt-e000001-aaaaaaaa/stray.bin", "ckpt-e000002-bbbbbbbb/w.bin",
                                 "ckpt-e000004-dddddddd/.cloudckpt-tmp-1-w.bin"]
    assert plan.bytes == 110
    assert plan.kept_young == {"ckpt-e000003-cccccccc"}


def test_plan_deletes_what_the_index_already_condemns_whatever_its_age():
    """A gc that died between its condemn and its deletes: the next one deletes those objects at once."""
    seg = "_cloudckpt_index/" + "ab" * 32 + ".json"
    objs = [ObjectInfo("ckpt-e000002-bbbbbbbb/w.bin", 100, 999), ObjectInfo(seg, 10, 999),
            ObjectInfo("ckpt-e000003-cccccccc/w.bin", 100, 999)]
    plan = plan_gc(objs, Index(), now=1000, min_age=60, condemned={"ckpt-e000002-bbbbbbbb", seg})
    assert plan.delete == [seg, "ckpt-e000002-bbbbbbbb/w.bin"] and plan.condemn == {}
    assert plan.kept_young == {"ckpt-e000003-cccccccc"}
