"""cloudckpt: keep deep-learning checkpoints safe in cloud object storage.

The core (store, CLI) imports without TensorFlow; the Keras callback lives in :mod:`cloudckpt.keras`.
"""

from .errors import (
    AccessError,
    CheckpointNotFoundError,
    CloudCkptError,
    ConfigurationError,
    IntegrityError,
    ResumeMismatchError,
    StaleWriterError,
    TransferError,
    UnsafePathError,
)
from .manifest import CheckpointEntry, FileEntry, Index
from .retention import AnyOf, KeepBest, KeepEvery, KeepLast, Record
from .store import CheckpointStore, GcReport, PullResult, VerifyResult

__version__ = "0.1.0"

__all__ = [
    "AccessError", "AnyOf", "CheckpointEntry", "CheckpointNotFoundError", "CheckpointStore", "CloudCkptError",
    "ConfigurationError", "FileEntry", "GcReport", "Index", "IntegrityError", "KeepBest", "KeepEvery", "KeepLast",
    "PullResult", "Record", "ResumeMismatchError", "StaleWriterError", "TransferError", "UnsafePathError",
    "VerifyResult",
]
