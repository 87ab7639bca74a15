"""The best a resumed run may believe: the best of the checkpoints the store committed, not of those only saved.

Keras' ``ModelCheckpoint`` moves its ``best`` when it decides to save; the callback's resume state records it. If
that save's upload then fails, a later checkpoint's state would carry a best the store does not have, and a run
resumed from it would never save again until it beats a score nobody kept. So each save point says what it moved
(:class:`Moved`: Keras' ``best`` and the callback's ``best_seen``), and the state written into a checkpoint just
before its push (:meth:`CommittedBest.state_for`, on the uploader's thread) carries the values of the checkpoints
committed before it — or its own, when it moved them to better ones (if it is not committed, its state is never
read). Pushes run in order, so when a checkpoint is pushed every earlier one has committed or failed; a failed one
retried later commits with the better of its own values and those committed meanwhile.

Example:
    >>> from cloudckpt.retention import Objective
    >>> best = CommittedBest(Objective("val_loss", "min"), best=0.5, seen=0.5)
    >>> best.values(Moved(best=0.4, seen=0.4))      # a checkpoint that improved: its own values
    (0.4, 0.4)
    >>> best.values(Moved())                        # the one after it, while its upload failed: the committed ones
    (0.5, 0.5)
    >>> best.committed(Moved(best=0.4, seen=0.4)); best.values(Moved())
    (0.4, 0.4)
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from ..retention import Objective
from . import state as st


@dataclass(frozen=True)
class Moved:
    """What one save point moved: Keras' ``best`` (None: unchanged) and the callback's ``best_seen`` (None:
    unchanged)."""

    best: float | None = None
    seen: float | None = None


class CommittedBest:
    """The best values among committed checkpoints (thread safe: read and updated on the uploader's thread)."""

    def __init__(self, objective: Objective, *, best: float | None, seen: float | None) -> None:
        self.objective = objective
        self._lock = threading.Lock()
        self.best, self.seen = best, seen

    def values(self, moved: Moved) -> tuple[float | None, float | None]:
        """(best, best_seen) to record in a checkpoint that moved ``moved``: the better of its own and the
        committed ones (its own, unless it is a retry that commits after a better one did)."""
        with self._lock:
            return self._better(moved.best, self.best), self._better(moved.seen, self.seen)

    def _better(self, mine: float | None, committed: float | None) -> float | None:
        if mine is None:
            return committed
        return mine if committed is None or not self.objective.better(committed, mine) else committed

    def committed(self, moved: Moved) -> None:
        """A checkpoint that moved ``moved`` was committed (a retried older best never lowers what is recorded)."""
        with self._lock:
            if moved.best is not None and (self.best is None or self.objective.better(moved.best, self.best)):
                self.best = moved.best
            if moved.seen is not None and (self.seen is None or self.objective.better(moved.seen, self.seen)):
                self.seen = moved.seen

    def resolve(self, state: st.ResumeState, moved: Moved) -> st.ResumeState:
        """``state`` (staged by a save point that moved ``moved``) with the committed values."""
        best, seen = self.values(moved)
        return state.model_copy(update={"best": best, "best_seen": seen})
