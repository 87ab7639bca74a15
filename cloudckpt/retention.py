"""Retention policies: pure, composable decisions of which checkpoints to keep. No I/O, no clock.

:class:`Objective` is the one definition of "better" (the index's best, :class:`KeepBest` and the Keras callback
all ask it); :class:`Retention` is a run's policy as one object (what ranks checkpoints and how many to keep).
Each policy is a frozen dataclass with one method, ``keep(records) -> set of ids``. They see a minimal
:class:`Record` (id, epoch, step, metrics), in commit order, oldest first. :func:`plan_prune` combines a policy with
what is always kept — the latest, the best, pinned and protected (in-flight, being restored) checkpoints.

One rule on what may rank: a checkpoint that holds resume state but no model (an entry whose ``meta["kind"]`` is
``"state"``: a Keras save point where Keras wrote no file) keeps all its metrics, but is never a best candidate —
:func:`rank_metrics` gives it no value, so it is never the run's best nor among the ``keep_best`` best.

Example:
    >>> policy = AnyOf((KeepBest(1, monitor="val_loss", mode="min"), KeepLast(2)))
    >>> recs = [Record("a", epoch=1, metrics={"val_loss": 0.5}), Record("b", epoch=2, metrics={"val_loss": 0.9}),
    ...         Record("c", epoch=3, metrics={"val_loss": 0.7})]
    >>> sorted(policy.keep(recs))
    ['a', 'b', 'c']
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field, fields, replace
from typing import Literal, Protocol, TypeVar

from .errors import ConfigurationError

log = logging.getLogger(__name__)

Mode = Literal["min", "max"]
T = TypeVar("T")


@dataclass(frozen=True)
class Objective:
    """What "better" means: a lower (``mode="min"``) or higher (``"max"``) value of the metric ``monitor``.

    A value is missing when there is no monitor, the metrics lack it, or it is NaN; a missing value is never better.
    """

    monitor: str | None = None
    mode: Mode = "min"

    def __post_init__(self) -> None:
        if self.mode not in ("min", "max"):
            raise ConfigurationError(f"mode must be 'min' or 'max'. Received: mode={self.mode!r}")

    def value(self, metrics: Mapping[str, float]) -> float | None:
        """The monitored value in ``metrics``, or None when it is missing."""
        v = metrics.get(self.monitor) if self.monitor else None
        return None if v is None or math.isnan(v) else v

    def better(self, value: float | None, than: float | None) -> bool:
        """Whether ``value`` strictly improves on ``than`` (anything present improves on a missing ``than``)."""
        if value is None or math.isnan(value):
            return False
        if than is None or math.isnan(than):
            return True
        return value < than if self.mode == "min" else value > than

    def ranked(self, items: Sequence[T], metrics: Callable[[T], Mapping[str, float]]) -> list[T]:
        """The items that have a value, best first; ties keep their order (the earlier one ranks higher)."""
        scored = [(v, i, item) for i, item in enumerate(items) if (v := self.value(metrics(item))) is not None]
        sign = 1 if self.mode == "min" else -1
        scored.sort(key=lambda t: (sign * t[0], t[1]))
        return [item for _, _, item in scored]


#: ``meta["kind"]`` of a checkpoint that holds resume state without a model (see :func:`rank_metrics`)
STATE_ONLY = "state"


def holds_model(meta: Mapping[str, str]) -> bool:
    """Whether a checkpoint with this ``meta`` holds a model: all do, except resume state alone (kind "state")."""
    return meta.get("kind") != STATE_ONLY


def rank_metrics(metrics: Mapping[str, float], meta: Mapping[str, str]) -> Mapping[str, float]:
    """The metrics a checkpoint is ranked by: its own, or none when it holds no model (:func:`holds_model`), so a
    checkpoint without a model is never the best however good its metrics."""
    return metrics if holds_model(meta) else {}


@dataclass(frozen=True)
class Record:
    """What a policy may look at (``metrics``: those it is ranked by, :func:`rank_metrics`)."""

    id: str
    epoch: int | None = None
    step: int | None = None
    metrics: Mapping[str, float] = field(default_factory=dict)
    pinned: bool = False


class Policy(Protocol):
    def keep(self, records: Sequence[Record]) -> set[str]: ...


@dataclass(frozen=True)
class KeepLast:
    """Keep the ``n`` most recently committed checkpoints."""

    n: int

    def keep(self, records: Sequence[Record]) -> set[str]:
        return {r.id for r in records[max(0, len(records) - self.n) :]} if self.n > 0 else set()


@dataclass(frozen=True)
class KeepBest:
    """Keep the ``k`` best checkpoints by ``monitor``; ``mode="min"`` keeps the lowest values, ``"max"`` the highest.

    Checkpoints without the metric (or with NaN) are never counted among the best. Ties go to the earlier one.
    """

    k: int
    monitor: str
    mode: Literal["min", "max"] = "min"

    def keep(self, records: Sequence[Record]) -> set[str]:
        ranked = Objective(self.monitor, self.mode).ranked(records, lambda r: r.metrics)
        return {r.id for r in ranked[: self.k]} if self.k > 0 else set()


@dataclass(frozen=True)
class KeepEvery:
    """Keep every checkpoint whose epoch is a multiple of ``n`` (the last one committed for that epoch)."""

    n: int

    def keep(self, records: Sequence[Record]) -> set[str]:
        last_of_epoch: dict[int, str] = {}
        for r in records:
            if r.epoch is not None and r.epoch % self.n == 0:
                last_of_epoch[r.epoch] = r.id
        return set(last_of_epoch.values())


@dataclass(frozen=True)
class AnyOf:
    """Keep what any of ``policies`` keeps."""

    policies: tuple[Policy, ...]

    def keep(self, records: Sequence[Record]) -> set[str]:
        kept: set[str] = set()
        for p in self.policies:
            kept |= p.keep(records)
        return kept


@dataclass(frozen=True, kw_only=True)
class Retention:
    """A run's policy as one object: what ranks checkpoints (``monitor``, ``mode``) and how many to keep.

    As a run's own policy, a ``keep_*`` of None turns that rule off and no rule keeps everything. As settings a
    caller gives (``push(policy=...)``), None leaves the run's setting as it is (:meth:`over`).

    Example:
        >>> run = Retention(monitor="val_loss", mode="min", keep_best=1, keep_last=2)
        >>> Retention(keep_last=5).over(run).keep_last, Retention(keep_last=5).over(run).keep_best
        (5, 1)

    Args:
        monitor: the metric that ranks checkpoints. Default None.
        mode: ``"min"`` or ``"max"``: whether lower or higher ``monitor`` is better. Default None (``"min"``).
        keep_best: the best checkpoints by ``monitor`` to keep. Default None.
        keep_last: the most recent checkpoints to keep. Default None.
        keep_every: keep each epoch that is a multiple of this. Default None.
    """

    monitor: str | None = None
    mode: Mode | None = None
    keep_best: int | None = None
    keep_last: int | None = None
    keep_every: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in (None, "min", "max"):
            raise ConfigurationError(f"mode must be 'min' or 'max'. Received: mode={self.mode!r}")

    @property
    def objective(self) -> Objective:
        return Objective(self.monitor, self.mode or "min")

    @property
    def keeps_some(self) -> bool:
        """Whether any keep-* rule is set (else nothing is ever pruned)."""
        return any(v is not None for v in (self.keep_best, self.keep_last, self.keep_every))

    def over(self, base: Retention) -> Retention:
        """``base`` with each setting given here (not None) in its place."""
        given = {f.name: v for f in fields(self) if (v := getattr(self, f.name)) is not None}
        return replace(base, **given)

    def policy(self) -> Policy | None:
        """The combined keep-* policy; None when no rule is set (keep everything)."""
        parts: list[Policy] = []
        if self.keep_best is not None:
            if not self.monitor:
                raise ConfigurationError("keep_best needs a monitor (the metric to rank by). "
                                         f"Received: keep_best={self.keep_best}, monitor={self.monitor!r}")
            parts.append(KeepBest(self.keep_best, self.monitor, self.objective.mode))
        if self.keep_last is not None:
            parts.append(KeepLast(self.keep_last))
        if self.keep_every is not None:
            parts.append(KeepEvery(self.keep_every))
        return AnyOf(tuple(parts)) if parts else None

    def plan(self, records: Sequence[Record], *, always: AbstractSet[str] = frozenset()) -> set[str]:
        """Ids to delete under this policy (see :func:`plan_prune`)."""
        return plan_prune(records, self.policy(), always=always)


def plan_prune(
    records: Sequence[Record],
    policy: Policy | None,
    *,
    always: AbstractSet[str] = frozenset(),
) -> set[str]:
    """Ids to delete: everything the policy does not keep, minus pinned ones and ``always`` (latest, best, in-flight).

    With no policy nothing is deleted.
    """
    if policy is None:
        return set()
    keep = policy.keep(records) | set(always) | {r.id for r in records if r.pinned}
    doomed = {r.id for r in records} - keep
    log.debug("retention keeps %d, prunes %d: %s", len(keep), len(doomed), sorted(doomed))
    return doomed
