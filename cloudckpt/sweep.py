"""``gc`` against a live run: plan (:mod:`cloudckpt.garbage`), condemn through the index
(:mod:`cloudckpt.condemn`), then delete only what a landed index condemns.

A gc that dies between its condemn and its deletes leaves names condemned: the next gc deletes their objects at once
(whatever ``min_age``), so it finishes the job. ``dry_run`` writes nothing, the index included.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field

from . import failpoints, layout, retry
from .backends import Backend
from .changes import Change
from .commit import IndexKeeper
from .condemn import condemn, owner
from .garbage import plan_gc

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GcReport:
    """What a gc deleted (or, with ``dry_run``, would delete): objects, bytes, the uncommitted checkpoints among
    them, those left alone for ``min_age``, and the names its index update condemned."""

    deleted: list[str] = field(default_factory=list)
    bytes: int = 0
    checkpoints: list[str] = field(default_factory=list)
    kept_young: list[str] = field(default_factory=list)
    dry_run: bool = False
    condemned: list[str] = field(default_factory=list)
    young_objects: int = 0  #: objects left alone because they are younger than ``min_age`` (a later gc takes them)
    young_bytes: int = 0


def collect(backend: Backend, keeper: IndexKeeper, *, budget: float, dry_run: bool, min_age: float,
            busy: Callable[[], AbstractSet[str]], now: float | None = None) -> GcReport:
    """Run gc on the run ``keeper`` keeps (see :meth:`cloudckpt.CheckpointStore.gc`); ``busy`` names checkpoints
    this process has in flight (never condemned); ``now`` is the clock ``min_age`` is measured against."""
    url = backend.url
    head, _ = keeper.read()  # no index yet: a run whose first commit crashed still has leftovers
    index = keeper.read_all(head)  # a missing or altered segment stops gc: it can't know what is listed
    objects = retry.run(backend.list_objects, url=url, what="list objects", budget=budget)
    if not objects and not index.checkpoints:
        keeper.read_existing()  # nothing at all at the URL: say there is no run
    plan = plan_gc(objects, index, now=time.time() if now is None else now, min_age=min_age,
                   segments={layout.segment_key(r.sha256) for r in head.segments},
                   condemned={c.name for c in head.condemned}, reserved={r.name for r in head.reserved})
    held = busy()
    wanted = [name for name in plan.condemn if name not in held]
    if dry_run:
        doomed = sorted([*plan.delete, *(rel for name in wanted for rel in plan.condemn[name])])
        return GcReport(doomed, plan.bytes, sorted(plan.checkpoints), sorted(plan.kept_young), True, sorted(wanted),
                        plan.young_objects, plan.young_bytes)
    dead: set[str] = set()
    if wanted:
        expired = {r.name for r in head.reserved} & set(wanted)  # reserved, yet older than RESERVED_GRACE
        done = keeper.apply(lambda index: Change(condemn(index, wanted, keeper.segment, expired)), what="gc condemn")
        dead = {c.name for c in done.after.condemned}
        failpoints.hit("gc.after_condemn")
    condemned = sorted(name for name in wanted if name in dead)
    doomed = [*plan.delete, *(rel for name in condemned for rel in plan.condemn[name])]
    doomed = [rel for rel in doomed if owner(rel) not in held]
    if doomed:
        # defence in depth: never delete what the index lists now (a condemned name can't be listed)
        fresh_head, _ = keeper.read()
        fresh = keeper.read_all(fresh_head)
        listed = {key for c in fresh.checkpoints for key in layout.checkpoint_keys(c.id, (f.path for f in c.files))}
        listed |= {layout.segment_key(r.sha256) for r in fresh_head.segments}
        doomed = sorted(rel for rel in doomed if rel not in listed)
        failpoints.hit("gc.before_delete")
        retry.run(lambda: backend.delete(doomed), url=url, what="gc delete", budget=budget)
        log.info("gc removed %d objects (%d bytes) from %s", len(doomed), plan.bytes, url)
    checkpoints = sorted(c for c in plan.checkpoints if c not in plan.condemn or c in dead)
    return GcReport(doomed, plan.bytes, checkpoints, sorted(plan.kept_young), False, condemned, plan.young_objects,
                    plan.young_bytes)
