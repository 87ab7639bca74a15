"""Run the reliability suites at full size and print their figures.

Usage (from the repository root)::

    .venv/bin/python tests/reliability/run_full.py [extra pytest args]

It is ``pytest tests/reliability --full`` (kill counts, races, faulted pushes and hypothesis examples scaled up;
tests marked ``slow`` included) with the figures written to ``reliability-figures.json`` in the current directory
and printed at the end: kills survived by point and store, faults injected by kind, HTTP attempts per operation
(max/mean), races run, bad inputs tried, interleavings explored (examples, steps, ops and faults by kind).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def main(argv: list[str]) -> int:
    out = Path.cwd() / "reliability-figures.json"
    env = dict(os.environ, CLOUDCKPT_RELIABILITY_FIGURES=str(out))
    cmd = [sys.executable, "-m", "pytest", "-q", str(ROOT / "tests" / "reliability"), "--full", *argv]
    code = subprocess.call(cmd, cwd=ROOT, env=env)
    if out.exists():
        print(json.dumps(json.loads(out.read_text()), indent=1))
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
