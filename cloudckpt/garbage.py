"""What ``gc`` may delete: objects of checkpoints the index doesn't list (crashed or fenced commits, pruned
checkpoints whose deletion was cut short) and temporary files. Pure: it sees the object list, the index and "now".

Only cloudckpt's own names are ever touched (checkpoint directories named ``ckpt-…``, ``.cloudckpt-tmp-`` files,
conditional-write probes left under ``_cloudckpt_probe/``, index segments ``_cloudckpt_index/<sha256>.json`` that
the index doesn't reference: left by a lost compare-and-swap or replaced since), so a run URL that shares a prefix
with other data never loses that data.

An unlisted checkpoint or unreferenced segment is not deleted on sight: its name is condemned in the index first
(:mod:`cloudckpt.condemn`), which is what keeps gc off a commit in flight; the plan says which names need that
(``condemn``) and which the index already condemns (deleted at once). ``min_age`` is an extra grace on top: a name
with an object younger than that is left alone (neither condemned nor deleted), so a slow upload is not made to
start over. Temporary files are deleted when older than ``min_age`` (a local writer holds its own locked, and gc
skips a locked one: :mod:`cloudckpt.backends.local`); conditional-write probes when older than ``min_age`` and
:data:`PROBE_GRACE` (a probe spoiled by gc is run again, but a store is refused when three in a row are).
"""

from __future__ import annotations

from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field

from .backends import ObjectInfo
from .layout import MANIFEST_NAME, PROBE_DIR, is_generated_id, is_scratch, segment_digest
from .manifest import Index

#: seconds a conditional-write probe object is kept whatever ``min_age`` (a probe takes a few requests)
PROBE_GRACE = 600.0
#: seconds a checkpoint reserved in the index (a push uploading again) is kept whatever ``min_age``
RESERVED_GRACE = 24 * 3600.0


@dataclass
class GcPlan:
    """Objects to delete (relative paths) and their bytes. ``condemn`` maps each name the index must condemn first
    to its objects (deleted only if the condemn lands); ``delete`` holds the rest (temporary files, probes, strays
    inside a listed checkpoint, objects of names already condemned). ``checkpoints``: the checkpoint directories
    concerned; ``kept_young``: those left alone because of ``min_age``; ``young_objects``/``young_bytes``: every
    object that age spared (those checkpoints', temporary files', strays')."""

    delete: list[str] = field(default_factory=list)
    condemn: dict[str, list[str]] = field(default_factory=dict)
    bytes: int = 0
    checkpoints: set[str] = field(default_factory=set)
    kept_young: set[str] = field(default_factory=set)
    young_objects: int = 0
    young_bytes: int = 0

    def spare(self, objs: list[ObjectInfo]) -> None:
        """Count ``objs`` as kept for their age."""
        self.young_objects += len(objs)
        self.young_bytes += sum(o.size for o in objs)

    def everything(self) -> list[str]:
        """Every object the plan deletes if all its names are condemned."""
        return sorted([*self.delete, *(rel for rels in self.condemn.values() for rel in rels)])


def plan_gc(objects: list[ObjectInfo], index: Index, *, now: float, min_age: float,
            segments: AbstractSet[str] = frozenset(), condemned: AbstractSet[str] = frozenset(),
            reserved: AbstractSet[str] = frozenset()) -> GcPlan:
    """What to delete given every object, the index with all its checkpoints listed (sealed ones too), the keys
    of the segments it references (never deleted), the names it condemns (their objects go whatever their age) and
    those it reserves (kept :data:`RESERVED_GRACE` at least)."""
    listed = {c.id: {f.path for f in c.files} | {MANIFEST_NAME} for c in index.checkpoints}
    groups: dict[str, list[ObjectInfo]] = {}
    plan = GcPlan()
    for obj in objects:
        top, _, rest = obj.rel.partition("/")
        if is_scratch(obj.rel):
            if now - obj.mtime >= (max(min_age, PROBE_GRACE) if top == PROBE_DIR else min_age):
                plan.delete.append(obj.rel)
                plan.bytes += obj.size
            else:
                plan.spare([obj])
            continue
        if segment_digest(obj.rel) is not None:
            if obj.rel not in segments:
                groups.setdefault(obj.rel, []).append(obj)
            continue
        if not rest or not is_generated_id(top):
            continue
        if top in listed:
            if rest not in listed[top] and now - obj.mtime >= min_age:
                plan.delete.append(obj.rel)  # a stray file inside a listed checkpoint: no commit can own it
                plan.bytes += obj.size
            elif rest not in listed[top]:
                plan.spare([obj])
            continue
        groups.setdefault(top, []).append(obj)
    for name, objs in groups.items():
        is_checkpoint = segment_digest(name) is None
        if name in condemned:
            plan.delete.extend(o.rel for o in objs)
        elif any(now - o.mtime < (max(min_age, RESERVED_GRACE) if name in reserved else min_age) for o in objs):
            if is_checkpoint:
                plan.kept_young.add(name)
            plan.spare(objs)
            continue
        else:
            plan.condemn[name] = sorted(o.rel for o in objs)
        if is_checkpoint:
            plan.checkpoints.add(name)
        plan.bytes += sum(o.size for o in objs)
    plan.delete.sort()
    return plan
