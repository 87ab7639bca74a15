"""Fixtures of the reliability suites: the size of a run (CI or ``--full``), and the figures they report.

Every suite adds what it tried to :data:`FIGURES` (kills survived, faults injected, races run, bad inputs tried,
attempts per operation). At the end of the session they are printed in the terminal summary and written to
``$CLOUDCKPT_RELIABILITY_FIGURES`` (default: ``.pytest_cache/reliability-figures.json``).
"""

from __future__ import annotations

import json
import os
from collections import Counter, defaultdict
from pathlib import Path

import pytest

FIGURES: dict[str, Counter] = defaultdict(Counter)
SAMPLES: dict[str, list[float]] = defaultdict(list)


@pytest.fixture(scope="session")
def full(request) -> bool:
    """True in a ``--full`` run: suites scale their counts up."""
    return bool(request.config.getoption("--full"))


@pytest.fixture
def figures():
    """The session's figure counters: ``figures["kills"]["local/push.after_upload"] += 1``."""
    return FIGURES


@pytest.fixture
def samples():
    """Per-measure samples (e.g. HTTP attempts per logical operation)."""
    return SAMPLES


def _summary() -> dict:
    out: dict = {name: dict(sorted(c.items())) | {"total": sum(c.values())} for name, c in sorted(FIGURES.items())}
    for name, values in sorted(SAMPLES.items()):
        if values:
            out[name] = {"n": len(values), "max": max(values), "mean": round(sum(values) / len(values), 2)}
    return out


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not FIGURES and not SAMPLES:
        return
    data = _summary()
    terminalreporter.write_sep("-", "cloudckpt reliability figures")
    for name, values in data.items():
        terminalreporter.write_line(f"{name}: {json.dumps(values)}")
    path = os.environ.get("CLOUDCKPT_RELIABILITY_FIGURES") or str(
        Path(config.rootpath) / ".pytest_cache" / "reliability-figures.json")
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(data, indent=1))
    except OSError:
        pass
