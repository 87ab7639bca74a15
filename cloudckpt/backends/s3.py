"""S3 (and S3-compatible stores) through boto3: uploads in parallel parts read in one pass over the file, each checked
by the server (:mod:`~cloudckpt.backends.s3_upload`); downloads as one streaming GET hashed as it is written; listing
with ListObjectsV2 (no stale listing cache); the index through conditional PutObject (``If-None-Match: *`` to create,
``If-Match: <etag>`` to swap); botocore's errors translated into the cloudckpt hierarchy (:func:`_translate`).

Why not s3fs on this path: ``put_file`` reads files under ~100 MiB whole into memory and buffers ~500 MiB per large
file, ``get_file`` grew memory past the object's size (tests/test_large_files.py). Any other fsspec URL still goes
through fsspec.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..checksum import HashingWriter
from ..concurrency import http_pool_size
from ..errors import AccessError, ConfigurationError, IndexConflictError, StoreError
from ..layout import INDEX_NAME
from ..versions import MIN_BOTOCORE, require
from .base import UNCHANGED, Backend, ObjectInfo, Progress
from .fsspec_objects import FsspecObjects
from .s3_upload import S3Uploads, _name_the_checksum

_MB = 2**20


def _split(url: str) -> tuple[str, str]:
    rest = url[len("s3://"):]
    bucket, _, prefix = rest.partition("/")
    if len(bucket) < 3:
        raise ConfigurationError(f"S3 bucket names have 3 or more characters. Received: url={url!r}")
    return bucket, prefix.strip("/")


#: S3 error codes: access refused; the body did not match the checksum sent with it; worth another attempt
_DENIED_CODES = {"AccessDenied", "AllAccessDisabled", "AccountProblem", "InvalidObjectState"}
_REJECTED_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken"}  # the credentials themselves
_DIGEST_CODES = {"BadDigest", "InvalidDigest", "XAmzContentChecksumMismatch", "XAmzContentSHA256Mismatch"}
_TRANSIENT_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed",
                    "InternalError", "ServiceUnavailable", "TooManyRequests", "ExpiredToken", "RequestExpired"}


def _translate(exc: Exception, url: str) -> BaseException | None:
    """botocore's errors (aiobotocore's, under s3fs, derive from them) in the cloudckpt hierarchy."""
    from botocore import exceptions as bc

    if isinstance(exc, (bc.NoCredentialsError, bc.PartialCredentialsError, bc.CredentialRetrievalError,
                        bc.TokenRetrievalError)):
        return AccessError(f"{url}: no AWS credentials found ({type(exc).__name__}); set AWS_ACCESS_KEY_ID and "
                           "AWS_SECRET_ACCESS_KEY or AWS_PROFILE, use an instance role, or pass -o key=... "
                           "-o secret=...")
    if isinstance(exc, (bc.NoRegionError, bc.ProfileNotFound, bc.InvalidConfigError)):
        return AccessError(f"{url}: client configuration is incomplete ({type(exc).__name__}: {exc})")
    if isinstance(exc, bc.ClientError):
        code = str(exc.response.get("Error", {}).get("Code") or "")
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        if code in _REJECTED_CODES:
            return AccessError(f"{url}: the store rejected the credentials ({code}): the access key or secret is "
                               "wrong; check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or -o key/secret")
        if code in _DENIED_CODES or status in (401, 403):
            return AccessError(f"{url}: access denied ({code or status}: {exc}); the credentials lack permission "
                               "for this run")
        if code in ("NoSuchBucket", "InvalidBucketName"):
            return AccessError(f"{url}: no such bucket ({exc})")
        if code in ("NoSuchKey", "404"):
            return FileNotFoundError(f"{url}: no such object ({exc})")
        if code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412):
            return IndexConflictError(f"{url}: a conditional write was refused ({exc})")
        if code in _DIGEST_CODES:
            return StoreError(f"{url}: the store refused the checksum of the bytes sent ({exc})", transient=True)
        return StoreError(f"{url}: {exc}", transient=code in _TRANSIENT_CODES or status in (408, 429) or status >= 500)
    if isinstance(exc, bc.EndpointConnectionError):  # worth a retry; if it lasts, the endpoint is wrong or down
        return StoreError(f"{url}: could not connect to {exc.kwargs.get('endpoint_url', 'the store')}; check the "
                          "endpoint (-o endpoint_url, AWS_ENDPOINT_URL) and the network", transient=True)
    if isinstance(exc, bc.BotoCoreError):  # connection, timeout, streaming and checksum errors are worth a retry
        transient = isinstance(exc, (bc.ConnectionError, bc.HTTPClientError, bc.IncompleteReadError,
                                     bc.FlexibleChecksumError, bc.ChecksumError))
        return StoreError(f"{url}: {type(exc).__name__}: {exc}", transient=transient)
    return None


_LOADER_LOCK = threading.Lock()
_LOADER: Any = None


def _botocore_session() -> Any:
    """A fresh botocore session (credentials are resolved anew for each store) sharing one data loader, so the S3
    service model is parsed once per process instead of once per store (half the cost of opening a store)."""
    global _LOADER
    import botocore.session

    session = botocore.session.get_session()
    with _LOADER_LOCK:
        if _LOADER is None:
            _LOADER = session.get_component("data_loader")
        session.register_component("data_loader", _LOADER)
    return session


class S3Backend(S3Uploads, Backend):
    verification = ("crc32c of every request body checked by the server; a PutObject answer whose ETag is the MD5 of "
                    "the bytes sent, else (multipart, SSE-KMS) object size and crc32c (multipart: the composite of the "
                    "parts' crc32cs, or the full-object crc32c) from a HEAD, compared with the bytes sent")

    kind = "S3"
    #: storage options understood here (names follow s3fs where s3fs has one)
    OPTIONS = frozenset({"key", "secret", "token", "endpoint_url", "profile", "region", "client_kwargs",
                         "config_kwargs", "part_size", "max_concurrency", "request_checksum_calculation",
                         "multipart_checksum", "transport"})

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        super().__init__(url, storage_options)
        self.bucket, self.prefix = _split(self.url)
        opts = self.storage_options
        self.part_size = max(5 * _MB, int(opts.get("part_size", 8 * _MB)))
        self.max_concurrency = max(1, int(opts.get("max_concurrency", 8)))
        import boto3
        import botocore
        import botocore.config

        client_kwargs = dict(opts.get("client_kwargs") or {})
        config_kwargs = dict(opts.get("config_kwargs") or {})
        config_kwargs.setdefault("retries", {"mode": "standard", "max_attempts": 3})
        config_kwargs.setdefault("max_pool_connections", http_pool_size(self.max_concurrency))
        config_kwargs.setdefault("connect_timeout", self.timeout[0])
        config_kwargs.setdefault("read_timeout", self.timeout[1])
        if opts.get("request_checksum_calculation"):  # "when_required" for stores that reject CRC32 headers
            config_kwargs["request_checksum_calculation"] = opts["request_checksum_calculation"]
            config_kwargs["response_checksum_validation"] = opts["request_checksum_calculation"]
        if opts.get("region"):
            client_kwargs.setdefault("region_name", opts["region"])
        session = boto3.session.Session(botocore_session=_botocore_session(), profile_name=opts.get("profile"))
        self.client = session.client(
            "s3",
            endpoint_url=opts.get("endpoint_url") or client_kwargs.pop("endpoint_url", None),
            aws_access_key_id=opts.get("key"),
            aws_secret_access_key=opts.get("secret"),
            aws_session_token=opts.get("token"),
            config=botocore.config.Config(**config_kwargs),
            **client_kwargs,
        )
        put_object = self.client.meta.service_model.operation_model("PutObject").input_shape.members
        require("botocore", botocore.__version__, MIN_BOTOCORE, "S3 PutObject with IfMatch swaps the index",
                ok="IfMatch" in put_object)
        # what the server checks: a crc32c per request and of the whole object, else (stores that take no flexible
        # checksums) a Content-MD5 per request
        self.send_checksums = opts.get("request_checksum_calculation", "when_supported") != "when_required"
        # the stored checksum of a multipart object: the composite of its parts' crc32cs (default: what S3 and
        # S3-compatible stores have long supported, and no extra server work), or its full-object crc32c, the
        # manifest's ("full_object": S3 since 2024-12, botocore >= 1.36; moto hashes the whole object again)
        mode = opts.get("multipart_checksum", "composite")
        if mode not in ("composite", "full_object"):
            raise ConfigurationError(
                f"{self.url}: multipart_checksum must be 'composite' or 'full_object'. Received: {mode!r}")
        create = self.client.meta.service_model.operation_model("CreateMultipartUpload").input_shape.members
        if mode == "full_object":
            require("botocore", botocore.__version__, "1.36", "multipart_checksum='full_object'",
                    ok="ChecksumType" in create)
        self._full_object = mode == "full_object"
        self._slots = threading.BoundedSemaphore(self.max_concurrency)  # parts in memory, over all uploads
        for op in ("PutObject", "UploadPart"):
            self.client.meta.events.register(f"before-sign.s3.{op}", _name_the_checksum)

    def _key(self, rel: str) -> str:
        return f"{self.prefix}/{rel}" if self.prefix else rel

    def translate(self, exc: Exception) -> BaseException | None:
        return _translate(exc, self.url) or super().translate(exc)

    # --- index -------------------------------------------------------------------------------------------------

    def read_index(self, known: Any = None) -> tuple[bytes | None, Any]:
        try:
            resp = self.client.get_object(Bucket=self.bucket, Key=self._key(INDEX_NAME),
                                          **({"IfNoneMatch": known} if known else {}))
        except self.client.exceptions.NoSuchKey:
            return None, None
        except self.client.exceptions.ClientError as e:
            if known and e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 304:
                return UNCHANGED, known
            if self._missing_behind_403(e, INDEX_NAME):
                return None, None
            raise
        return resp["Body"].read(), resp["ETag"]

    def _missing_behind_403(self, error: Any, rel: str) -> bool:
        """S3 answers a GET of a missing key with 403 AccessDenied, not 404, to a caller without ``s3:ListBucket``
        (so that a read-only role can't probe for keys). After such a 403, list exactly this key: absent means the
        object is missing (an empty run; a checkpoint pruned under a pull), present means a real denial."""
        if error.response.get("Error", {}).get("Code") != "AccessDenied":
            return False
        key = self._key(rel)
        try:
            resp = self.client.list_objects_v2(Bucket=self.bucket, Prefix=key, MaxKeys=1)
        except self.client.exceptions.ClientError as e:
            if e.response.get("Error", {}).get("Code") == "AccessDenied":
                raise AccessError(f"{self.url}/{rel}: access denied, and so is listing the run prefix, so a "
                                      "missing object can't be told from a forbidden one: grant s3:ListBucket on "
                                      "the run prefix (docs/deploy.md)") from error
            raise  # transient (or other) trouble listing: the caller's retry decides
        return not any(o.get("Key") == key for o in resp.get("Contents", []))

    def write_index(self, data: bytes, token: Any) -> Any:
        return self.put_if(INDEX_NAME, data, token)

    def put_if(self, rel: str, data: bytes, token: Any) -> Any:
        cond = {"IfMatch": token} if token is not None else {"IfNoneMatch": "*"}
        resp = self.client.put_object(Bucket=self.bucket, Key=self._key(rel), Body=data,
                                      ContentType="application/json", **cond)  # refused: IndexConflictError
        return resp.get("ETag")

    # --- objects -----------------------------------------------------------------------------------------------

    def download(self, rel: str, local: Path, *, deadline: float | None = None,
                 progress: Progress | None = None) -> str | None:
        # One streaming GET written in 256 KiB blocks: bounded memory (s3fs get_file grew RSS past the object size
        # here), and no ranged GETs (which S3-compatible test servers serve by re-reading the whole object). Reads
        # of 1-8 MiB cost urllib3 extra buffer copies: 1 GiB took ~1.7x longer, ~2x the CPU (measured by hand).
        # The bytes are hashed as they are written: the caller compares that crc32c, no second pass over the file.
        with open(local, "wb") as f:
            out = HashingWriter(f, progress)
            self.read_stream(rel, out.write, deadline=deadline)
        return out.crc32c()

    def read_stream(self, rel: str, sink: Callable[[bytes], object], *, deadline: float | None = None) -> None:
        for chunk in self._get(rel)["Body"].iter_chunks(256 * 1024):
            sink(chunk)
            self.remaining(deadline)

    def read_bytes(self, rel: str) -> bytes:
        return self._get(rel)["Body"].read()

    def read_range(self, rel: str, start: int, length: int, *, deadline: float | None = None,
                   last: bool = False) -> bytes:
        if length == 0:
            return b""
        self.remaining(deadline)
        try:
            data = self._get(rel, Range=f"bytes={start}-{start + length - 1 + last}")["Body"].read()
        except self.client.exceptions.ClientError as e:
            if e.response.get("Error", {}).get("Code") == "InvalidRange":
                raise self.past_end(rel, start) from e
            raise
        return self.check_range(rel, start, length, data, last)

    def _get(self, rel: str, **extra: Any) -> dict:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(rel), **extra)
        except self.client.exceptions.NoSuchKey as e:  # the contract's built-in: callers test FileNotFoundError
            raise FileNotFoundError(f"{self.url}/{rel}: no such object") from e
        except self.client.exceptions.ClientError as e:
            if self._missing_behind_403(e, rel):
                raise FileNotFoundError(f"{self.url}/{rel}: no such object") from e
            raise

    def write_bytes(self, rel: str, data: bytes) -> None:
        # the body's crc32c (or Content-MD5) rides with it: a manifest can carry small files inline (cloudckpt.inline)
        self.client.put_object(Bucket=self.bucket, Key=self._key(rel), Body=data, **self._body_checksum(data))

    def list_objects(self) -> list[ObjectInfo]:
        out = []
        paginator = self.client.get_paginator("list_objects_v2")
        base = f"{self.prefix}/" if self.prefix else ""
        for page in paginator.paginate(Bucket=self.bucket, Prefix=base):
            for obj in page.get("Contents", []):
                out.append(ObjectInfo(obj["Key"][len(base):], obj["Size"], obj["LastModified"].timestamp()))
        return out

    def delete(self, rels: list[str]) -> None:
        for i in range(0, len(rels), 1000):
            batch = [{"Key": self._key(r)} for r in rels[i:i + 1000]]
            resp = self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
            errors = [e for e in resp.get("Errors", []) if e.get("Code") != "NoSuchKey"]
            if errors:  # per-key errors come in a 200 answer
                message = f"{self.url}: could not delete {len(errors)} objects: {errors[0]}"
                if any(e.get("Code") in _DENIED_CODES for e in errors):
                    raise AccessError(message)
                raise StoreError(message, transient=True)


class S3FsspecBackend(FsspecObjects, S3Backend):
    """``transport="fsspec"``: data through s3fs (bounded by s3fs's own buffering), the index still by boto3 CAS."""

    verification = ("object size; the bytes written to s3fs are the bytes hashed, each request's CRC32 checked by "
                    "the server")

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        super().__init__(url, storage_options)
        import s3fs

        opts = self.storage_options
        fs_opts: dict[str, Any] = {k: opts[k] for k in ("key", "secret", "token", "endpoint_url", "profile",
                                                         "client_kwargs") if k in opts}
        fs_opts["config_kwargs"] = {"connect_timeout": self.timeout[0], "read_timeout": self.timeout[1],
                                    **(opts.get("config_kwargs") or {})}
        self.fs = s3fs.S3FileSystem(**fs_opts)
        self.fs.retries = 2  # botocore already retries each request; s3fs's own loop would multiply it
        self.root = f"{self.bucket}/{self.prefix}" if self.prefix else self.bucket

    def translate(self, exc: Exception) -> BaseException | None:
        """aiohttp's errors under s3fs (a dropped connection, a short answer) are worth a retry; then botocore's."""
        import aiohttp

        if isinstance(exc, aiohttp.ClientError):
            return StoreError(f"{self.url}: {type(exc).__name__}: {exc}", transient=True)
        return super().translate(exc)
