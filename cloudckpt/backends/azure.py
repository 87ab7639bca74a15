"""Azure Blob Storage through azure-storage-blob: ``az://container/prefix`` (also ``abfs://``, ``abfss://``, and the
``container@account.dfs.core.windows.net`` form adlfs accepts).

- Uploads: a file up to ``block_size`` is one Put Blob carrying its MD5 (``x-ms-blob-content-md5``: the service
  refuses a body that doesn't match it and stores it as the blob's Content-MD5); a larger one is staged in blocks read
  in one pass over the file (at most ``max_concurrency`` blocks in memory per store), each Put Block carrying its
  ``Content-MD5`` (checked by the service), and committed with Put Block List. Each block id names its index and MD5.
- The answers prove the stored object, with no request after them: a Put Blob answers with the Content-MD5 the
  service computed of the blob it stored, which must be the MD5 of the bytes read (only an answer without it, or
  with another, makes the blob's properties be read and compared); a Put Block List succeeds only if every id it
  names is a block the service staged, and each id names that block's MD5, which the service verified at Put Block —
  so the committed blob is exactly the blocks sent, in order.
- Downloads stream in 4 MiB ranges pinned to the blob's ETag (the SDK sends ``If-Match``), hashed as written.
- The index: created with ``If-None-Match: *``, replaced with ``If-Match: <etag>``; read with ``If-None-Match:
  <etag>`` to skip an unchanged one.
- Credentials, first found: the storage options ``connection_string``, ``account_key`` (with ``account_name``),
  ``sas_token``, ``anon=true``; then ``$AZURE_STORAGE_CONNECTION_STRING``, ``$AZURE_STORAGE_ACCOUNT_KEY`` (or
  ``$AZURE_STORAGE_KEY``), ``$AZURE_STORAGE_SAS_TOKEN``; else ``DefaultAzureCredential`` (azure-identity: managed
  identity, workload identity, environment, Azure CLI). The account comes from ``account_name`` /
  ``$AZURE_STORAGE_ACCOUNT_NAME``, the endpoint from ``account_host`` (default ``<account>.blob.core.windows.net``).
- SDK errors become the cloudckpt hierarchy here, at the boundary (:func:`translate`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ..checksum import HashingWriter
from ..concurrency import http_pool_size
from ..errors import AccessError, ConfigurationError, IndexConflictError, IntegrityError, StoreError
from ..layout import INDEX_NAME
from ..source import Source
from .base import UNCHANGED, Backend, ObjectInfo, Progress
from .body import request_body as _body
from .http_pool import azure_session
from .parts import acquire, send_parts

log = logging.getLogger(__name__)
_MB = 2**20
_MAX_BLOCKS = 50_000  # blocks per blob
_READ_BLOCK = 256 * 1024
_CHUNK = 4 * _MB  # download range size: bounded memory
SCHEMES = ("az", "abfs", "abfss")


def split_url(url: str) -> tuple[str, str, str | None]:
    """``(container, prefix, account or None)`` of ``az://container/prefix`` or
    ``abfs://container@account.dfs.core.windows.net/prefix``."""
    scheme, _, rest = url.partition("://")
    netloc, _, prefix = rest.partition("/")
    container, account = netloc, None
    if "@" in netloc:
        container, _, host = netloc.partition("@")
        account = host.split(".", 1)[0] or None
    if scheme.lower() not in SCHEMES or not 3 <= len(container) <= 63:
        raise ConfigurationError("Azure URLs are az://<container>/<prefix> (container names have 3-63 characters). "
                                 f"Received: url={url!r}")
    return container, prefix.strip("/"), account


def _code(exc: Any) -> str:
    code = getattr(exc, "error_code", None)
    return str(getattr(code, "value", code) or getattr(exc, "status_code", None) or type(exc).__name__)


#: service error codes for a body that did not match the checksum sent with it
_DIGEST_CODES = {"Md5Mismatch", "Crc64Mismatch", "InvalidMd5", "InvalidCrc64"}


def _translate(exc: BaseException, where: str) -> BaseException | None:
    """The cloudckpt (or built-in) error an Azure SDK error stands for, or None to let it through. Messages name
    the error code, not the SDK's text (which may quote a request URL)."""
    from azure.core import exceptions as ae

    if not isinstance(exc, ae.AzureError):
        return None
    code, status = _code(exc), getattr(exc, "status_code", None)
    if isinstance(exc, ae.ClientAuthenticationError) or status in (401, 403):
        return AccessError(f"{where}: access denied or no usable credentials ({code}); the identity needs a role such "
                           "as Storage Blob Data Contributor (writers) or Reader on the container (docs/deploy.md)")
    if isinstance(exc, ae.ResourceNotFoundError):
        if code == "ContainerNotFound":
            return AccessError(f"{where}: no such container")
        return FileNotFoundError(f"{where}: no such object ({code})")
    if code in _DIGEST_CODES:
        return IntegrityError(f"{where}: the store refused a checksum of the bytes sent ({code})")
    if isinstance(exc, ae.ServiceResponseTimeoutError) or status == 408:
        return StoreError(f"{where}: the store did not answer in time ({code})", transient=True)
    if isinstance(exc, (ae.ServiceRequestError, ae.ServiceResponseError, ae.IncompleteReadError, ae.DecodeError)):
        return StoreError(f"{where}: connection failed ({code}: {type(exc).__name__})", transient=True)
    if status is None and isinstance(exc, ae.HttpResponseError):  # no answer: the body broke off mid-stream
        return StoreError(f"{where}: the connection broke while reading an answer ({type(exc).__name__})",
                          transient=True)
    if status is not None and (status == 429 or status >= 500):
        return StoreError(f"{where}: the store answered {status} ({code}); worth a retry", transient=True)
    return StoreError(f"{where}: the store answered {status} ({code})")


def _truthy(value: Any) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes", "on")


class AzureBackend(Backend):
    kind = "Azure"
    verification = ("MD5 of every request body checked by the service; the Put Blob answer's Content-MD5 (the "
                    "service's) compared with the bytes sent, or the block list committed by ids carrying each "
                    "block's verified MD5")

    #: storage options understood here (names follow adlfs where adlfs has one)
    OPTIONS = frozenset({"connection_string", "account_name", "account_key", "sas_token", "account_host", "anon",
                         "block_size", "max_concurrency", "transport"})

    def translate(self, exc: Exception) -> BaseException | None:
        return _translate(exc, self.url) or super().translate(exc)

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        super().__init__(url, storage_options)
        opts = self.storage_options
        if opts.get("transport", "sdk") != "sdk":
            raise ConfigurationError(f"{self.url}: Azure moves data with azure-storage-blob only. "
                                     f"Received: transport={opts['transport']!r}")
        self.container_name, self.prefix, account = split_url(url)
        if account:  # container@account.dfs.core.windows.net: shown without the host (it reads as user info)
            scheme = url.split("://", 1)[0]
            self.url = f"{scheme}://{self.container_name}" + (f"/{self.prefix}" if self.prefix else "")
        self.block_size = max(1 * _MB, min(4000 * _MB, int(opts.get("block_size", 8 * _MB))))
        self.max_concurrency = max(1, int(opts.get("max_concurrency", 8)))
        from azure.storage.blob import BlobServiceClient, ExponentialRetry

        client_kwargs: dict[str, Any] = {
            # 3 attempts per request, as botocore "standard" (the default waits 15 s first); ours retry whole operations
            "retry_policy": ExponentialRetry(initial_backoff=1, increment_base=2, retry_total=2,
                                             random_jitter_range=1),
            "connection_timeout": self.timeout[0], "read_timeout": self.timeout[1],
            "max_single_get_size": _CHUNK, "max_chunk_get_size": _CHUNK,
            "max_single_put_size": self.block_size, "max_block_size": self.block_size,
            "session": azure_session(http_pool_size(self.max_concurrency)),
            # answers are read in blocks of this size (azure-core reads 4 KiB at a time through Python by default)
            "connection_data_block_size": _READ_BLOCK,
        }
        conn = opts.get("connection_string")
        account = opts.get("account_name") or account
        if conn is None and account is None and not any(opts.get(k) for k in ("account_key", "sas_token")):
            conn = os.environ.get("AZURE_STORAGE_CONNECTION_STRING")
        if conn:
            self.service = BlobServiceClient.from_connection_string(conn, **client_kwargs)
        else:
            account = account or os.environ.get("AZURE_STORAGE_ACCOUNT_NAME") or os.environ.get("AZURE_STORAGE_ACCOUNT")
            if not account:
                raise ConfigurationError(f"{self.url}: no Azure storage account: set the storage option account_name "
                                         "(-o account_name=...), $AZURE_STORAGE_ACCOUNT_NAME or "
                                         "$AZURE_STORAGE_CONNECTION_STRING")
            host = opts.get("account_host") or f"{account}.blob.core.windows.net"
            account_url = host if "://" in host else f"https://{host}"
            self.service = BlobServiceClient(account_url, credential=self._credential(account), **client_kwargs)
        self.container = self.service.get_container_client(self.container_name)
        self._slots = threading.BoundedSemaphore(self.max_concurrency)  # blocks in memory, over all uploads

    def _credential(self, account: str) -> Any:
        """The credential for an account URL: a key, a SAS token, none (``anon``) or DefaultAzureCredential."""
        opts, env = self.storage_options, os.environ
        key = opts.get("account_key") or (None if opts.get("sas_token") else
                                           env.get("AZURE_STORAGE_ACCOUNT_KEY") or env.get("AZURE_STORAGE_KEY"))
        if key:
            return {"account_name": account, "account_key": key}
        sas = opts.get("sas_token") or env.get("AZURE_STORAGE_SAS_TOKEN")
        if sas:
            return sas.lstrip("?")
        if _truthy(opts.get("anon", False)):
            return None
        try:
            from azure.identity import DefaultAzureCredential
        except ImportError as e:
            raise ConfigurationError(f"{self.url}: no key, SAS token or connection string given, and azure-identity "
                                     "(for managed identities) is missing: pip install 'cloudckpt[azure]'") from e
        return DefaultAzureCredential()

    def _name(self, rel: str) -> str:
        return f"{self.prefix}/{rel}" if self.prefix else rel

    def _blob(self, rel: str) -> Any:
        return self.container.get_blob_client(self._name(rel))

    # --- index -------------------------------------------------------------------------------------------------

    def read_index(self, known: Any = None) -> tuple[bytes | None, Any]:
        from azure.core import MatchConditions
        from azure.core.exceptions import ResourceModifiedError, ResourceNotFoundError

        cond = {"etag": known, "match_condition": MatchConditions.IfModified} if known else {}
        for _ in range(5):
            try:
                stream = self._blob(INDEX_NAME).download_blob(**cond)
                return stream.readall(), stream.properties.etag
            except ResourceNotFoundError as e:
                if _code(e) == "ContainerNotFound":
                    raise  # a missing container is not an empty run
                return None, None
            except ResourceModifiedError as e:
                if known and e.status_code == 304:
                    return UNCHANGED, known
                continue  # replaced between two ranges of a large index: read again
        raise IndexConflictError(f"{self.url}: index keeps changing while being read")

    def write_index(self, data: bytes, token: Any) -> Any:
        return self.put_if(INDEX_NAME, data, token)

    def put_if(self, rel: str, data: bytes, token: Any) -> Any:
        from azure.core import MatchConditions
        from azure.core.exceptions import ResourceExistsError, ResourceModifiedError
        from azure.storage.blob import ContentSettings

        cond = ({"overwrite": True, "etag": token, "match_condition": MatchConditions.IfNotModified}
                if token is not None else {"overwrite": False})  # overwrite=False sends If-None-Match: *
        try:
            resp = self._blob(rel).upload_blob(data, length=len(data), **cond,
                                               content_settings=ContentSettings(content_type="application/json"))
        except (ResourceExistsError, ResourceModifiedError) as e:
            raise IndexConflictError(f"{self.url}: {rel} changed since it was read") from e
        return resp["etag"]

    # --- objects -----------------------------------------------------------------------------------------------

    def upload(self, source: Source, rel: str, *, deadline: float | None = None,
               progress: Progress | None = None) -> None:
        blob = self._blob(rel)
        if source.size <= self.block_size:
            md5, answered = self._put(blob, source, deadline, progress)
            if answered is None or bytes(answered) != md5:  # the answer proves nothing: read the blob's properties
                self.remaining(deadline)
                props = blob.get_blob_properties()
                stored_md5 = props.content_settings.content_md5
                if props.size != source.size or stored_md5 is None or bytes(stored_md5) != md5:
                    raise IntegrityError(f"{self.url}/{rel}: stored object is {props.size} bytes, Content-MD5 "
                                         f"{bytes(stored_md5 or b'').hex()}; sent {source.size} bytes, MD5 {md5.hex()}")
        else:
            sent = self._put_blocks(blob, source, deadline, progress)
            if sum(size for _, size in sent) != source.size:
                raise IntegrityError(f"{self.url}/{rel}: committed {sum(size for _, size in sent)} bytes in blocks, "
                                     f"read {source.size}")
        self.check_uploaded(rel, source.crc32c())

    def _put(self, blob: Any, source: Source, deadline: float | None,
             progress: Progress | None) -> tuple[bytes, Any]:
        """One Put Blob from one read of the file, its MD5 checked by the service; return that MD5 and the Content-MD5
        of the answer (the service's MD5 of the blob it stored; None when it sent none)."""
        from azure.storage.blob import ContentSettings

        acquire(self._slots, self.remaining(deadline))
        try:
            data = source.read()
            md5 = hashlib.md5(data, usedforsecurity=False).digest()
            self.remaining(deadline)
            answer = blob.upload_blob(_body(data, progress), length=len(data), overwrite=True, max_concurrency=1,
                                      content_settings=ContentSettings(content_md5=bytearray(md5)))
        finally:
            self._slots.release()
        return md5, (answer or {}).get("content_md5")

    def _put_blocks(self, blob: Any, source: Source, deadline: float | None,
                    progress: Progress | None) -> list[tuple[str, int]]:
        """Blocks read in order from one pass over the file, staged in parallel, each with its Content-MD5; then the
        block list committed. Return ``[(block id, size)]`` as committed."""
        block_size = max(self.block_size, -(-source.size // _MAX_BLOCKS))

        def stage(number: int, data: bytes) -> tuple[str, int]:
            md5 = hashlib.md5(data, usedforsecurity=False).digest()
            block_id = f"{number:05d}-{md5.hex()}"  # every id of a blob has the same length
            blob.stage_block(block_id, _body(data, progress), length=len(data), transactional_content_md5=md5)
            return block_id, len(data)

        # staged blocks that are never committed are discarded by the service after 7 days
        sent = send_parts(source, block_size, stage, slots=self._slots, remaining=lambda: self.remaining(deadline),
                          workers=self.max_concurrency, name="cloudckpt-az-block")
        self.remaining(deadline)
        blob.commit_block_list([block_id for block_id, _ in sent])
        return sent

    def download(self, rel: str, local: Path, *, deadline: float | None = None,
                 progress: Progress | None = None) -> str | None:
        with open(local, "wb") as f:
            out = HashingWriter(f, progress)
            self._fetch(rel, out.write, deadline)
        return out.crc32c()

    def read_stream(self, rel: str, sink: Callable[[bytes], object], *, deadline: float | None = None) -> None:
        self._fetch(rel, sink, deadline)

    def _fetch(self, rel: str, sink: Callable[[bytes], object], deadline: float | None) -> None:
        """Stream the object in ranges pinned to its ETag into ``sink``."""
        self.remaining(deadline)
        for chunk in self._blob(rel).download_blob(max_concurrency=1).chunks():
            sink(chunk)
            self.remaining(deadline)

    def read_bytes(self, rel: str) -> bytes:
        return self._blob(rel).download_blob().readall()

    def read_range(self, rel: str, start: int, length: int, *, deadline: float | None = None,
                   last: bool = False) -> bytes:
        if length == 0:
            return b""
        from azure.core.exceptions import HttpResponseError

        self.remaining(deadline)
        try:
            data = self._blob(rel).download_blob(offset=start, length=length + last).readall()
        except HttpResponseError as e:
            if e.status_code == 416:
                raise self.past_end(rel, start) from e
            raise
        return self.check_range(rel, start, length, data, last)

    def write_bytes(self, rel: str, data: bytes) -> None:
        md5 = hashlib.md5(data, usedforsecurity=False).digest()
        from azure.storage.blob import ContentSettings

        self._blob(rel).upload_blob(data, length=len(data), overwrite=True,
                                    content_settings=ContentSettings(content_md5=bytearray(md5)))

    def list_objects(self) -> list[ObjectInfo]:
        base = f"{self.prefix}/" if self.prefix else ""
        return [ObjectInfo(b.name[len(base):], b.size or 0, b.last_modified.timestamp() if b.last_modified else 0.0)
                for b in self.container.list_blobs(name_starts_with=base or None)]

    def delete(self, rels: list[str]) -> None:
        from azure.core.exceptions import ResourceNotFoundError

        def one(rel: str) -> None:
            try:
                self._blob(rel).delete_blob()
            except ResourceNotFoundError as e:
                if _code(e) == "ContainerNotFound":
                    raise

        if len(rels) <= 1:
            for rel in rels:
                one(rel)
            return
        with ThreadPoolExecutor(min(8, len(rels)), thread_name_prefix="cloudckpt-az-delete") as pool:
            list(pool.map(one, rels))

