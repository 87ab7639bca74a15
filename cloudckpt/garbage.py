"""What ``gc`` may delete: objects of checkpoints the index doesn't list (crashed or fenced commits, pruned
checkpoints whose deletion was cut short) and temporary files. Pure: it sees the object list, the index and "now".

Only cloudckpt's own names are ever touched (checkpoint directories named ``ckpt-…``, ``.cloudckpt-tmp-`` files,
conditional-write probes left under ``_cloudckpt_probe/``, index segments ``_cloudckpt_index/<sha256>.json`` that
the index doesn't reference: left by a lost compare-and-swap or replaced since), so a run URL that shares a prefix
with other data never loses that data. A checkpoint directory with any object younger than ``min_age`` seconds is
left alone: it may be an upload in flight.
"""

from __future__ import annotations

from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field

from .backends import ObjectInfo
from .layout import MANIFEST_NAME, is_generated_id, is_scratch, segment_digest
from .manifest import Index


@dataclass
class GcPlan:
    """Objects to delete (relative paths), their bytes, and the checkpoint directories they belong to."""

    delete: list[str] = field(default_factory=list)
    bytes: int = 0
    checkpoints: set[str] = field(default_factory=set)
    kept_young: set[str] = field(default_factory=set)


def plan_gc(objects: list[ObjectInfo], index: Index, *, now: float, min_age: float,
            segments: AbstractSet[str] = frozenset()) -> GcPlan:
    """What to delete given every object, the index with all its checkpoints listed (sealed ones too) and the keys
    of the segments it references (never deleted)."""
    listed = {c.id: {f.path for f in c.files} | {MANIFEST_NAME} for c in index.checkpoints}
    groups: dict[str, list[ObjectInfo]] = {}
    plan = GcPlan()
    for obj in objects:
        top, _, rest = obj.rel.partition("/")
        if is_scratch(obj.rel) or (segment_digest(obj.rel) is not None and obj.rel not in segments):
            if now - obj.mtime >= min_age:
                plan.delete.append(obj.rel)
                plan.bytes += obj.size
            continue
        if not rest or not is_generated_id(top):
            continue
        if top in listed:
            if rest not in listed[top]:
                groups.setdefault(top, []).append(obj)  # a stray file inside a listed checkpoint
            continue
        groups.setdefault(top, []).append(obj)
    for top, objs in groups.items():
        if any(now - o.mtime < min_age for o in objs):
            plan.kept_young.add(top)
            continue
        plan.checkpoints.add(top)
        plan.delete.extend(o.rel for o in objs)
        plan.bytes += sum(o.size for o in objs)
    plan.delete.sort()
    return plan
