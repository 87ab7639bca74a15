"""Retention policies are pure: plain records in, ids out."""

from __future__ import annotations

import pytest

from cloudckpt.errors import ConfigurationError
from cloudckpt.retention import AnyOf, KeepBest, KeepEvery, KeepLast, Record, Retention, plan_prune

RECS = [Record(f"c{i}", epoch=i, step=i * 10, metrics={"loss": v, "acc": 1 - v})
        for i, v in enumerate([0.9, 0.2, 0.5, 0.1, 0.7, 0.3])]


def test_keep_last():
    assert KeepLast(2).keep(RECS) == {"c4", "c5"}
    assert KeepLast(0).keep(RECS) == set()


def test_keep_best_min_and_max():
    assert KeepBest(2, "loss", "min").keep(RECS) == {"c3", "c1"}
    assert KeepBest(1, "acc", "max").keep(RECS) == {"c3"}


def test_keep_best_ignores_missing_and_nan_and_ties_go_earliest():
    recs = [Record("a", metrics={"loss": float("nan")}), Record("b"), Record("c", metrics={"loss": 1.0}),
            Record("d", metrics={"loss": 1.0})]
    assert KeepBest(1, "loss").keep(recs) == {"c"}


def test_keep_every_takes_last_of_each_matching_epoch():
    recs = RECS + [Record("c4b", epoch=4)]
    assert KeepEvery(2).keep(recs) == {"c0", "c2", "c4b"}


def test_any_of_and_plan_prune_protects_always_and_pinned():
    policy = AnyOf((KeepBest(1, "loss"), KeepLast(1)))
    recs = RECS[:2] + [Record("c2", epoch=2, metrics={"loss": 0.5}, pinned=True)] + RECS[3:]
    doomed = plan_prune(recs, policy, always={"c0"})
    assert doomed == {"c1", "c4"}  # c3 best, c5 last, c2 pinned, c0 protected


def test_no_policy_deletes_nothing():
    assert plan_prune(RECS, None) == set()
    assert Retention(mode="min").policy() is None


def test_keep_best_without_monitor_is_a_configuration_error():
    with pytest.raises(ConfigurationError, match="keep_best=2"):
        Retention(keep_best=2, mode="min").policy()
