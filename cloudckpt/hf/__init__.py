"""Hugging Face adapter: :class:`CloudCheckpointCallback` commits the Trainer's ``checkpoint-N`` folders to a store;
:func:`pull_latest` brings the latest back so ``trainer.train(resume_from_checkpoint=True)`` continues.

Needs the ``hf`` extra (``pip install 'cloudckpt[hf]'``); the core and the CLI never import transformers. Importing
it with a transformers older than :data:`cloudckpt.versions.MIN_TRANSFORMERS` raises ConfigurationError.
"""

import transformers as _transformers

from ..versions import MIN_TRANSFORMERS, require

require("transformers", _transformers.__version__, MIN_TRANSFORMERS,
        "the Trainer loading every checkpoint file with torch.load(weights_only=True)")

from .callback import EXIT_PREEMPTED, CloudCheckpointCallback, monitor_of, pull_latest  # noqa: E402

__all__ = ["EXIT_PREEMPTED", "CloudCheckpointCallback", "monitor_of", "pull_latest"]
