"""A multipart upload's reading and sending: parts read in order from one pass over the file, sent in parallel.

Each part is read once into memory and every retry of it re-sends those same bytes, so a file that changes during the
push can't be stored torn behind a checksum of another read. ``slots`` bounds the parts held in memory at once over
all uploads of a store; the wall-clock budget bounds every wait.
"""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import TypeVar

from ..source import Source

T = TypeVar("T")


def acquire(slots: threading.BoundedSemaphore, timeout: float | None) -> None:
    """Take one slot (one part in memory), waiting at most ``timeout`` seconds (the budget left)."""
    if not slots.acquire(timeout=timeout):
        raise TimeoutError("the transfer's wall-clock budget is spent")


def send_parts(source: Source, part_size: int, send: Callable[[int, bytes], T], *,
               slots: threading.BoundedSemaphore, remaining: Callable[[], float | None], workers: int,
               name: str) -> list[T]:
    """Read ``source`` in parts of ``part_size`` bytes, in order, and call ``send(number, data)`` (numbers from 1)
    for each on at most ``workers`` threads named ``name``; return what each call returned, in order.

    ``remaining()`` gives the seconds left of the budget (None: no budget) and raises when it is spent. After a
    failure no new part is read, parts not yet sent are cancelled (their slots released) and the error is raised;
    parts already being sent finish in the background.
    """
    failed = threading.Event()

    def run(number: int, data: bytes) -> T:
        try:
            return send(number, data)
        except BaseException:
            failed.set()
            raise
        finally:
            slots.release()

    pool = ThreadPoolExecutor(workers, thread_name_prefix=name)
    futures: list[Future[T]] = []
    try:
        while not failed.is_set():
            acquire(slots, remaining())
            try:
                data = source.read(part_size)
                if data:
                    # in the caller's context: a part sees its transfer's cancel token (cloudckpt.cancel)
                    futures.append(pool.submit(contextvars.copy_context().run, run, len(futures) + 1, data))
            except BaseException:
                slots.release()
                raise
            if not data:
                slots.release()
                break
        _, waiting = wait(futures, timeout=remaining())
        if waiting:
            raise TimeoutError("the transfer's wall-clock budget is spent")
        results = [f.result() for f in futures]
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        for f in futures:
            if f.cancelled():  # never ran: its slot is still held
                slots.release()
        raise
    pool.shutdown(wait=False)
    return results
