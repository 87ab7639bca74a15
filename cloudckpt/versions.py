"""The oldest versions of the optional clients cloudckpt works with (the floors pyproject.toml declares and CI tests
with ``make test-lowest``), and the checks that refuse older ones with a ConfigurationError naming the floor."""

from __future__ import annotations

from packaging.version import InvalidVersion, Version

from .errors import ConfigurationError

#: the first botocore whose S3 PutObject takes ``IfMatch`` (1.35.69), as tested together with s3fs's aiobotocore
MIN_BOTOCORE = "1.35.74"
#: the first Keras with ``ModelCheckpoint._should_save_model``, which CloudCheckpoint extends
MIN_KERAS = "3.10"


def require(name: str, installed: str, minimum: str, why: str, *, ok: bool = True) -> None:
    """Raise ConfigurationError when ``installed`` is below ``minimum`` or ``ok`` (a feature probe) is False."""
    try:
        if ok and Version(installed) >= Version(minimum):  # PEP 440: 3.10.0rc1 comes before 3.10
            return
    except InvalidVersion:
        pass  # not a version pip could have installed: refused, naming the floor
    raise ConfigurationError(f"cloudckpt needs {name}>={minimum} ({why}); {name} {installed} is installed: "
                             f"pip install '{name}>={minimum}'")
#: the oldest torch tested (the first whose ``torch.load(weights_only=True)`` can't be made to run code is 2.6,
#: CVE-2025-32434; 2.13 is the oldest CPU build CI can install and test)
MIN_TORCH = "2.13"
#: the first transformers whose Trainer reads every resume file with torch.load(weights_only=True) (rng_state too)
MIN_TRANSFORMERS = "4.50"
#: the first lightning whose CheckpointIO.load_checkpoint takes ``weights_only``
MIN_LIGHTNING = "2.6"
