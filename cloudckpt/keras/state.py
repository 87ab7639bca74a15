"""What a CloudCheckpoint checkpoint holds besides the user's file: the resume state and the entry's metadata.

Two models, written by the callback and read back from the store — where they are input, not instructions, so each
is parsed through one funnel that turns anything malformed into an :class:`~cloudckpt.errors.IntegrityError`:

- :class:`ResumeState`, ``cloudckpt_state/state.json``: the position (epoch, batches done in it, global step), the
  callback's best value and save-frequency counters, which variables the checkpoint's Keras file covers and the
  layout (path and shape) of every variable. Beside it, ``variables.npz`` holds the variables the file does not
  (and the host random generators' states, keys ``rng_*``). :func:`write_state` / :func:`read_state`.
- :class:`CheckpointMeta`, the index entry's ``meta``: whether the checkpoint holds a Keras file (``kind``), its name
  in the checkpoint (``file``) and in the callback's folder (``local_file``).

:class:`SavePoint` is what the callback hands the uploader for one save point's push (the entry's fields, the run's
policy).

Example:
    >>> import tempfile, numpy as np
    >>> layout = {"model": [("dense/kernel", [2, 1])], "optimizer": [], "metrics": []}
    >>> state = ResumeState(epoch=0, epoch_done=True, initial_epoch=1, global_step=8, layout=layout)
    >>> d = write_state(Path(tempfile.mkdtemp()), {"model_0": np.zeros((2, 1))}, state).parent
    >>> read_state(d)[0].global_step
    8
    >>> CheckpointMeta.of({"kind": "model", "batch": "0", "file": "m.keras"}).to_meta()["file"]
    'm.keras'
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, Strict, ValidationError, field_validator, model_validator

from ..errors import IntegrityError
from ..manifest import RunPolicy, check_relative_path

Group = Literal["model", "optimizer", "metrics"]
STATE_DIR = "cloudckpt_state"
STATE_JSON = "state.json"
VARIABLES = "variables.npz"
MARKER = f"{STATE_DIR}/{STATE_JSON}"  # a checkpoint holding this was written by CloudCheckpoint
FORMAT: Literal[1, 2, 3] = 2
SHARDED_FORMAT: Literal[3] = 3  # model and optimizer variables in shards (cloudckpt.keras.shards), not here
READABLE_FORMATS = (1, 2, 3)  # 1: every variable in variables.npz (cloudckpt 0.1)
GROUPS: tuple[Group, ...] = ("model", "optimizer", "metrics")
EPOCH_RNG = "rng_epoch_"  # key prefix of the host generators' states at the start of a checkpoint's epoch

_Count = Annotated[int, Strict(), Field(ge=0)]
_Variable = Annotated[tuple[Annotated[str, Strict()], list[_Count]], Strict(False)]  # [path, shape] (a JSON list)
Layout = dict[Group, list[_Variable]]
Covered = dict[Literal["model", "optimizer"], list[_Count]]  # variables a weights file holds: indices per group
_NOT_NUMBERS = "SUOMm"  # numpy dtype kinds: bytes, str, object, datetime, timedelta (bfloat16 loads as void: kept)


class ResumeState(BaseModel):
    """``state.json``: where the run stood at a save point, and what ``variables.npz`` and the Keras file hold.

    Attributes:
        epoch: the (0-based) epoch of the save point; ``epoch_done`` whether it had finished.
        batches_done: batches of ``epoch`` trained (mid-epoch saves only).
        initial_epoch: the epoch ``fit`` resumes at.
        global_step: the optimizer's iterations.
        logs: the batch or epoch logs at the save point (finite values only).
        best, best_seen: ModelCheckpoint's best value and the callback's best over all save points.
        batches_seen_since_last_saving, last_batch_seen: ModelCheckpoint's save-frequency counters.
        user_file, keras_version: what Keras wrote at this save point and which Keras wrote it (informational).
        weights_file: the checkpoint's Keras 3 weights file that holds the ``covered`` variables (indices per group).
        shards: format 3: the metadata of the shards that hold every model and optimizer variable
            (:mod:`cloudckpt.keras.shards`); ``variables.npz`` then holds only metrics and generator states.
        layout: path and shape of every model, optimizer and metric variable, copied or covered.
    """

    model_config = ConfigDict(extra="ignore", strict=True, frozen=True)

    format: Literal[1, 2, 3] = FORMAT
    epoch: _Count
    epoch_done: bool
    batches_done: _Count | None = None
    initial_epoch: _Count
    global_step: _Count
    logs: dict[str, float] = {}
    best: float | None = None
    best_seen: float | None = None
    batches_seen_since_last_saving: _Count = 0
    last_batch_seen: int | None = None
    user_file: str | None = None
    keras_version: str | None = None
    weights_file: str | None = None
    covered: Covered | None = None
    shards: Literal["cloudckpt_shards/metadata.json"] | None = None
    layout: Layout

    @field_validator("weights_file")
    @classmethod
    def _plain_name(cls, v: str | None) -> str | None:
        if v is not None and "/" in check_relative_path(v):
            raise ValueError(f"weights file {v!r} is not a plain file name")
        return v

    @field_validator("layout")
    @classmethod
    def _groups(cls, v: Layout) -> Layout:
        if set(v) != set(GROUPS):
            raise ValueError(f"layout must name the groups {GROUPS}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> ResumeState:
        if not self.epoch_done and self.batches_done is None:
            raise ValueError("a mid-epoch state without batches_done")
        if (self.shards is not None) != (self.format == SHARDED_FORMAT) or (self.shards and self.covered):
            raise ValueError("a sharded state (format 3) names its shards' metadata and covers nothing else")
        if self.covered and not self.weights_file:
            raise ValueError("covered variables without a weights_file to load them from")
        for group, indices in (self.covered or {}).items():
            if any(i >= len(self.layout[group]) for i in indices):
                raise ValueError(f"covered {group} variables beyond its layout")
        return self

    @property
    def batches_to_skip(self) -> int:
        """Batches of ``epoch`` a resume skips: 0 after a finished epoch."""
        return 0 if self.epoch_done else int(self.batches_done or 0)

    def covers(self, group: Group) -> set[int]:
        """Indices of ``group``'s variables that the weights file or the shards hold (not in ``variables.npz``)."""
        if self.shards is not None and group != "metrics":
            return set(range(len(self.layout[group])))
        return set(self.covered.get(group, ())) if self.covered and group != "metrics" else set()


def write_state(directory: Path, arrays: Mapping[str, np.ndarray], state: ResumeState) -> Path:
    """Write ``cloudckpt_state/`` (the captured ``arrays`` and ``state`` as JSON) into ``directory``; return it."""
    out = Path(directory) / STATE_DIR
    out.mkdir(parents=True, exist_ok=True)
    with open(out / VARIABLES, "wb") as f:
        named: dict[str, Any] = dict(arrays)  # savez's own keywords are typed too: a Mapping would not pass
        np.savez(f, **named)
    write_state_json(directory, state)
    return out


def write_state_json(directory: Path, state: ResumeState) -> None:
    """Write (or rewrite) ``directory``'s ``cloudckpt_state/state.json``."""
    out = Path(directory) / STATE_DIR
    out.mkdir(parents=True, exist_ok=True)
    # python mode keeps an infinite best an IEEE float (json writes Infinity), as the JSON mode would not
    (out / STATE_JSON).write_text(json.dumps(state.model_dump(), indent=1))


def read_state(directory: Path, files: Iterable[str] | None = None) -> tuple[ResumeState, dict[str, np.ndarray]]:
    """The checkpoint's resume state and variables, checked against each other and (when given) the checkpoint's
    ``files``: IntegrityError when it holds none or anything is malformed."""
    src = Path(directory) / STATE_DIR
    try:
        doc = json.loads((src / STATE_JSON).read_text())
        with np.load(src / VARIABLES, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except FileNotFoundError as exc:
        raise IntegrityError(f"{directory}: checkpoint holds no cloudckpt resume state ({exc.filename})") from None
    except Exception as exc:  # noqa: BLE001 - zipfile, zlib, numpy, json: any failure to read bucket bytes
        raise IntegrityError(f"{directory}: unreadable resume state: {str(exc)[:200] or type(exc).__name__}") from None
    if not isinstance(doc, dict) or doc.get("format") not in READABLE_FORMATS:
        shown = doc.get("format") if isinstance(doc, dict) else doc
        raise IntegrityError(f"{directory}: unknown resume state format {shown!r}")
    state = parse_state(doc, files)
    check_arrays(state, arrays)
    return state, arrays


def parse_state(doc: Any, files: Iterable[str] | None = None) -> ResumeState:
    """``doc`` (a parsed ``state.json``) as a :class:`ResumeState` whose weights file is one of ``files`` (the
    checkpoint's paths, when given); IntegrityError otherwise."""
    state = _validated(ResumeState, doc, "resume state")
    if state.weights_file and files is not None and state.weights_file not in set(files):
        raise IntegrityError(f"the resume state's weights file {state.weights_file!r} is not in the checkpoint")
    return state


def check_arrays(state: ResumeState, arrays: Mapping[str, np.ndarray]) -> None:
    """IntegrityError unless every stored variable is a number array of its layout's shape, and every model and
    optimizer variable the weights file does not cover is stored (metric accumulators only mid-epoch)."""
    for group in GROUPS:
        covered = state.covers(group)
        for i, (path, shape) in enumerate(state.layout[group]):
            value = arrays.get(f"{group}_{i}")
            if value is None:
                if group != "metrics" and i not in covered:
                    raise IntegrityError(f"the resume state lacks {group} variable {path}")
                continue
            if value.dtype.kind in _NOT_NUMBERS:
                raise IntegrityError(f"the resume state's {group} variable {path} holds {value.dtype}, not numbers")
            if list(value.shape) != list(shape):
                raise IntegrityError(f"the resume state's {group} variable {path} has shape {list(value.shape)}, "
                                     f"its layout says {shape}")


class CheckpointMeta(BaseModel):
    """The index entry's ``meta`` of a CloudCheckpoint checkpoint (all strings in the index).

    Attributes:
        kind: ``"model"`` when the checkpoint holds the file Keras wrote, ``"state"`` for the resume state alone.
        batch: batches of the epoch done at the save point (0 at an epoch's end).
        epoch_done: whether the save point ended an epoch.
        file: the Keras file's name in the checkpoint (a plain relative path).
        local_file: where it lives, relative to the callback's folder (a plain relative path).
        local_path: written by cloudckpt 0.1.0 (an absolute path); read only to be warned about, never acted on.
    """

    model_config = ConfigDict(extra="ignore", frozen=True)

    kind: Literal["model", "state"] | None = None
    batch: Annotated[int, Field(ge=0)] | None = None
    epoch_done: bool | None = None
    file: str | None = None
    local_file: str | None = None
    local_path: str | None = None

    @field_validator("file", "local_file")
    @classmethod
    def _relative(cls, v: str | None) -> str | None:
        return None if v is None else check_relative_path(v)

    @classmethod
    def of(cls, meta: Mapping[str, str]) -> CheckpointMeta:
        """Parse an entry's ``meta`` (read from the store); IntegrityError when it is malformed."""
        return _validated(cls, dict(meta), "checkpoint metadata")

    def to_meta(self) -> dict[str, str]:
        """As the index holds it: strings, booleans lower case, unset fields left out."""
        return {k: str(v).lower() if isinstance(v, bool) else str(v)
                for k, v in self.model_dump(exclude_none=True).items()}


@dataclass(frozen=True)
class SavePoint:
    """One save point's :meth:`~cloudckpt.store.CheckpointStore.push`, besides the staged files.

    Attributes:
        epoch: epochs finished or begun (1-based, the index entry's ``epoch``); step: the global step.
        metrics: the finite logs to record (a state-only checkpoint's without the monitored value).
        meta: the entry's metadata; policy: the run's policy, applied in the same index update.
    """

    epoch: int
    step: int
    metrics: dict[str, float]
    meta: CheckpointMeta
    policy: RunPolicy

    def push_args(self) -> dict[str, Any]:
        """The keyword arguments of the push (the uploader's job)."""
        return dict(epoch=self.epoch, step=self.step, metrics=self.metrics, meta=self.meta.to_meta(),
                    policy=self.policy.retention, inline_small=True)  # the resume state rides in the manifest


def _validated(model: type[Any], doc: Any, what: str) -> Any:
    try:
        return model.model_validate(doc)
    except ValidationError as exc:  # check_relative_path's UnsafePathError arrives as one too (a ValueError)
        err = exc.errors()[0]
        raise IntegrityError(f"invalid {what} at {'.'.join(map(str, err['loc'])) or '<root>'}: "
                             f"{err['msg']}") from None
