"""Fault injection at the backend boundary of a real store: a call is carried out, then its answer is lost.

:class:`LostAnswers` wraps the real backend of a :class:`~cloudckpt.CheckpointStore` (local, S3 on moto, GCS on
fake-gcs-server): the chosen method really runs against the store, then ``after`` (another writer's move, to pin an
interleaving) runs, then a ``ConnectionError`` is raised as a timeout or reset would be. With ``happen=False`` the
call is dropped before it reaches the store instead. Nothing about the store is faked: only the answer is lost.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from cloudckpt import CheckpointStore


class LostAnswers:
    """Proxy to a real backend whose ``method`` loses its answer ``times`` times (then answers normally)."""

    def __init__(self, backend: Any, method: str = "write_index", *, times: int = 1,
                 after: Callable[[], None] | None = None, happen: bool = True) -> None:
        self._real = backend
        self._method = method
        self.left = times
        self._after = after
        self._happen = happen
        self.lost = 0

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._real, name)
        if name != self._method or not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            if self.left <= 0:
                return attr(*args, **kwargs)
            self.left -= 1
            if self._happen:
                attr(*args, **kwargs)  # the store carries the request out ...
            if self._after is not None:
                self._after()  # ... another writer moves meanwhile ...
            self.lost += 1
            raise ConnectionError(f"injected: the answer to {name} was lost")  # ... and the answer never arrives

        return call


def lose_answers(store: CheckpointStore, method: str = "write_index", **kwargs: Any) -> LostAnswers:
    """Wrap ``store``'s backend (the one its index keeper uses too) and return the wrapper."""
    wrapper = LostAnswers(store.backend, method, **kwargs)
    store.backend = store.keeper.backend = wrapper  # type: ignore[assignment]
    return wrapper
