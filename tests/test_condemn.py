"""gc's condemned names in the index (cloudckpt.condemn): pure, so explored with hypothesis."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from cloudckpt.condemn import MAX_CONDEMNED, commit_refusal, condemn, condemned_segments
from cloudckpt.errors import CheckpointCondemnedError
from cloudckpt.manifest import CheckpointEntry, FileEntry, Index, dump, parse_index, utcnow
from cloudckpt.retention import Objective
from cloudckpt.segments import avoid, decode, encode

IDS = [f"ckpt-e{i:06d}-{i:08x}" for i in range(200)]


def _entry(cid: str) -> CheckpointEntry:
    files = (FileEntry(path="w.bin", size=1, crc32c="00000000"),)
    return CheckpointEntry(id=cid, created=utcnow(), size=1, files=files)


def test_condemn_leaves_out_what_the_index_lists_or_already_condemns():
    index = Index().with_checkpoint(_entry(IDS[0]))
    once = condemn(index, [IDS[0], IDS[1], IDS[1]])
    assert once is not None and [(c.name, c.seq) for c in once.condemned] == [(IDS[1], index.seq + 1)]
    assert condemn(once, [IDS[0], IDS[1]]) is None  # nothing new: no index write
    assert commit_refusal(once, IDS[1], began=0) and commit_refusal(once, IDS[2], began=0) is None


def test_an_index_condemning_nothing_is_written_as_before_and_one_that_does_says_so():
    plain = Index().with_checkpoint(_entry(IDS[0]))
    doc = json.loads(dump(plain))
    assert doc["schema_version"] == 1 and "condemned" not in doc and "horizon" not in doc  # older readers read it
    marked = condemn(plain, [IDS[1]])
    assert marked is not None
    doc = json.loads(dump(marked))
    assert doc["schema_version"] == 3 and doc["condemned"] == [{"name": IDS[1], "seq": marked.seq}]
    assert parse_index(dump(marked)) == marked.model_copy(update={"schema_version": 3})


def test_a_commit_of_a_condemned_id_raises_typed():
    from cloudckpt.changes import commit_checkpoint
    from cloudckpt.retention import Retention

    index = condemn(Index(), [IDS[3]])
    assert index is not None
    try:
        commit_checkpoint(index, _entry(IDS[3]), Retention(), prune=True, busy=frozenset(), began=index.seq)
    except CheckpointCondemnedError as exc:
        assert IDS[3] in str(exc)
    else:
        raise AssertionError("a condemned id was committed")
    assert commit_checkpoint(index, _entry(IDS[4]), Retention(), prune=True, busy=frozenset(),
                             began=index.seq).index is not None


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.lists(st.sampled_from(IDS), max_size=12), st.booleans()), max_size=40))
def test_a_forgotten_name_still_refuses_the_push_that_made_it(rounds):
    """However many gc runs condemn however many names (commits in between), the list stays bounded and every name
    ever condemned at seq C still refuses a commit whose push began before C (its own push, whatever happened)."""
    index, condemned_at = Index(), {}
    for names, commit in rounds:
        if commit:
            index = index.with_checkpoint(_entry(f"ckpt-s{index.seq:010d}-{index.seq:08x}"))
        new = condemn(index, names)
        if new is not None:
            for c in new.condemned:
                condemned_at.setdefault(c.name, c.seq)
            index = new
        assert len(index.condemned) <= MAX_CONDEMNED
    for name, seq in condemned_at.items():
        assert commit_refusal(index, name, began=seq - 1) is not None, (name, seq, index.horizon)


def test_a_condemned_segment_is_written_under_a_fresh_digest():
    objective = Objective(None, "min")
    seg = encode([_entry(IDS[5]), _entry(IDS[6])], objective)
    index = Index(schema_version=2, segments=(seg.ref,), checkpoints=(_entry(IDS[7]),), latest=IDS[7])
    marked = condemn(Index(), [seg.key])
    assert marked is not None and condemned_segments(marked) == {seg.key}
    fresh_index, made = avoid(index, [seg], condemned_segments(marked), lambda: "0" * 32)
    assert made[0].key != seg.key and fresh_index.segments[0] == made[0].ref
    assert decode(made[0].ref, made[0].data) == seg.entries  # the same checkpoints, read back and checked
    again, same = avoid(index, [seg], frozenset(), lambda: "1" * 32)
    assert same[0] is seg and again == index


def test_a_reserved_id_is_not_condemned_until_its_reservation_expired_and_its_commit_releases_it():
    from cloudckpt.changes import commit_checkpoint
    from cloudckpt.condemn import MAX_RESERVED, reserve
    from cloudckpt.retention import Retention

    index = reserve(Index(), IDS[8])
    assert index is not None and reserve(index, IDS[8]) is None
    assert json.loads(dump(index))["schema_version"] == 3
    assert condemn(index, [IDS[8]]) is None  # a push is uploading it again
    expired = condemn(index, [IDS[8]], expired={IDS[8]})
    assert expired is not None and [c.name for c in expired.condemned] == [IDS[8]] and expired.reserved == ()
    done = commit_checkpoint(index, _entry(IDS[8]), Retention(), prune=False, busy=frozenset(), began=index.seq)
    assert done.index is not None and done.index.reserved == () and done.index.latest == IDS[8]
    for cid in IDS[10:10 + MAX_RESERVED + 5]:
        index = reserve(index, cid) or index
    assert len(index.reserved) == MAX_RESERVED and index.reserved[-1].name == IDS[10 + MAX_RESERVED + 4]
