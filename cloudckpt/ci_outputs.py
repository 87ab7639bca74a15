"""What a CI restore step hands to the steps after it: the pulled checkpoint's id, folder, model file and metadata,
read from ``cloudckpt pull --json``'s output and printed as GitHub Actions step outputs (``name=value`` lines for
``$GITHUB_OUTPUT``) or a GitLab dotenv report (``CLOUDCKPT_…=value``).

    python -m cloudckpt.ci_outputs pull.json [--format github|dotenv]

A value with a line break (which would forge another output) is refused: exit 2, nothing printed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

NAMES = {"checkpoint-id": "CLOUDCKPT_CHECKPOINT_ID", "path": "CLOUDCKPT_PATH", "model-path": "CLOUDCKPT_MODEL_PATH",
         "metadata": "CLOUDCKPT_METADATA"}


def outputs(pulled: dict, metadata: str) -> dict[str, str]:
    """The outputs (GitHub names) of one pull, from its ``--json`` result."""
    folder = str(pulled["path"])
    model = pulled.get("model_file")
    return {"checkpoint-id": str(pulled["id"]), "path": folder,
            "model-path": os.path.join(folder, model) if model else "", "metadata": metadata}


def render(values: dict[str, str], fmt: str) -> str:
    """``name=value`` lines (GitHub) or ``CLOUDCKPT_NAME=value`` lines (GitLab dotenv); ValueError on a line break."""
    for name, value in values.items():
        if "\n" in value or "\r" in value:
            raise ValueError(f"the {name} output holds a line break: {value!r}")
    if fmt == "github":
        return "".join(f"{name}={value}\n" for name, value in values.items())
    return "".join(f"{NAMES[name]}={value}\n" for name, value in values.items())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cloudckpt.ci_outputs", description=__doc__.split("\n\n")[0])
    parser.add_argument("pulled", help="the file `cloudckpt pull --json` wrote")
    parser.add_argument("--format", choices=("github", "dotenv"), default="github")
    args = parser.parse_args(argv)
    try:
        text = render(outputs(json.loads(Path(args.pulled).read_text()), str(Path(args.pulled).absolute())),
                      args.format)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"cloudckpt.ci_outputs: error: {args.pulled}: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
