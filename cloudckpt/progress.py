"""Byte progress bars on stderr (tqdm): shown when stderr is a terminal, or when asked."""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Callable, Iterator


@contextlib.contextmanager
def byte_progress(total: int, desc: str, enabled: bool | None = None) -> Iterator[Callable[[int], None]]:
    """Yield a thread-safe ``advance(nbytes)``; a no-op when disabled (default: only on a terminal)."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        yield lambda n: None
        return
    from tqdm import tqdm

    lock = threading.Lock()
    with tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr,
              leave=False) as bar:

        def advance(n: int) -> None:
            with lock:
                bar.update(n)

        yield advance
