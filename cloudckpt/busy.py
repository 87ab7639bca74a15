"""Which checkpoint ids this process is using right now (committing or restoring): retention never prunes them and
gc never condemns them."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager


class BusySet:
    """Checkpoint ids this process is committing or restoring: retention never prunes them.

    Example:
        >>> busy = BusySet()
        >>> with busy.holding("ckpt-a"):
        ...     sorted(busy.ids())
        ['ckpt-a']
        >>> busy.ids()
        frozenset()
    """

    def __init__(self) -> None:
        self._held: Counter[str] = Counter()
        self._lock = threading.Lock()

    @contextmanager
    def holding(self, cid: str) -> Iterator[None]:
        with self._lock:
            self._held[cid] += 1
        try:
            yield
        finally:
            with self._lock:
                self._held[cid] -= 1
                if not self._held[cid]:
                    del self._held[cid]

    def ids(self) -> frozenset[str]:
        with self._lock:
            return frozenset(self._held)
