"""Names a user gives checkpoints (tags) and the selectors they must not shadow. Pure.

A tag is a letter, then up to 63 letters, digits, ``.``, ``_`` or ``-``; a run's tag names one checkpoint at a time
(tagging another moves it). Keywords of selectors (``best``, ``latest``, ``latest-model``, ``pinned``) and names
shaped like generated checkpoint ids are refused, so ``pull NAME`` never means two things.
"""

from __future__ import annotations

import re

from .layout import is_generated_id

MAX_TAGS = 32  # tags one checkpoint may carry
LATEST_MODEL = "latest-model"  # the selector of the newest checkpoint that holds a model
RESERVED = frozenset({"best", "latest", LATEST_MODEL, "pinned"})
_TAG = re.compile(r"^[A-Za-z][A-Za-z0-9._-]{0,63}$")


def tag_problem(name: object) -> str | None:
    """Why ``name`` can't be a tag, or None.

    Example:
        >>> tag_problem("release-1"), tag_problem("best")
        (None, "invalid tag 'best': reserved (best, latest, latest-model, pinned and checkpoint ids)")
    """
    if not isinstance(name, str) or not _TAG.match(name):
        return f"invalid tag {name!r}: a letter, then up to 63 letters, digits, '.', '_' or '-'"
    if name in RESERVED or is_generated_id(name):
        return f"invalid tag {name!r}: reserved (best, latest, latest-model, pinned and checkpoint ids)"
    return None
