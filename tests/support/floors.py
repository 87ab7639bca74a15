"""Print the declared floors of some extras as exact pins (``name==floor``), read from pyproject.toml: what the
lowest-versions venv installs for the PyTorch adapters (``make test-lowest``).

    python tests/support/floors.py torch lightning hf
"""

from __future__ import annotations

import sys
from pathlib import Path

import tomllib
from packaging.requirements import Requirement

EXTRAS = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())["project"][
    "optional-dependencies"]


def floors(extras: list[str]) -> list[str]:
    pins: dict[str, str] = {}
    for extra in extras:
        for req in map(Requirement, EXTRAS[extra]):
            (low,) = [s.version for s in req.specifier if s.operator == ">="]
            pins[req.name] = low
    return [f"{name}=={version}" for name, version in sorted(pins.items())]


if __name__ == "__main__":
    print(" ".join(floors(sys.argv[1:])))
