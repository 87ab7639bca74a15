"""Finding runs: the runs stored under a prefix that is not itself a run (``cloudckpt ls s3://bucket/runs/``).

A run is a prefix holding ``index.json`` (:data:`~cloudckpt.layout.INDEX_NAME`); one nested inside another run (a
checkpoint's own file that happens to be called ``index.json``) is not a run. Each run is summarized from its
index's head (read and validated like any index) and the listing: its latest, its best and the bytes under it.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import TYPE_CHECKING

from . import retry
from .backends.base import ObjectInfo
from .errors import CloudCkptError
from .layout import INDEX_NAME
from .manifest import Index, parse_index

if TYPE_CHECKING:
    from .store import CheckpointStore


def run_sizes(objects: Sequence[ObjectInfo]) -> dict[str, int]:
    """Each run's prefix (relative, no trailing ``/``) -> bytes stored under it, outermost runs only. Pure.

    Example:
        >>> objs = [ObjectInfo("a/index.json", 10, 0), ObjectInfo("a/c1/index.json", 5, 0), ObjectInfo("b/x", 1, 0)]
        >>> run_sizes(objs)
        {'a': 15}
    """
    found = sorted(o.rel[:-len(INDEX_NAME) - 1] for o in objects if o.rel.endswith("/" + INDEX_NAME))
    runs: list[str] = []
    for prefix in found:  # sorted: a run comes before anything nested in it
        if not any(prefix.startswith(r + "/") for r in runs):
            runs.append(prefix)
    sizes = dict.fromkeys(runs, 0)
    for o in objects:
        owner = next((r for r in runs if o.rel.startswith(r + "/")), None)
        if owner is not None:
            sizes[owner] += o.size
    return sizes


def summary(url: str, index: Index, size: int) -> dict:
    """One run as ``ls`` shows it: its URL, checkpoint count, size, and its latest and best (id, epoch, metrics)."""
    def brief(cid: str | None) -> dict | None:
        if cid is None:
            return None
        c = index.get(cid)
        return {"id": c.id, "epoch": c.epoch, "step": c.step, "created": c.created.isoformat(), "metrics": c.metrics}

    count = len(index.checkpoints) + sum(r.count for r in index.segments)
    return {"url": url, "checkpoints": count, "size": size, "monitor": index.run.monitor,
            "latest": brief(index.latest), "best": brief(index.best), "error": None}


def find_runs(store: CheckpointStore) -> list[dict]:
    """The runs under ``store``'s URL (which holds no run itself), each summarized; a run whose index can't be read
    or is invalid is listed with its ``error``."""
    objects = retry.run(store.backend.list_objects, url=store.url, what="list objects", budget=store.budget)
    rows = []
    for prefix, size in run_sizes(objects).items():
        url = f"{store.url}/{prefix}"
        try:
            data = retry.run(partial(store.backend.read_bytes, f"{prefix}/{INDEX_NAME}"), url=url,
                             what="read index", budget=store.budget)
            rows.append(summary(url, parse_index(data), size))
        except CloudCkptError as exc:
            rows.append({"url": url, "checkpoints": None, "size": size, "monitor": None, "latest": None,
                         "best": None, "error": str(exc)})
    return rows
