"""How ``gc`` and commits are ordered by the index itself, not by clocks. Pure: index in, index out.

gc never deletes an object because it looks old. It first *condemns* what it found unowned — checkpoint ids the
index doesn't list, segment keys it doesn't reference — by adding their names to ``Index.condemned`` in a
compare-and-swap (:func:`condemn`), and deletes only names condemned in an index that landed. Every index update
after that carries the list, and:

- a commit of a condemned id is refused (:func:`commit_refusal`); the push uploads again under a new id;
- a writer never references a condemned segment key: its sealing writes that segment under a fresh digest instead
  (:func:`cloudckpt.segments.avoid`).

Both sides go through the same compare-and-swap, so one of two orders holds. The commit (or the swap referencing a
new segment) landed first: gc's condemn, re-applied to the index that lists it, leaves it out. gc's condemn landed
first: the commit or swap, re-applied to an index that condemns the name, is refused or renamed. A write whose
answer was lost is settled by the index's ``applied`` records before anything is re-applied
(:mod:`cloudckpt.commit`), so neither side guesses.

The list is bounded (:data:`MAX_CONDEMNED`, oldest forgotten first). Forgetting a name must not let its slow writer
commit later, so the index keeps a ``horizon``: the seq of the newest update that condemned a forgotten name. A push
notes a seq at or below the index's before it uploads anything (``began``: that of the index its keeper last read or
wrote, no request); gc can only condemn its id in a later update (it saw its objects, which didn't exist before),
so when that name is forgotten ``began < horizon``, and a commit whose push began before the horizon is refused too.
Innocent pushes that began before the horizon are refused as well (they upload again): that takes
:data:`MAX_CONDEMNED` condemnations between the writer's previous index update and its commit.

A push condemned once uploads again under a new id it first *reserves* in the index (one more compare-and-swap,
only then): gc leaves a reserved name alone, so gc run back to back can't refuse the same push forever. The commit
releases it. A reservation whose writer died is forgotten after :data:`MAX_RESERVED` newer ones, or condemned once
its objects are older than ``garbage.RESERVED_GRACE`` (a clock used only to reclaim space: condemning a live
reservation refuses that push, which is safe).

Example:
    >>> from cloudckpt.manifest import Index
    >>> index = condemn(Index(seq=4), ["ckpt-e000001-0123abcd"])
    >>> [(c.name, c.seq) for c in index.condemned], commit_refusal(index, "ckpt-e000001-0123abcd", began=4) is not None
    ([('ckpt-e000001-0123abcd', 5)], True)
"""

from __future__ import annotations

from collections.abc import Iterable
from collections.abc import Set as AbstractSet

from .layout import segment_digest, segment_key
from .manifest import Condemned, Index
from .segments import Loader, full_view, no_segments

#: names an index keeps condemned; older ones are forgotten behind the horizon (about 60 bytes each)
MAX_CONDEMNED = 64
#: ids an index keeps reserved for pushes uploading again; older ones are forgotten (then gc may condemn them)
MAX_RESERVED = 16


def owner(rel: str) -> str:
    """The name gc condemns to delete object ``rel``: the segment key itself, or its top-level directory."""
    return rel if segment_digest(rel) is not None else rel.split("/", 1)[0]


def condemn(index: Index, names: Iterable[str], load: Loader = no_segments,
            expired: AbstractSet[str] = frozenset()) -> Index | None:
    """``index`` with ``names`` condemned, minus those it lists (checkpoint ids, sealed ones too) or references
    (segment keys), those already condemned and those it reserves (but for ``expired`` ones, whose reservation gc
    saw too old); None when nothing is new. The oldest names beyond :data:`MAX_CONDEMNED` are forgotten and the
    horizon moves past them."""
    known = {c.name for c in index.condemned} | ({r.name for r in index.reserved} - set(expired))
    wanted = [n for n in dict.fromkeys(names) if n not in known]
    if not wanted:
        return None
    listed = {c.id for c in full_view(index, load).checkpoints} if index.segments else {c.id for c in
                                                                                         index.checkpoints}
    referenced = {segment_key(r.sha256) for r in index.segments}
    new = [n for n in wanted if n not in listed and n not in referenced]
    if not new:
        return None
    seq = index.seq + 1
    kept = (*index.condemned, *(Condemned(name=n, seq=seq) for n in new))
    dropped, kept = kept[:-MAX_CONDEMNED], kept[-MAX_CONDEMNED:]
    horizon = max([index.horizon, *(c.seq for c in dropped)])
    reserved = tuple(r for r in index.reserved if r.name not in new)
    return index.model_copy(update={"condemned": kept, "horizon": horizon, "reserved": reserved, "seq": seq})


def reserve(index: Index, cid: str) -> Index | None:
    """``index`` with ``cid`` reserved for a push about to upload it (the oldest beyond :data:`MAX_RESERVED`
    forgotten); None if it is already."""
    if any(r.name == cid for r in index.reserved):
        return None
    seq = index.seq + 1
    kept = (*index.reserved, Condemned(name=cid, seq=seq))[-MAX_RESERVED:]
    return index.model_copy(update={"reserved": kept, "seq": seq})


def released(index: Index, cid: str) -> Index:
    """``index`` without ``cid``'s reservation (its commit)."""
    if not any(r.name == cid for r in index.reserved):
        return index
    return index.model_copy(update={"reserved": tuple(r for r in index.reserved if r.name != cid)})


def commit_refusal(index: Index, cid: str, *, began: int) -> str | None:
    """Why ``index`` refuses to list ``cid``, whose push began when the index's seq was ``began``; None if it may."""
    if any(c.name == cid for c in index.condemned):
        return f"gc condemned the uncommitted checkpoint {cid} (index seq {index.seq})"
    if began < index.horizon:
        return (f"the push of {cid} began at index seq {began}, before gc's horizon {index.horizon} (ids condemned "
                "before it are no longer named)")
    return None


def condemned_segments(index: Index) -> frozenset[str]:
    """The segment keys ``index`` condemns."""
    return frozenset(c.name for c in index.condemned if segment_digest(c.name) is not None)
