"""Lightning adapter: :class:`CloudCheckpointIO` (``Trainer(plugins=[...])``) commits the files Lightning's own
``ModelCheckpoint`` writes; :class:`CloudPreemption` checkpoints and exits 143 on a preemption; :func:`pull_last`
lets ``trainer.fit(ckpt_path="last")`` resume on a new machine; :class:`CloudModelParallelStrategy` commits
``ModelParallelStrategy``'s sharded checkpoints from every rank (one commit per save).

Needs the ``lightning`` extra (``pip install 'cloudckpt[lightning]'``); the core and the CLI never import lightning.
Importing it with a lightning older than :data:`cloudckpt.versions.MIN_LIGHTNING` raises ConfigurationError.
"""

import lightning as _lightning

from ..versions import MIN_LIGHTNING, require

require("lightning", _lightning.__version__, MIN_LIGHTNING, "CheckpointIO.load_checkpoint(weights_only=...)")

from .checkpoint_io import CloudCheckpointIO, pull_last  # noqa: E402
from .preemption import EXIT_PREEMPTED, CloudPreemption  # noqa: E402
from .sharded import CloudModelParallelStrategy  # noqa: E402

__all__ = ["EXIT_PREEMPTED", "CloudCheckpointIO", "CloudModelParallelStrategy", "CloudPreemption", "pull_last"]
