"""The Keras integration: :class:`CloudCheckpoint`. This package is the only part of cloudckpt that imports Keras."""

from .callback import DEFAULT_STORE_DIR, EXIT_PREEMPTED, CloudCheckpoint

__all__ = ["CloudCheckpoint", "DEFAULT_STORE_DIR", "EXIT_PREEMPTED"]
