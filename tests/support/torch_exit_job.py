"""Three saves with a CheckpointManager, then the loop ends a chosen way (run as a process by
tests/test_torch_commit_failures.py).

Usage: torch_exit_job.py REMOTE HOW [--slow-uploads S]

HOW: ``raise`` (an exception inside ``with CheckpointManager``), ``sigint`` (SIGINT: KeyboardInterrupt inside it),
``exit`` (``sys.exit(3)`` inside it), ``no-close`` (no ``with``, no ``close()``: the script just ends), ``normal``
(the ``with`` block ends). Prints ``saved S`` after each save call returns.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time

import torch

from cloudckpt.store import CheckpointStore
from cloudckpt.torch import CheckpointManager


def slow_uploads(seconds: float) -> None:
    push = CheckpointStore.push

    def slow(self, source, **kw):
        time.sleep(seconds)
        return push(self, source, **kw)

    CheckpointStore.push = slow


def end(how: str) -> None:
    if how == "raise":
        raise RuntimeError("the training loop failed after step 3")
    if how == "exit":
        sys.exit(3)
    if how == "sigint":
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(60)  # interrupted at once by KeyboardInterrupt
        raise AssertionError("SIGINT did not interrupt")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("remote")
    p.add_argument("how", choices=("raise", "sigint", "exit", "no-close", "normal"))
    p.add_argument("--slow-uploads", type=float, default=0.0)
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s %(levelname)s %(message)s")
    if a.slow_uploads:
        slow_uploads(a.slow_uploads)
    mgr = CheckpointManager(a.remote, monitor="val_loss", keep_last=5, preemption=None, preemption_deadline=60)
    if a.how == "no-close":
        for step in (1, 2, 3):
            mgr.save(step, {"w": torch.full((4,), float(step))}, metrics={"val_loss": 1.0 / step})
            print(f"saved {step}", flush=True)
        return
    with mgr:
        for step in (1, 2, 3):
            mgr.save(step, {"w": torch.full((4,), float(step))}, metrics={"val_loss": 1.0 / step})
            print(f"saved {step}", flush=True)
        end(a.how)


if __name__ == "__main__":
    main()
