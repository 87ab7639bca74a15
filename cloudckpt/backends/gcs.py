"""Google Cloud Storage through google-cloud-storage: resumable uploads in bounded chunks read from one pass over the
file, the server's crc32c of the object compared with the crc32c of the bytes read (the upload's answer carries the
stored object's crc32c and size, computed by the server from what it stored: no request after it, unless an answer
lacks the crc32c); streamed downloads hashed here
as they are written; the index swapped with ``ifGenerationMatch``; a connect/read timeout on every request and the
client's retries ended at the transfer's deadline.

gcsfs is not used on this path: its ``get_file`` grew memory to most of the object's size (tests/test_large_files.py),
and google-cloud-storage exposes the generation preconditions the commit needs. With ``STORAGE_EMULATOR_HOST`` set,
anonymous credentials are used, and ``transport="fsspec"`` uses gcsfs's plain filesystem class (an emulator doesn't
serve the storage-control probe of its default class, which stalls ~60 s per bucket). The environment is only read.
"""

from __future__ import annotations

import base64
import functools
import inspect
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..checksum import HashingWriter
from ..concurrency import http_pool_size
from ..errors import AccessError, ConfigurationError, IndexConflictError, IntegrityError, StoreError
from ..layout import INDEX_NAME
from ..source import Source
from .base import UNCHANGED, Backend, ObjectInfo, Progress
from .fsspec_objects import FsspecObjects
from .gcs_compose import composite_upload
from .http_pool import size_pool

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


class _Sink:
    """A write-only file for ``download_to_file`` that hands each block to ``sink`` (no restart: a sink can't take
    bytes back)."""

    def __init__(self, sink: Callable[[bytes], object]) -> None:
        self._sink = sink

    def write(self, data: bytes) -> int:
        self._sink(data)
        return len(data)

    def seek(self, offset: int, whence: int = 0) -> int:
        raise OSError("a streamed read can't restart")

    def truncate(self, size: int | None = None) -> int:
        raise OSError("a streamed read can't restart")

    def flush(self) -> None:
        pass


@functools.cache
def _whole_body() -> dict[str, bool]:
    """``single_shot_download=True`` where google-cloud-storage has it (3.x): a range's body is read in one call, not
    8 KiB at a time through Python (a 1 GiB pull through a capped network: 5.3 s -> see docs/benchmarks.md)."""
    from google.cloud.storage import Blob

    return {"single_shot_download": True} \
        if "single_shot_download" in inspect.signature(Blob.download_as_bytes).parameters else {}


def _translate(exc: Exception, url: str) -> BaseException | None:
    """google-cloud-storage's (google-api-core, google-auth, its resumable-media) errors in the cloudckpt hierarchy;
    requests' errors are OSErrors already (transient)."""
    from google.api_core import exceptions as api
    from google.auth import exceptions as auth

    try:
        from google.cloud.storage.exceptions import DataCorruption, InvalidResponse
    except ImportError:  # google-cloud-storage < 3
        from google.resumable_media.common import DataCorruption, InvalidResponse
    status = getattr(exc.response, "status_code", None) if isinstance(exc, InvalidResponse) \
        else getattr(exc, "code", None)
    if isinstance(exc, (auth.DefaultCredentialsError, auth.RefreshError)):
        return AccessError(f"{url}: no usable credentials ({type(exc).__name__}: {exc}); "
                           "set GOOGLE_APPLICATION_CREDENTIALS or pass the token storage option")
    if isinstance(exc, (api.Forbidden, api.Unauthorized)) or status in (401, 403):
        return AccessError(f"{url}: access denied ({exc}); the credentials lack permission for this run")
    if isinstance(exc, api.NotFound) or status == 404:
        if "bucket" in str(exc).lower():
            return AccessError(f"{url}: no such bucket ({exc})")
        return FileNotFoundError(f"{url}: no such object ({exc})")
    if isinstance(exc, api.PreconditionFailed) or status == 412:
        return IndexConflictError(f"{url}: a conditional write was refused ({exc})")
    transient = isinstance(exc, (api.ServerError, api.TooManyRequests, api.RetryError,
                                 auth.TransportError, DataCorruption)) or status in (408, 429) \
        or (isinstance(status, int) and status >= 500)
    if isinstance(exc, (api.GoogleAPIError, auth.GoogleAuthError, DataCorruption, InvalidResponse)):
        return StoreError(f"{url}: {type(exc).__name__}: {exc}", transient=transient)
    return None


class GCSBackend(Backend):
    verification = "server crc32c of the whole object compared with ours, and its size"
    kind = "GCS"
    #: ``token`` (a service-account JSON path, or "anon"), ``project``, ``chunk_size``, ``transport``; parallel
    #: composite uploads (:mod:`~cloudckpt.backends.gcs_compose`): ``composite_threshold``, ``part_size``,
    #: ``max_concurrency``
    OPTIONS = frozenset({"token", "project", "chunk_size", "transport", "composite_threshold", "part_size",
                         "max_concurrency"})

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        super().__init__(url, storage_options)
        self.bucket_name, self.prefix = _split(self.url)
        opts = self.storage_options
        self.chunk_size = max(1, int(opts.get("chunk_size", 64 * _MB)) // (256 * 1024)) * (256 * 1024)
        # files of at least composite_threshold bytes (0: none) go up as parts of part_size, max_concurrency at once
        self.composite_threshold = int(opts.get("composite_threshold", 150 * _MB))
        self.part_size = max(256 * 1024, int(opts.get("part_size", 8 * _MB)))
        self.max_concurrency = max(1, int(opts.get("max_concurrency", 8)))
        # parts in memory over all uploads: each part is held twice while it is sent (our bytes and the multipart
        # body google-cloud-storage builds from them), so half as many parts as max_concurrency
        self.parts_in_flight = max(1, self.max_concurrency // 2)
        self._slots = threading.BoundedSemaphore(self.parts_in_flight)
        self.emulator = bool(os.environ.get("STORAGE_EMULATOR_HOST"))
        if self.emulator:
            opts.setdefault("token", "anon")
        from google.cloud import storage

        project = opts.get("project") or os.environ.get("GOOGLE_CLOUD_PROJECT")
        if opts.get("token") == "anon":
            from google.auth.credentials import AnonymousCredentials

            self.client = storage.Client(project=project or "cloudckpt", credentials=AnonymousCredentials())
        elif opts.get("token") is not None:
            if not (isinstance(opts["token"], str) and os.path.isfile(opts["token"])):
                raise ConfigurationError(f"{self.url}: token must be 'anon' or a service-account JSON file path. "
                                         f"Received: a {type(opts['token']).__name__} that is neither (not shown)")
            self.client = storage.Client.from_service_account_json(opts["token"], project=project)
        else:
            self.client = storage.Client(project=project)
        self.bucket = self.client.bucket(self.bucket_name)
        session = getattr(self.client, "_http", None)  # the requests session google-cloud-storage sends with
        if session is not None and hasattr(session, "hooks"):
            session.hooks.setdefault("response", []).append(_forget_sent_body)
            size_pool(session, http_pool_size(self.max_concurrency))

    def _name(self, rel: str) -> str:
        return f"{self.prefix}/{rel}" if self.prefix else rel

    def translate(self, exc: Exception) -> BaseException | None:
        return _translate(exc, self.url) or super().translate(exc)

    # --- index -------------------------------------------------------------------------------------------------

    def read_index(self, known: Any = None) -> tuple[bytes | None, Any]:
        from google.api_core.exceptions import NotFound, PreconditionFailed

        if known is None:  # one request: the bytes, and their generation from the same answer's headers
            blob = self.bucket.blob(self._name(INDEX_NAME))
            try:
                data = blob.download_as_bytes(timeout=self.timeout)
            except NotFound:
                self._check_bucket()  # a missing bucket also reads as "no index": don't call it an empty run
                return None, None
            if blob.generation is not None:
                return data, blob.generation
        for _ in range(5):  # known (or no generation in the answer): the metadata first, then exactly that version
            blob = self.bucket.get_blob(self._name(INDEX_NAME), timeout=self.timeout)
            if blob is None:
                self._check_bucket()  # a missing bucket also reads as "no index": don't call it an empty run
                return None, None
            if known is not None and blob.generation == known:
                return UNCHANGED, known
            try:
                data = blob.download_as_bytes(if_generation_match=blob.generation, timeout=self.timeout)
                return data, blob.generation
            except (NotFound, PreconditionFailed):
                continue  # replaced between the metadata read and the download: read again
        raise IndexConflictError(f"{self.url}: index keeps changing while being read")

    def _check_bucket(self) -> None:
        from google.api_core.exceptions import Forbidden

        try:
            exists = self.bucket.exists(timeout=self.timeout)
        except Forbidden:
            return  # no right to look at the bucket itself; its objects may still be ours to use
        if not exists:
            raise AccessError(f"{self.url}: no such bucket {self.bucket_name!r}")

    def write_index(self, data: bytes, token: Any) -> Any:
        return self.put_if(INDEX_NAME, data, token)

    def put_if(self, rel: str, data: bytes, token: Any) -> Any:
        from google.api_core.exceptions import PreconditionFailed

        blob = self.bucket.blob(self._name(rel))
        try:
            blob.upload_from_string(data, content_type="application/json", if_generation_match=token or 0,
                                    timeout=self.timeout)
            return blob.generation
        except PreconditionFailed as e:
            raise IndexConflictError(f"{self.url}: {rel} changed since it was read") from e

    # --- objects -----------------------------------------------------------------------------------------------

    def _retry(self, deadline: float | None) -> Any:
        """google-cloud-storage's default retry, ending at ``deadline`` rather than after its own 120 s."""
        from google.cloud.storage.retry import DEFAULT_RETRY

        left = self.remaining(deadline)
        if left is None:
            return DEFAULT_RETRY
        if hasattr(DEFAULT_RETRY, "with_timeout"):
            return DEFAULT_RETRY.with_timeout(left)
        return DEFAULT_RETRY.with_deadline(left)

    def upload(self, source: Source, rel: str, *, deadline: float | None = None,
               progress: Progress | None = None) -> None:
        # The SDK reads ``source`` in order (a retried chunk seeks back and is read again); the manifest records
        # the crc32c of the bytes read, and the server's crc32c of the stored object must equal it.
        if self.composite_threshold and source.size >= max(self.composite_threshold, 2 * self.part_size):
            composite_upload(self, source, rel, deadline=deadline, progress=progress)
            self.check_uploaded(rel, source.crc32c())
            return
        source.progress = progress  # counts the bytes read, and takes back a chunk read again after a seek
        blob = self.bucket.blob(self._name(rel), chunk_size=self.chunk_size if source.size > self.chunk_size else None)
        blob.upload_from_file(source, size=source.size, checksum=None, timeout=self.timeout,
                              retry=self._retry(deadline))
        if not blob.crc32c:
            blob.reload(timeout=self.timeout)
        server, want = (base64.b64decode(blob.crc32c).hex() if blob.crc32c else None), source.crc32c()
        if blob.size != source.size or server != want:
            raise IntegrityError(f"{self.url}/{rel}: stored object is {blob.size} bytes crc32c {server}, expected "
                                 f"{source.size} {want}")
        self.check_uploaded(rel, want)

    def download(self, rel: str, local: Path, *, deadline: float | None = None,
                 progress: Progress | None = None) -> str | None:
        # google-cloud-storage streams to the file (gcsfs get_file grew RSS to most of the object's size here). Its
        # own hash check is skipped when the server sends no X-Goog-Hash header, so the bytes are hashed here as
        # they are written, and that crc32c is compared with the object's (its generation pinned) and returned.
        with open(local, "wb") as f:
            return self._fetch(rel, HashingWriter(f, progress), deadline)

    def read_stream(self, rel: str, sink: Callable[[bytes], object], *, deadline: float | None = None) -> None:
        self._fetch(rel, HashingWriter(_Sink(sink)), deadline)

    def _fetch(self, rel: str, out: HashingWriter, deadline: float | None) -> str:
        """Stream the object (its generation pinned) into ``out``; the crc32c of the bytes written must be the
        object's."""
        from google.api_core.exceptions import NotFound

        blob = self.bucket.get_blob(self._name(rel), timeout=self.timeout)
        if blob is None:
            raise FileNotFoundError(f"{self.url}/{rel}: no such object")
        try:
            blob.download_to_file(out, checksum=None, if_generation_match=blob.generation, timeout=self.timeout,
                                  retry=self._retry(deadline))
        except NotFound as e:  # the contract's built-in: callers test FileNotFoundError
            raise FileNotFoundError(f"{self.url}/{rel}: no such object") from e
        got = out.crc32c()
        stored = base64.b64decode(blob.crc32c).hex() if blob.crc32c else None
        if stored is not None and got != stored:
            raise IntegrityError(f"{self.url}/{rel}: downloaded bytes have crc32c {got}, the object {stored}")
        return got

    def read_bytes(self, rel: str) -> bytes:
        from google.api_core.exceptions import NotFound

        try:
            return self.bucket.blob(self._name(rel)).download_as_bytes(timeout=self.timeout)
        except NotFound as e:
            raise FileNotFoundError(f"{self.url}/{rel}: no such object") from e

    def read_range(self, rel: str, start: int, length: int, *, deadline: float | None = None,
                   last: bool = False) -> bytes:
        from google.api_core.exceptions import NotFound, RequestRangeNotSatisfiable

        if length == 0:
            return b""
        try:  # ``end`` is inclusive; no decompressive transcoding (checkpoints are stored as they are)
            data = self.bucket.blob(self._name(rel)).download_as_bytes(start=start, end=start + length - 1 + last,
                                                                       timeout=self.timeout, raw_download=True,
                                                                       retry=self._retry(deadline), checksum=None,
                                                                       **_whole_body())
        except NotFound as e:
            raise FileNotFoundError(f"{self.url}/{rel}: no such object") from e
        except RequestRangeNotSatisfiable as e:
            raise self.past_end(rel, start) from e
        return self.check_range(rel, start, length, data, last)

    def write_bytes(self, rel: str, data: bytes) -> None:
        self.bucket.blob(self._name(rel)).upload_from_string(data, timeout=self.timeout)

    def list_objects(self) -> list[ObjectInfo]:
        base = f"{self.prefix}/" if self.prefix else ""
        return [ObjectInfo(b.name[len(base):], b.size or 0, b.updated.timestamp() if b.updated else 0.0)
                for b in self.client.list_blobs(self.bucket_name, prefix=base, timeout=self.timeout)]

    def delete(self, rels: list[str]) -> None:
        from google.api_core.exceptions import NotFound

        for rel in rels:
            try:
                self.bucket.blob(self._name(rel)).delete(timeout=self.timeout)
            except NotFound:
                pass


class GCSFsspecBackend(FsspecObjects, GCSBackend):
    """``transport="fsspec"``: data through gcsfs (its server crc32c is compared), the index still by
    google-cloud-storage generation preconditions."""

    verification = "server crc32c of the whole object compared with the bytes sent, and its size (data through gcsfs)"

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        super().__init__(url, storage_options)
        import aiohttp
        import gcsfs
        import gcsfs.core

        opts = self.storage_options
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.timeout[0], sock_read=self.timeout[1])
        filesystem = gcsfs.core.GCSFileSystem if self.emulator else gcsfs.GCSFileSystem
        self.fs = filesystem(**{k: opts[k] for k in ("token", "project") if k in opts}, requests_timeout=timeout)
        self.root = f"{self.bucket_name}/{self.prefix}" if self.prefix else self.bucket_name

    def translate(self, exc: Exception) -> BaseException | None:
        """gcsfs's own errors (its HttpError carries the status), aiohttp's, then google-cloud-storage's."""
        import aiohttp
        from gcsfs.retry import ChecksumError, HttpError

        if isinstance(exc, HttpError):
            status = exc.code if isinstance(exc.code, int) else 0
            if status in (401, 403):
                return AccessError(f"{self.url}: access denied ({exc}); the credentials lack permission for this run")
            if status == 404:
                return FileNotFoundError(f"{self.url}: no such object ({exc})")
            return StoreError(f"{self.url}: {exc}", transient=status in (408, 429) or status >= 500)
        if isinstance(exc, (aiohttp.ClientError, ChecksumError)):
            return StoreError(f"{self.url}: {type(exc).__name__}: {exc}", transient=True)
        return super().translate(exc)
