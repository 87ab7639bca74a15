"""The sync service: watch a directory that any trainer writes into and commit each finished checkpoint.

Each entry directly inside the watched directory (a file, or a directory of files) is a checkpoint candidate. It is
*finished* when nothing in it has changed (names, sizes, mtimes) for ``settle`` seconds; it is then pushed as one
checkpoint, and pushed again as a new checkpoint whenever it changes and settles again (a trainer that overwrites
``model.keras`` every epoch gets one checkpoint per epoch). Hidden entries and ``*.tmp``/``*.partial``/``*.lock``
are ignored. Epoch, step and metrics can be read from names with ``name_pattern``, a regex with named groups
``epoch``, ``step`` and any metric, e.g. ``model-(?P<epoch>\\d+)-(?P<val_loss>[\\d.]+)\\.keras``.

Stopping (:meth:`SyncService.stop`, or SIGTERM/SIGINT under :meth:`run_forever`) lets the push in flight finish and
commits candidates that had already settled, then returns. A second signal while that goes on interrupts it like
Ctrl-C does a push (:mod:`cloudckpt.cancel`: transfers cancelled within about a second; the CLI exits 130 or 143).

The service appends to the run with compare-and-swap like any writer; it does not claim (fence) the run unless
``exclusive=True``, so it can run beside a training callback on the same run.
"""

from __future__ import annotations

import logging
import re
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from . import cancel
from .errors import CloudCkptError, ConfigurationError, StaleWriterError
from .manifest import CheckpointEntry
from .retention import Retention
from .store import CheckpointStore

log = logging.getLogger(__name__)
_IGNORED_SUFFIXES = (".tmp", ".partial", ".lock", ".swp")

Signature = tuple[tuple[str, int, int], ...]


def signature(path: Path) -> Signature:
    """Names, sizes and mtimes (ns) of everything in a candidate; changes whenever a writer touches it."""
    if path.is_file():
        st = path.stat()
        return (("", st.st_size, st.st_mtime_ns),)
    items = []
    for p in sorted(path.rglob("*")):
        if p.is_file():
            st = p.stat()
            items.append((p.relative_to(path).as_posix(), st.st_size, st.st_mtime_ns))
    return tuple(items)


@dataclass
class _Candidate:
    sig: Signature
    since: float


@dataclass
class SyncService:
    """Watch ``watch_dir`` and push finished checkpoints to ``store``.

    Example:
        >>> import tempfile, pathlib
        >>> watch = pathlib.Path(tempfile.mkdtemp()); _ = (watch / "model-3.keras").write_bytes(b"x")
        >>> with CheckpointStore(tempfile.mkdtemp()) as store:
        ...     svc = SyncService(store, watch, settle=0, name_pattern=r"model-(?P<epoch>\\d+)")
        ...     [e.epoch for e in svc.scan_once(now=10**10)]
        [3]

    Args:
        store: where to commit.
        watch_dir: the directory a trainer writes checkpoints into.
        settle: seconds a candidate must stay unchanged before it is pushed. Default 5.
        poll: seconds between scans. Default 2.
        name_pattern: regex (named groups ``epoch``, ``step``, metrics) matched against entry names. Default None.
        policy: the run's policy settings each push gives (:class:`~cloudckpt.retention.Retention`). Default: none.
        exclusive: claim the run (fence out earlier writers). Default False.
    """

    store: CheckpointStore
    watch_dir: Path
    settle: float = 5.0
    poll: float = 2.0
    name_pattern: str | None = None
    policy: Retention = field(default_factory=Retention)
    exclusive: bool = False
    _seen: dict[str, _Candidate] = field(default_factory=dict, init=False)
    _pushed: dict[str, Signature] = field(default_factory=dict, init=False)
    _stop: threading.Event = field(default_factory=threading.Event, init=False)
    _pushing: str | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.watch_dir = Path(self.watch_dir)
        if not self.watch_dir.is_dir():
            raise ConfigurationError(f"{self.watch_dir}: not a directory to watch")
        try:
            self._regex = re.compile(self.name_pattern) if self.name_pattern else None
        except re.error as e:
            raise ConfigurationError(f"bad name_pattern {self.name_pattern!r}: {e}") from None
        if self.exclusive:
            self.store.claim()

    def _fields(self, name: str) -> dict:
        out: dict = {"metrics": {}}
        match = self._regex.search(name) if self._regex else None
        if match:
            for key, value in match.groupdict().items():
                if value is None:
                    continue
                if key in ("epoch", "step"):
                    out[key] = int(value)
                else:
                    try:
                        out["metrics"][key] = float(value.rstrip("."))
                    except ValueError:
                        log.warning("sync: %s: group %s=%r is not a number; ignored", name, key, value)
        return out

    def _candidates(self) -> list[Path]:
        return sorted(p for p in self.watch_dir.iterdir()
                      if not p.name.startswith(".") and not p.name.endswith(_IGNORED_SUFFIXES))

    def scan_once(self, now: float | None = None, *, settled_only: bool = False) -> list[CheckpointEntry]:
        """Look once; push every candidate that is new or changed and has been unchanged ``settle`` seconds."""
        now = time.monotonic() if now is None else now
        pushed = []
        for path in self._candidates():
            if self._stop.is_set() and not settled_only:
                break
            try:
                sig = signature(path)
            except FileNotFoundError:
                continue  # removed while we looked
            if not sig or self._pushed.get(path.name) == sig:
                continue
            seen = self._seen.get(path.name)
            if seen is None or seen.sig != sig:
                self._seen[path.name] = _Candidate(sig, now)
                if self.settle > 0 or settled_only:
                    continue
                seen = self._seen[path.name]
            if now - seen.since < self.settle:
                continue
            self._pushing = path.name
            try:
                entry = self.store.push(path, **self._fields(path.name), policy=self.policy)
            finally:
                self._pushing = None
            if signature(path) != sig:
                log.warning("sync: %s changed while it was pushed; it will be pushed again when it settles", path.name)
            self._pushed[path.name] = sig
            log.info("sync: committed %s as %s", path.name, entry.id)
            pushed.append(entry)
        return pushed

    def stop(self) -> None:
        self._stop.set()

    def _on_signal(self, signum: int, frame: object) -> None:
        if self._stop.is_set():  # a second signal: stop the push in flight now
            raise cancel.Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()
        self.stop()
        if self._pushing is not None:
            log.warning("sync: stopping once the push of %s is committed; signal again to cancel it", self._pushing)

    def run(self) -> None:
        """Scan until :meth:`stop`; then commit what had already settled and return."""
        while not self._stop.is_set():
            try:
                self.scan_once()
            except StaleWriterError:
                raise
            except CloudCkptError as exc:
                log.error("sync: %s (will retry at the next scan)", exc)
            self._stop.wait(self.poll)
        self.scan_once(settled_only=True)

    def run_forever(self, ready: Callable[[], None] | None = None) -> None:
        """:meth:`run`, stopping cleanly on SIGTERM or SIGINT (main thread only). ``ready`` is called once the
        signal handlers are in place (so a supervisor that waits for it can't signal too early)."""
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            if ready is not None:
                ready()
            self.run()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
