"""The newest checkpoint that can be used: the restore rule every adapter shares. Candidates are tried newest first;
one that fails verification or reading (an :class:`~cloudckpt.errors.IntegrityError`) is skipped, with a warning,
for the next older one, and the caller is told how many newer ones were skipped.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import TypeVar

from .entry import CheckpointEntry
from .errors import IntegrityError

log = logging.getLogger(__name__)

T = TypeVar("T")


def newest_usable(candidates: Iterable[CheckpointEntry], use: Callable[[CheckpointEntry], T], *,
                  none_usable: str, doing: str = "resumed from") -> T:
    """``use(entry)`` for the first of ``candidates`` (newest first) for which it does not raise IntegrityError.

    Raises:
        IntegrityError: none could be used: ``none_usable`` followed by each candidate's reason.
    """
    failures: list[str] = []
    for entry in candidates:
        try:
            result = use(entry)
        except IntegrityError as exc:
            log.warning("checkpoint %s can't be %s (%s); trying an older one", entry.id, doing, exc)
            failures.append(f"{entry.id}: {exc}")
            continue
        if failures:
            log.warning("using %s: %d newer checkpoint(s) failed verification or reading", entry.id, len(failures))
        return result
    raise IntegrityError(f"{none_usable}: " + "; ".join(failures))
