"""How the ``cloudckpt`` command prints: results (text or JSON), the checkpoint table, and the retry summary line."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from typing import Any

import click
from tqdm import tqdm

from .manifest import CheckpointEntry, Index
from .redact import Redactor


def emit(data: Any, as_json: bool, text: Callable[[Any], str]) -> None:
    """The one place results are printed: JSON on stdout with ``--json``, else human-readable text."""
    click.echo(json.dumps(data, indent=2, default=str) if as_json else text(data))


def human_size(n: int) -> str:
    """``18227`` → ``17.8kB``: tqdm's formatting of byte counts in powers of 1024, as the progress bars show them."""
    return str(tqdm.format_sizeof(n, suffix="B", divisor=1024))


def row(entry: CheckpointEntry, index: Index) -> dict:
    return entry.summary(index.tags(entry.id))


def holds(r: dict) -> str:
    """What a checkpoint holds, in a word: ``state`` (resume state, no model), else ``model`` when its writer named
    the model file (``files`` when not: a push of any framework's files), ``+state`` with resume state."""
    if not r["model"]:
        return "state"
    return ("model" if r["model_file"] else "files") + ("+state" if r["resume_state"] else "")


def table(rows: list[dict]) -> str:
    if not rows:
        return "(no checkpoints)"
    lines = [f"{'ID':<40} {'EPOCH':>5} {'STEP':>9} {'CREATED':<20} {'SIZE':>10} {'HOLDS':<11}  METRICS / TAGS"]
    for r in rows:
        metrics = " ".join(f"{k}={v:.6g}" for k, v in r["metrics"].items())
        tags = ",".join(r["tags"])
        created = str(r["created"])[:19].replace("T", " ")
        epoch = "" if r["epoch"] is None else r["epoch"]
        step = "" if r["step"] is None else r["step"]
        lines.append(f"{r['id']:<40} {epoch!s:>5} {step!s:>9} {created:<20} {human_size(r['size']):>10} "
                     f"{holds(r):<11}  {metrics}" + (f"  [{tags}]" if tags else ""))
    return "\n".join(lines)


def runs_table(rows: list[dict]) -> str:
    """``ls`` at a prefix that holds runs: one line per run (its URL, checkpoints, size, latest and best)."""
    def brief(c: dict | None, monitor: str | None) -> str:
        if c is None:
            return "-"
        value = c["metrics"].get(monitor) if monitor else None
        return f"{c['id']} (epoch {c['epoch']}" + (f", {monitor}={value:.6g})" if value is not None else ")")

    lines = []
    for r in rows:
        if r["error"]:
            lines.append(f"{r['url']}  {human_size(r['size'])}  error: {r['error']}")
            continue
        lines.append(f"{r['url']}  {r['checkpoints']} checkpoints  {human_size(r['size'])}  "
                     f"latest {brief(r['latest'], None)}  best {brief(r['best'], r['monitor'])}")
    return "\n".join(lines)


_RETRY_LINE = re.compile(r"(.*?) at \S+: attempt \d+ failed \((.*)\); retrying", re.DOTALL)


class RetrySummary(logging.Filter):
    """Default verbosity: retry warnings are counted instead of printed, and reported as one line when the command
    ends (before its error line, if any); ``-v`` prints each retry."""

    def __init__(self, redactor: Redactor) -> None:
        super().__init__()
        self.redactor = redactor
        self.count = 0
        self.last = ""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "cloudckpt.retry" and record.levelno == logging.WARNING:
            self.count += 1
            message = record.getMessage()  # "<what> at <url>: attempt n failed (<error>); retrying" (cloudckpt.retry)
            found = _RETRY_LINE.fullmatch(message)
            self.last = f"{found[1]}: {found[2]}" if found else message  # the URL once: the error names it
            return False
        return True

    def report(self) -> None:
        if self.count:
            last = " ".join(self.redactor.scrub(self.last).split())  # as the log lines: no credentials
            if len(last) > 400:  # cut between words, never inside a URL
                last = last[:400].rsplit(" ", 1)[0] + " ..."
            click.echo(f"cloudckpt: {self.count} failed attempt(s) retried (last: {last}); -v shows each", err=True)


def young(r: dict) -> str:
    """The tail of gc's line for objects spared for their age: how many, their bytes, and when they go."""
    if not r["young_objects"]:
        return ""
    names = f" of {len(r['kept_young'])} uncommitted checkpoints" if r["kept_young"] else ""
    return (f"; kept {r['young_objects']} young objects ({human_size(r['young_bytes'])}){names}: younger than "
            f"--min-age, a later gc removes them once older")
