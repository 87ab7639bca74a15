"""Storage backends, chosen by URL scheme: local path / ``file://`` (default), ``s3://``, ``gs://``, ``az://`` (also
``abfs://``, ``abfss://``), else fsspec."""

from __future__ import annotations

import os
from typing import Any

from ..errors import CloudCkptError, ConfigurationError
from ..redact import Redactor, redact_url
from .base import Backend, ObjectInfo

__all__ = ["Backend", "ObjectInfo", "open_backend"]

#: the pip extra that installs a scheme's client library
_EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs", "az": "azure", "abfs": "azure", "abfss": "azure"}


def open_backend(url: str | os.PathLike[str], storage_options: dict[str, Any] | None = None) -> Backend:
    """Return the backend for ``url``. Missing optional dependencies are a ConfigurationError naming the extra.

    S3 and GCS move data with their SDKs by default; ``transport="fsspec"`` (or ``$CLOUDCKPT_TRANSPORT``) moves it
    through s3fs/gcsfs instead, the index still being swapped with the SDK's conditional write.
    """
    if isinstance(url, os.PathLike):  # a local folder as a Path
        url = os.fspath(url)
    if not isinstance(url, str) or not url.strip():
        raise ConfigurationError("a store URL is required (s3://bucket/prefix, gs://bucket/prefix or a local path). "
                                 f"Received: {url!r}")
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    shown = redact_url(url)  # errors name the URL without its credentials
    try:
        if scheme in ("", "file", "local"):
            from .local import LocalBackend

            return LocalBackend(url.replace("local://", "file://", 1), storage_options)
        transport = (storage_options or {}).get("transport") or os.environ.get("CLOUDCKPT_TRANSPORT") or "sdk"
        if transport not in ("sdk", "fsspec"):
            raise ConfigurationError(f"transport must be 'sdk' or 'fsspec'. Received: transport={transport!r}")
        if scheme in ("s3", "s3a"):
            from .s3 import S3Backend, S3FsspecBackend

            s3_cls = S3FsspecBackend if transport == "fsspec" else S3Backend
            return s3_cls("s3://" + url.split("://", 1)[1], storage_options)
        if scheme in ("gs", "gcs"):
            from .gcs import GCSBackend, GCSFsspecBackend

            gcs_cls = GCSFsspecBackend if transport == "fsspec" else GCSBackend
            return gcs_cls("gs://" + url.split("://", 1)[1], storage_options)
        if scheme in ("az", "abfs", "abfss"):
            from .azure import AzureBackend

            return AzureBackend(url, storage_options)
        from .generic import GenericBackend

        return GenericBackend(url, storage_options)
    except ImportError as e:
        extra = _EXTRAS.get(scheme, "all")
        raise ConfigurationError(
            f"{shown}: a client library is missing ({e.name}); pip install 'cloudckpt[{extra}]'") from e
    except CloudCkptError:
        raise
    except (TypeError, ValueError) as e:
        secrets = Redactor()
        secrets.add_options(storage_options or {})
        secrets.add_url(url)
        raise ConfigurationError(f"{shown}: bad storage options ({secrets.scrub(str(e))})") from e

