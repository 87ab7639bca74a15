"""Retention policies: pure, composable decisions of which checkpoints to keep. No I/O, no clock.

Each policy is a frozen dataclass with one method, ``keep(records) -> set of ids``. They see a minimal
:class:`Record` (id, epoch, step, metrics), in commit order, oldest first. :func:`plan_prune` combines a policy with
what is always kept — the latest, the best, pinned and protected (in-flight, being restored) checkpoints.

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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from .errors import ConfigurationError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Record:
    """What a policy may look at."""

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
        scored = [(r.metrics[self.monitor], i, r.id) for i, r in enumerate(records)
                  if self.monitor in r.metrics and not math.isnan(r.metrics[self.monitor])]
        sign = 1 if self.mode == "min" else -1
        scored.sort(key=lambda t: (sign * t[0], t[1]))
        return {cid for _, _, cid in scored[: self.k]} if self.k > 0 else set()


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


def policy_from(
    *, keep_best: int | None, keep_last: int | None, keep_every: int | None, monitor: str | None, mode: str
) -> Policy | None:
    """Build the combined policy from the keep-* settings; None when nothing is set (keep everything)."""
    parts: list[Policy] = []
    if keep_best is not None:
        if not monitor:
            raise ConfigurationError("keep_best needs a monitor (the metric to rank by). "
                                     f"Received: keep_best={keep_best}, monitor={monitor!r}")
        parts.append(KeepBest(keep_best, monitor, "max" if mode == "max" else "min"))
    if keep_last is not None:
        parts.append(KeepLast(keep_last))
    if keep_every is not None:
        parts.append(KeepEvery(keep_every))
    return AnyOf(tuple(parts)) if parts else None


def plan_prune(
    records: Sequence[Record],
    policy: Policy | None,
    *,
    always: set[str] = frozenset(),  # type: ignore[assignment]
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
