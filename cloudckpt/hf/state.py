"""A Hugging Face ``checkpoint-N`` folder from the bucket, read before the Trainer resumes from it.

The Trainer reads ``trainer_state.json``, the weights (``*.safetensors``) and ``optimizer.pt``, ``scheduler.pt``,
``rng_state*.pth`` (``torch.load(weights_only=True)``, numpy's arrays allowed). :func:`check_checkpoint` reads each
the same way, so a damaged or hostile file is an :class:`~cloudckpt.errors.IntegrityError` here (and
:func:`~cloudckpt.hf.pull_latest` takes an older checkpoint) instead of whatever the Trainer would raise mid-resume.
No code of the files runs: nothing is unpickled beyond tensors, plain data and numpy arrays.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from ..errors import IntegrityError

try:  # what the Trainer allows when it reads rng_state.pth: numpy's arrays
    from transformers.trainer_pt_utils import safe_globals
except ImportError:  # pragma: no cover - a transformers that reads them the same way without the helper
    def safe_globals() -> Any:
        core = getattr(np, "_core", None) or np.core
        return torch.serialization.safe_globals([core.multiarray._reconstruct, np.ndarray, np.dtype,
                                                 type(np.dtype(np.uint32))])

TORCH_FILES = (".pt", ".pth", ".bin")
NOT_READ = frozenset({"training_args.bin"})  # a pickle of TrainingArguments the Trainer never reads on resume


def check_checkpoint(folder: Path) -> None:
    """IntegrityError unless every file of ``folder`` the Trainer reads on resume reads back as it expects."""
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.name not in NOT_READ):
        try:
            if path.suffix == ".json":
                json.loads(path.read_bytes())
            elif path.suffix == ".safetensors":
                load_file(path, device="cpu")
            elif path.suffix in TORCH_FILES:
                with safe_globals():
                    torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any failure to read bucket bytes is an integrity failure
            shown = " ".join(str(exc).split())[:300] or type(exc).__name__
            raise IntegrityError(f"{path.relative_to(folder)}: unreadable ({shown})") from exc
