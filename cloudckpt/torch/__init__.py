"""PyTorch adapter: :class:`CheckpointManager` commits a hand-written loop's state to a store in the background.

Needs the ``torch`` extra (``pip install 'cloudckpt[torch]'``); the core and the CLI never import torch. Importing it
with a torch older than :data:`cloudckpt.versions.MIN_TORCH` raises ConfigurationError.
"""

import torch as _torch

from ..versions import MIN_TORCH, require

require("torch", _torch.__version__, MIN_TORCH, "torch.load(weights_only=True) that refuses code in the file")

from .manager import EXIT_PREEMPTED, CheckpointManager, Restored  # noqa: E402
from .state import copy_to_cpu, read_state, rng_state, set_rng_state, write_state  # noqa: E402

__all__ = ["EXIT_PREEMPTED", "CheckpointManager", "Restored", "copy_to_cpu", "read_state", "rng_state",
           "set_rng_state", "write_state"]
