"""Retention, property-based: for any history and any policy, prune never deletes the latest, the best, a pinned or
a protected (in-flight, being restored) checkpoint, and deletes exactly what the policy does not keep.

The policy's keep set is checked against an independent reading of the rules (keep-last N by commit order, keep-best
K by metric with ties to the earlier, keep-every N by epoch, last commit of each epoch), and a store-level property
runs random push sequences on a local store and compares its final index with the same oracle.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cloudckpt import CheckpointStore
from cloudckpt.manifest import best_of
from cloudckpt.retention import Objective, Record, Retention, plan_prune

from .conftest import FIGURES

MONITOR = "val_loss"


@st.composite
def histories(draw, max_size: int = 25) -> list[Record]:
    n = draw(st.integers(0, max_size))
    records = []
    for i in range(n):
        metric = draw(st.one_of(st.none(), st.just(math.nan), st.floats(-5, 5, allow_nan=False),
                                st.sampled_from([0.0, 1.0])))  # repeated values: ties
        records.append(Record(
            id=f"ckpt-{i:04d}-{draw(st.integers(0, 2**32 - 1)):08x}",
            epoch=draw(st.one_of(st.none(), st.integers(0, 12))),
            step=i,
            metrics={} if metric is None else {MONITOR: metric},
            pinned=draw(st.booleans()) if draw(st.integers(0, 9)) == 0 else False,
        ))
    return records


policies = st.fixed_dictionaries({
    "keep_best": st.one_of(st.none(), st.integers(0, 6)),
    "keep_last": st.one_of(st.none(), st.integers(0, 30)),
    "keep_every": st.one_of(st.none(), st.integers(1, 6)),
    "mode": st.sampled_from(["min", "max"]),
})


def oracle_keep(records: list[Record], keep_best, keep_last, keep_every, mode) -> set[str] | None:
    """The keep set as the documentation states it; None when no rule is set (keep everything)."""
    if keep_best is None and keep_last is None and keep_every is None:
        return None
    keep: set[str] = set()
    if keep_last:
        keep |= {r.id for r in records[-keep_last:]}
    if keep_best:
        scored = [(i, r) for i, r in enumerate(records) if MONITOR in r.metrics and not math.isnan(r.metrics[MONITOR])]
        sign = 1 if mode == "min" else -1
        ranked = sorted(scored, key=lambda t: (sign * t[1].metrics[MONITOR], t[0]))
        keep |= {r.id for _, r in ranked[:keep_best]}
    if keep_every:
        last: dict[int, str] = {}
        for r in records:
            if r.epoch is not None and r.epoch % keep_every == 0:
                last[r.epoch] = r.id
        keep |= set(last.values())
    return keep


def _best(records: list[Record], mode: str) -> str | None:
    scored = [r for r in records if MONITOR in r.metrics and not math.isnan(r.metrics[MONITOR])]
    if not scored:
        return None
    pick = min if mode == "min" else max
    return pick(scored, key=lambda r: r.metrics[MONITOR]).id


@settings(max_examples=300, deadline=None)
@given(histories(), policies, st.data())
def test_prune_keeps_what_must_be_kept_and_deletes_exactly_the_rest(records, pol, data):
    ids = [r.id for r in records]
    protected = set(data.draw(st.lists(st.sampled_from(ids), max_size=3))) if ids else set()
    latest = ids[-1] if ids else None
    best = _best(records, pol["mode"])
    always = protected | {latest, best} - {None}
    policy = Retention(monitor=MONITOR, **pol).policy()
    doomed = plan_prune(records, policy, always=always)

    pinned = {r.id for r in records if r.pinned}
    FIGURES["retention_examples"]["plan_prune"] += 1
    assert not doomed & (always | pinned)
    assert latest not in doomed and best not in doomed
    expected_keep = oracle_keep(records, **pol)
    if expected_keep is None:
        assert doomed == set()
    else:
        assert policy.keep(records) == expected_keep  # the policy is the documented rule
        assert doomed == set(ids) - expected_keep - always - pinned  # exactly the complement
    # pruning is stable: what is left has nothing more to prune
    rest = [r for r in records if r.id not in doomed]
    assert plan_prune(rest, policy, always=always & {r.id for r in rest}) == set()


def test_keep_last_with_fewer_checkpoints_than_n_keeps_them_all():
    """Regression: KeepLast(3) over 2 records used to keep only the last one."""
    records = [Record("ckpt-a-00000000"), Record("ckpt-b-00000000")]
    policy = Retention(keep_last=3, mode="min").policy()
    assert plan_prune(records, policy) == set()


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    pushes=st.lists(st.tuples(st.integers(0, 6), st.one_of(st.none(), st.floats(0, 1, allow_nan=False))),
                    min_size=1, max_size=7),
    pol=policies,
)
def test_store_retention_matches_the_policy_over_the_whole_history(pushes, pol):
    """Pushes with retention applied at each commit end in exactly the policy's keep set of the whole history,
    plus the latest and the best — incremental pruning never drops what a batch over the history would keep."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        (src / "w.bin").write_bytes(b"w")
        records = []
        with CheckpointStore(str(Path(tmp) / "run"), workers=1) as store:
            for epoch, loss in pushes:
                metrics = {} if loss is None else {MONITOR: loss}
                entry = store.push(src, epoch=epoch, metrics=metrics, monitor=MONITOR, **pol)
                records.append(Record(entry.id, epoch, None, metrics))
            index = store.index()
            listed = {c.id for c in index.checkpoints}
            objects = {o.rel.split("/")[0] for o in store.backend.list_objects()} - {"index.json", "_cloudckpt_index"}
    FIGURES["retention_examples"]["store_push_sequences"] += 1
    keep = oracle_keep(records, **pol)
    best = _best(records, pol["mode"])
    expected = {r.id for r in records} if keep is None else keep | {records[-1].id, best} - {None}
    assert listed == expected
    assert index.latest == records[-1].id
    assert index.best == best == best_of(index.checkpoints, Objective(MONITOR, pol["mode"]))
    assert objects == listed  # pruned checkpoints' objects were deleted too
