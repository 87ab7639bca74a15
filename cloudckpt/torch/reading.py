"""Reading a :class:`~cloudckpt.torch.CheckpointManager` checkpoint back: in one process, or on every rank of a
``torch.distributed`` job (rank 0 resolves the selector, every rank reads that same checkpoint)."""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CheckpointNotFoundError, ConfigurationError, IntegrityError
from ..fallback import newest_usable
from ..manifest import CheckpointEntry
from ..restore import DCP_FORMAT
from ..store import CheckpointStore
from . import ranks as _ranks
from .state import STATE_FILE, read_state

log = logging.getLogger(__name__)


def is_dcp(entry: CheckpointEntry) -> bool:
    """True for a checkpoint written through DCP (a sharded state)."""
    return entry.meta.get("format") == DCP_FORMAT


def _dcp_failure(exc: BaseException) -> bool:
    """DCP's CheckpointException (a BaseException): another rank's read failed."""
    return type(exc).__name__ == "CheckpointException"


@dataclass(frozen=True)
class Restored:
    """A checkpoint read back: its ``state`` (tensors on ``map_location``), step, epoch, metrics and index entry."""

    state: Any
    step: int | None
    epoch: int | None
    metrics: dict[str, float] = field(default_factory=dict)
    entry: CheckpointEntry | None = None


@dataclass
class Reader:
    """What :meth:`CheckpointManager.restore <cloudckpt.torch.CheckpointManager.restore>` does (see there)."""

    store: CheckpointStore
    remote: str | None
    staging: Path
    ranks: _ranks.Ranks | None
    dcp_options: dict[str, Any]

    def restore(self, selector: str | int, map_location: Any, state: Any) -> Restored | None:
        if self.ranks is None:
            found = self.candidates(selector)
        else:  # rank 0 resolves, every rank reads the same ids (or raises the same error)
            answer: Any = None
            failed: Exception | None = None
            if self.ranks.coordinator:
                try:
                    answer = [c.id for c in self.candidates(selector) or []]
                except Exception as exc:  # noqa: BLE001 - told to every rank, then raised here
                    answer, failed = _ranks.error_record(exc), exc
            shared = self.ranks.share(answer)
            if failed is not None:
                raise failed
            if isinstance(shared, dict):
                raise _ranks.error_from(shared)
            index = self.store.index() if shared else None
            found = None if index is None else [index.get(cid) for cid in shared]
        if not found:
            return None
        if self.ranks is not None:
            return self._read_everywhere(found, selector, map_location, state)
        if selector == "latest":
            return newest_usable(found, lambda entry: self.read(entry, map_location, state), doing="restored",
                                 none_usable=f"{self.store.url}: no checkpoint of this manager can be restored")
        return self.read(found[0], map_location, state)

    def candidates(self, selector: str | int) -> list[CheckpointEntry] | None:
        """The checkpoints ``selector`` may name, newest first (several only for ``"latest"``); None: none yet."""
        try:
            index = self.store.index()
        except CheckpointNotFoundError:
            return None
        ours = [c for c in index.checkpoints if any(f.path == STATE_FILE for f in c.files) or is_dcp(c)]
        if not ours:
            return None
        if isinstance(selector, int):
            matches = [c for c in ours if c.step == selector]
            if not matches:
                raise CheckpointNotFoundError(f"{self.store.url}: no checkpoint at step {selector}")
            return [matches[-1]]
        if selector != "latest":
            return [index.resolve(selector)]
        return list(reversed(ours))  # the latest was maybe pushed by another tool: the newest of ours first

    def _read_everywhere(self, found: list[CheckpointEntry], selector: str | int, map_location: Any,
                         state: Any) -> Restored:
        """Every rank reads the same candidate; ``"latest"`` moves on to an older one together when a rank can't."""
        assert self.ranks is not None
        reasons = []
        for entry in found:
            error: BaseException | None = None
            restored: Restored | None = None
            try:
                restored = self.read(entry, map_location, state)
            except BaseException as exc:  # told to every rank (DCP's CheckpointException: another rank's failed)
                if not isinstance(exc, Exception) and not _dcp_failure(exc):
                    raise
                error = exc
            usable = error is None or isinstance(error, IntegrityError) or _dcp_failure(error)
            worst = self.ranks.max(0.0 if error is None else 1.0 if usable else 2.0)
            if worst == 0.0 and restored is not None:
                return restored
            if worst == 2.0 or selector != "latest":
                raise _ranks.read_failed(error)
            why = error or "another rank could not read it"
            log.warning("checkpoint %s can't be restored on every rank (%s); trying an older one", entry.id, why)
            reasons.append(f"{entry.id}: {why}")
        raise IntegrityError(f"{self.store.url}: no checkpoint of this manager can be restored: " + "; ".join(reasons))

    def read(self, entry: CheckpointEntry, map_location: Any, state: Any = None) -> Restored:
        if is_dcp(entry):
            if state is None:
                raise ConfigurationError(f"{self.store.url}: checkpoint {entry.id} is sharded (saved through DCP): "
                                         f"pass restore(state=...), the state to load it into")
            from .sharded import load_sharded  # DCP is imported only when used

            load_sharded(self.remote, entry, state, self.ranks, self.dcp_options)
            log.info("restored %s (step %s, sharded) from %s", entry.id, entry.step, self.store.url)
            return Restored(state, entry.step, entry.epoch, dict(entry.metrics), entry)
        to = self.staging / f"restore-{entry.id}"
        try:
            pulled = self.store.pull(entry.id, to=to)
            loaded = read_state(pulled.path, map_location)
        finally:
            shutil.rmtree(to, ignore_errors=True)
        log.info("restored %s (step %s) from %s", entry.id, entry.step, self.store.url)
        return Restored(loaded, entry.step, entry.epoch, dict(entry.metrics), entry)
