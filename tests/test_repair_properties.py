"""``cloudckpt repair`` explored (issue 21 item 1): any run — head and sealed segments — with any of its entries
broken the ways a bucket can break them, is planned back into an index that reads, lists exactly the sound entries
in commit order (a ``null`` metric dropped, nothing else changed), and names best and latest from what is kept.
Pure: the plan is computed from the stored bytes (:func:`cloudckpt.repair.plan_repair`)."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone

from hypothesis import given, settings
from hypothesis import strategies as hst

from cloudckpt.layout import is_checkpoint_id
from cloudckpt.manifest import CheckpointEntry, FileEntry, Index, RunPolicy, dump, parse_index
from cloudckpt.repair import plan_repair
from cloudckpt.retention import Objective, Retention
from cloudckpt.segments import Sealing, full_view, seal

BREAKS = ["null metric", "unsafe path", "bad size", "bad id", "no files", "duplicate id"]
STRUCTURAL = set(BREAKS) - {"null metric"}


def _entry(i: int, value: float) -> CheckpointEntry:
    return CheckpointEntry(id=f"ckpt-e{i:06d}-s{i:010d}-{i:08x}", epoch=i, step=i,
                           created=datetime(2026, 1, 1, tzinfo=timezone.utc), metrics={"val_loss": value},
                           files=(FileEntry(path="w.bin", size=i, crc32c="0" * 8),), size=i)


def _run(values: list[float], head_max: int) -> tuple[bytes, dict[str, bytes]]:
    """The stored bytes of a run of ``values`` (the index, and the segments by digest), sealed at ``head_max``."""
    index = Index().with_policy(RunPolicy.of(Retention(monitor="val_loss")))
    entries: dict[str, tuple[CheckpointEntry, ...]] = {}
    stored = {}
    for i, v in enumerate(values):
        index, made = seal(index.with_checkpoint(_entry(i, v)), SEALING(head_max), lambda r: entries[r.sha256])
        for m in made:
            entries[m.ref.sha256], stored[m.ref.sha256] = m.entries, m.data
    return dump(index), stored


def SEALING(head_max: int) -> Sealing:  # noqa: N802 - reads as the constant it stands for
    return Sealing(head_max=head_max, segment_max=3)


def _entries_of(blob: bytes) -> tuple[CheckpointEntry, ...]:
    """A stored segment's entries as a reader reads them (a null metric as no value)."""
    return tuple(CheckpointEntry.model_validate_json(json.dumps(c), strict=True, context={"dropped": []})
                 for c in json.loads(blob)["checkpoints"])


def _break(entry: dict, how: str, before: dict | None) -> None:
    if how == "null metric":
        entry["metrics"]["val_loss"] = None
    elif how == "unsafe path":
        entry["files"][0]["path"] = "../x"
    elif how == "bad size":
        entry["size"] += 1
    elif how == "bad id":
        entry["id"] = "not/an-id"
    elif how == "no files":
        entry["files"] = []
    elif before is not None:
        entry["id"] = before["id"]
    else:
        entry["size"] = -1  # the first entry has no earlier id to repeat: break it otherwise


@settings(max_examples=400, deadline=None)
@given(values=hst.lists(hst.floats(0, 10, allow_nan=False).map(lambda v: round(v, 3)), min_size=1, max_size=12),
       head_max=hst.integers(2, 6), data=hst.data())
def test_repair_keeps_exactly_the_sound_entries(values, head_max, data):
    head, segments = _run(values, head_max)
    raw = json.loads(head)
    docs = {sha: json.loads(blob) for sha, blob in segments.items()}
    flat = [c for ref in raw.get("segments", []) for c in docs[ref["sha256"]]["checkpoints"]] + raw["checkpoints"]
    broken = data.draw(hst.dictionaries(hst.sampled_from(range(len(values))), hst.sampled_from(BREAKS), max_size=4))
    for i, how in sorted(broken.items()):
        _break(flat[i], how, flat[i - 1] if i else None)
    kept, seen = [], set()  # what repair must keep: valid entries whose id was not kept before
    for i, c in enumerate(flat):
        how = broken.get(i)
        if (how in STRUCTURAL - {"duplicate id"} or (how == "duplicate id" and i == 0)  # size -1 then
                or not is_checkpoint_id(c["id"]) or c["id"] in seen):
            continue
        kept.append(i)
        seen.add(c["id"])
    stored = {}
    for ref in raw.get("segments", []):  # a changed segment is stored under its new digest, as a writer would
        blob = json.dumps(docs[ref["sha256"]]).encode()
        ref["sha256"] = hashlib.sha256(blob).hexdigest()
        stored[ref["sha256"]] = blob
    plan = plan_repair(json.dumps(raw).encode(), stored.__getitem__, SEALING(head_max))
    if not broken:
        assert plan.index is None and not plan.problems
        return
    assert plan.index is not None and plan.problems
    again = parse_index(dump(plan.index))  # what is written reads back, strictly
    made = {m.ref.sha256: m.entries for m in plan.segments}
    listed = full_view(again, lambda r: made.get(r.sha256) or _entries_of(stored[r.sha256])).checkpoints
    assert [c.id for c in listed] == [flat[i]["id"] for i in kept]
    for c, i in zip(listed, kept):
        assert c.metrics == ({} if broken.get(i) == "null metric" else {"val_loss": values[i]})
        assert c.files == _entry(i, 0).files  # nothing else of a kept entry changes
    best = Objective("val_loss", "min").ranked(list(listed), lambda c: c.metrics)
    assert again.best == (best[0].id if best else None)
    assert again.latest == (listed[-1].id if listed else None)
