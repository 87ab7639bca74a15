"""The parts of a run's index besides its checkpoint entries: the run's policy, the writer's lease (the fence), the
record of applied updates (lost answers), references to sealed index segments and gc's condemned names. Pure data
and schema validation; the index itself is :class:`cloudckpt.manifest.Index`.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import Field, field_validator

from .entry import CheckpointEntry, _Frozen
from .layout import is_generated_id, segment_digest
from .retention import Retention

TOP_SCORES = 16  # best values a segment reference keeps (retention's keep_best up to this needs no segment read)


class RunPolicy(_Frozen):
    """What the run optimizes and keeps: monitor/mode pick the best; the keep-* counts drive retention."""

    monitor: str | None = None
    mode: Literal["min", "max"] = "min"
    keep_best: Annotated[int, Field(ge=0)] | None = None
    keep_last: Annotated[int, Field(ge=0)] | None = None
    keep_every: Annotated[int, Field(ge=1)] | None = None

    @property
    def retention(self) -> Retention:
        """This policy as the retention object the planner and callers use."""
        return Retention(monitor=self.monitor, mode=self.mode, keep_best=self.keep_best, keep_last=self.keep_last,
                         keep_every=self.keep_every)

    @classmethod
    def of(cls, retention: Retention) -> RunPolicy:
        """The stored form of ``retention`` (validated: a negative count is refused here)."""
        return cls.model_validate({**vars(retention), "mode": retention.objective.mode})


class WriterLease(_Frozen):
    """The writer that currently owns the run. A writer whose generation is lower has been superseded (fenced)."""

    id: str
    generation: Annotated[int, Field(ge=0)]
    host: str = ""
    since: datetime


class Applied(_Frozen):
    """The last index update one writer session made: its update number ``op`` and the index ``seq`` it wrote.

    A writer whose write lost its answer (timeout, reset) reads these back to learn whether that write happened,
    instead of guessing from the checkpoints listed (see :mod:`cloudckpt.commit`).
    """

    writer: Annotated[str, Field(pattern=r"^[0-9a-f]{8,32}$")]
    op: Annotated[int, Field(ge=1)]
    seq: Annotated[int, Field(ge=0)]


class SegmentRef(_Frozen):
    """What the index knows of one sealed segment without reading it (see :mod:`cloudckpt.segments`).

    ``sha256`` names the segment's object (``layout.segment_key``) and checks its bytes; the rest summarizes its
    checkpoints (in commit order) for resolution and retention: their count, first and last ids, how many are
    pinned, their epochs, and for the run's objective (``monitor``, ``mode``) how many have a value, the best
    :data:`TOP_SCORES` values (best first, each with its checkpoint's position in the segment) and the best
    checkpoint's entry.
    """

    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    count: Annotated[int, Field(ge=1)]
    first: str
    last: str
    pinned: Annotated[int, Field(ge=0)] = 0
    epoch_min: int | None = None  # None: some checkpoint has no epoch
    epoch_max: int | None = None
    epoch_gcd: int | None = None
    epochs_increasing: bool = False  # every checkpoint has an epoch, strictly increasing
    monitor: str | None = None
    mode: Literal["min", "max"] = "min"
    scored: Annotated[int, Field(ge=0)] = 0
    top: Annotated[tuple[tuple[float, Annotated[int, Field(ge=0)]], ...], Field(max_length=TOP_SCORES)] = ()
    best: CheckpointEntry | None = None


class Condemned(_Frozen):
    """A name ``gc`` condemned in the index update of ``seq``: an uncommitted checkpoint id or an unreferenced
    segment key (``_cloudckpt_index/<sha256>.json``). No later index may list or reference it
    (:mod:`cloudckpt.condemn`).
    """

    name: Annotated[str, Field(max_length=200)]
    seq: Annotated[int, Field(ge=1)]

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not (is_generated_id(v) or segment_digest(v) is not None):
            raise ValueError(f"not a checkpoint id or segment key gc may condemn: {v!r}")
        return v
