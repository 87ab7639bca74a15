"""Google Cloud Storage through google-cloud-storage: resumable uploads in bounded chunks with the server's crc32c
compared with ours, streamed crc32c-checked downloads, and the index swapped with ``ifGenerationMatch``.

gcsfs is not used on this path: its ``get_file`` grew memory to most of the object's size (tests/test_large_files.py),
and google-cloud-storage exposes the generation preconditions the commit needs. With ``STORAGE_EMULATOR_HOST`` set,
anonymous credentials are used, and ``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false`` is set for any gcsfs use in the
same process (an emulator doesn't serve gcsfs's storage-control probe, which stalls ~60 s per bucket).
"""

from __future__ import annotations

import base64
import os
from pathlib import Path
from collections.abc import Callable
from typing import Any

from ..errors import AccessError, ConfigurationError, IndexConflictError, IntegrityError
from ..manifest import INDEX_NAME
from .base import UNCHANGED, Backend, ObjectInfo, Progress
from .fsspec_objects import FsspecObjects

_MB = 2**20


def _split(url: str) -> tuple[str, str]:
    scheme, _, rest = url.partition("://")
    bucket, _, prefix = rest.partition("/")
    if len(bucket) < 3:
        raise ConfigurationError(f"GCS bucket names have 3 or more characters. Received: url={url!r}")
    return bucket, prefix.strip("/")


def _forget_sent_body(response: Any, *args: Any, **kwargs: Any) -> Any:
    """A requests response hook: drop the reference to the request body once the answer is in. google-cloud-storage's
    resumable loop keeps the last response (and through ``response.request.body`` the chunk it sent) while it reads
    the next chunk, so two chunks were in memory at once (+144 MiB pushing 2 GiB with 64 MiB chunks). A retried
    chunk is re-sent from the upload's own copy, not from the old response."""
    request = getattr(response, "request", None)
    if request is not None and isinstance(getattr(request, "body", None), (bytes, bytearray)):
        request.body = None
    return response


class _Reading:
    """A file being uploaded: tells ``progress`` how far the upload has read (a chunk re-sent after a seek back
    counts negative)."""

    def __init__(self, f: Any, progress: Progress) -> None:
        self._f, self._progress = f, progress

    def read(self, *args: Any) -> bytes:
        data = self._f.read(*args)
        self._progress(len(data))
        return data

    def seek(self, *args: Any) -> int:
        before = self._f.tell()
        after = self._f.seek(*args)
        self._progress(after - before)
        return after

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


class _Writing:
    """A file-like sink for ``download_to_file``: hands each block to ``sink`` and tells ``progress``."""

    def __init__(self, sink: Callable[[bytes], None], progress: Progress | None) -> None:
        self._sink, self._progress = sink, progress

    def write(self, data: bytes) -> int:
        self._sink(data)
        if self._progress:
            self._progress(len(data))
        return len(data)


class GCSBackend(Backend):
    verification = "server crc32c of the whole object compared with ours, and its size"

    #: storage options understood here: ``token`` (a service-account JSON path, or "anon"), ``project``, ``chunk_size``
    OPTIONS = {"token", "project", "chunk_size", "transport"}

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        super().__init__(url, storage_options)
        self.bucket_name, self.prefix = _split(self.url)
        opts = self.storage_options
        unknown = set(opts) - self.OPTIONS
        if unknown:
            raise ConfigurationError(f"{url}: unknown GCS storage option(s) {sorted(unknown)}; known: {sorted(self.OPTIONS)}")
        self.chunk_size = max(1, int(opts.get("chunk_size", 64 * _MB)) // (256 * 1024)) * (256 * 1024)
        emulator = os.environ.get("STORAGE_EMULATOR_HOST")
        if emulator:
            os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
            opts.setdefault("token", "anon")
        from google.cloud import storage

        project = opts.get("project") or os.environ.get("GOOGLE_CLOUD_PROJECT")
        if opts.get("token") == "anon":
            from google.auth.credentials import AnonymousCredentials

            self.client = storage.Client(project=project or "cloudckpt", credentials=AnonymousCredentials())
        elif opts.get("token") is not None:
            if not (isinstance(opts["token"], str) and os.path.isfile(opts["token"])):
                raise ConfigurationError(f"{url}: token must be 'anon' or a service-account JSON file. Received: {opts['token']!r}")
            self.client = storage.Client.from_service_account_json(opts["token"], project=project)
        else:
            self.client = storage.Client(project=project)
        self.bucket = self.client.bucket(self.bucket_name)
        session = getattr(self.client, "_http", None)  # the requests session google-cloud-storage sends with
        if session is not None and hasattr(session, "hooks"):
            session.hooks.setdefault("response", []).append(_forget_sent_body)

    def _name(self, rel: str) -> str:
        return f"{self.prefix}/{rel}" if self.prefix else rel

    def check_access(self) -> None:
        self.client.get_bucket(self.bucket_name)

    # --- index -------------------------------------------------------------------------------------------------

    def read_index(self, known: Any = None) -> tuple[bytes | None, Any]:
        from google.api_core.exceptions import NotFound, PreconditionFailed

        for _ in range(5):
            blob = self.bucket.get_blob(self._name(INDEX_NAME))
            if blob is None:
                self._check_bucket()  # a missing bucket also reads as "no index": don't call it an empty run
                return None, None
            if known is not None and blob.generation == known:
                return UNCHANGED, known
            try:
                return blob.download_as_bytes(if_generation_match=blob.generation), blob.generation
            except (NotFound, PreconditionFailed):
                continue  # replaced between the metadata read and the download: read again
        raise IndexConflictError(f"{self.url}: index keeps changing while being read")

    def _check_bucket(self) -> None:
        from google.api_core.exceptions import Forbidden

        try:
            exists = self.bucket.exists()
        except Forbidden:
            return  # no right to look at the bucket itself; its objects may still be ours to use
        if not exists:
            raise AccessError(f"{self.url}: no such bucket {self.bucket_name!r}")

    def write_index(self, data: bytes, token: Any) -> Any:
        from google.api_core.exceptions import PreconditionFailed

        blob = self.bucket.blob(self._name(INDEX_NAME))
        try:
            blob.upload_from_string(data, content_type="application/json", if_generation_match=token or 0)
            return blob.generation
        except PreconditionFailed as e:
            raise IndexConflictError(f"{self.url}: index changed since it was read") from e

    # --- objects -----------------------------------------------------------------------------------------------

    def upload(self, local: Path, rel: str, *, size: int, crc32c: Callable[[], str],
               progress: Progress | None = None) -> None:
        blob = self.bucket.blob(self._name(rel), chunk_size=self.chunk_size if size > self.chunk_size else None)
        with open(local, "rb") as f:  # the server's crc32c is compared with ours below
            blob.upload_from_file(_Reading(f, progress) if progress else f, size=size, checksum=None)
        blob.reload()
        server, want = (base64.b64decode(blob.crc32c).hex() if blob.crc32c else None), crc32c()
        if blob.size != size or server != want:
            raise IntegrityError(f"{self.url}/{rel}: stored object is {blob.size} bytes crc32c {server}, expected {size} {want}")
        self.check_uploaded(rel, want)

    def download(self, rel: str, local: Path, *, progress: Progress | None = None) -> str | None:
        # google-cloud-storage streams to the file and checks the bytes against the object's crc32c as they arrive
        # (gcsfs get_file grew RSS to most of the object's size here). The generation is pinned, so the crc32c
        # returned is the one of exactly the bytes written: the caller needn't hash the file again.
        with open(local, "wb") as f:
            return self.read_stream(rel, f.write, progress)

    def read_stream(self, rel: str, sink: Callable[[bytes], None], progress: Progress | None = None) -> str | None:
        from google.api_core.exceptions import NotFound

        blob = self.bucket.get_blob(self._name(rel))
        if blob is None:
            raise FileNotFoundError(f"{self.url}/{rel}: no such object")
        try:
            blob.download_to_file(_Writing(sink, progress), checksum="crc32c", if_generation_match=blob.generation)
        except NotFound as e:  # the contract's built-in: callers test FileNotFoundError
            raise FileNotFoundError(f"{self.url}/{rel}: no such object") from e
        return base64.b64decode(blob.crc32c).hex() if blob.crc32c else None

    def read_bytes(self, rel: str) -> bytes:
        from google.api_core.exceptions import NotFound

        try:
            return self.bucket.blob(self._name(rel)).download_as_bytes()
        except NotFound as e:
            raise FileNotFoundError(f"{self.url}/{rel}: no such object") from e

    def write_bytes(self, rel: str, data: bytes) -> None:
        self.bucket.blob(self._name(rel)).upload_from_string(data)

    def list_objects(self) -> list[ObjectInfo]:
        base = f"{self.prefix}/" if self.prefix else ""
        return [ObjectInfo(b.name[len(base):], b.size or 0, b.updated.timestamp() if b.updated else 0.0)
                for b in self.client.list_blobs(self.bucket_name, prefix=base)]

    def delete(self, rels: list[str]) -> None:
        from google.api_core.exceptions import NotFound

        for rel in rels:
            try:
                self.bucket.blob(self._name(rel)).delete()
            except NotFound:
                pass


class GCSFsspecBackend(FsspecObjects, GCSBackend):
    """``transport="fsspec"``: data through gcsfs (its server crc32c is compared), the index still by
    google-cloud-storage generation preconditions."""

    verification = "server crc32c and size (data through gcsfs)"

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        super().__init__(url, storage_options)
        import gcsfs

        opts = self.storage_options
        self.fs = gcsfs.GCSFileSystem(**{k: opts[k] for k in ("token", "project") if k in opts})
        self.root = f"{self.bucket_name}/{self.prefix}" if self.prefix else self.bucket_name
