"""S3 (and S3-compatible stores) through boto3: uploads by the transfer manager (streamed from disk, parallel parts,
bounded memory), downloads as one streaming GET, listing with ListObjectsV2 (no stale listing cache), and the index
through conditional PutObject (``If-None-Match: *`` to create, ``If-Match: <etag>`` to swap).

Why not s3fs on this path: ``put_file`` reads files under ~100 MiB whole into memory and buffers ~500 MiB per
large file (shared/NOTES.md), ``get_file`` grew memory past the object's size (tests/test_large_files.py), and
boto3's TransferManager was 2x faster against the same server. Any other fsspec URL still goes through fsspec. Every request body carries a CRC32 that the server checks
(botocore's default flexible checksums); after the upload the object's size is compared, and a full-object CRC32
reported by the server (single-part uploads) is compared with ours.
"""

from __future__ import annotations

import base64
import threading
import zlib
from pathlib import Path
from collections.abc import Callable
from typing import Any

from ..errors import ConfigurationError, IndexConflictError, IntegrityError
from ..manifest import INDEX_NAME
from ..versions import MIN_BOTOCORE, require
from .base import UNCHANGED, Backend, ObjectInfo, Progress
from .fsspec_objects import FsspecObjects

_MB = 2**20


def _split(url: str) -> tuple[str, str]:
    rest = url[len("s3://"):]
    bucket, _, prefix = rest.partition("/")
    if len(bucket) < 3:
        raise ConfigurationError(f"S3 bucket names have 3 or more characters. Received: url={url!r}")
    return bucket, prefix.strip("/")


def _crc32_b64(path: Path) -> str:
    crc = 0
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(8 * _MB):
            crc = zlib.crc32(chunk, crc)
    return base64.b64encode(crc.to_bytes(4, "big")).decode()


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


class S3Backend(Backend):
    verification = "server-checked CRC32 of every request, object size, full-object CRC32 where the server has one"

    #: storage options understood here (names follow s3fs where s3fs has one)
    OPTIONS = {"key", "secret", "token", "endpoint_url", "profile", "region", "client_kwargs", "config_kwargs",
               "part_size", "max_concurrency", "request_checksum_calculation", "transport"}

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        super().__init__(url, storage_options)
        self.bucket, self.prefix = _split(self.url)
        opts = self.storage_options
        unknown = set(opts) - self.OPTIONS
        if unknown:
            raise ConfigurationError(f"{url}: unknown S3 storage option(s) {sorted(unknown)}; known: {sorted(self.OPTIONS)}")
        self.part_size = max(5 * _MB, int(opts.get("part_size", 16 * _MB)))
        self.max_concurrency = max(1, int(opts.get("max_concurrency", 8)))
        import boto3
        import botocore
        import botocore.config
        from boto3.s3.transfer import TransferConfig

        client_kwargs = dict(opts.get("client_kwargs") or {})
        config_kwargs = dict(opts.get("config_kwargs") or {})
        config_kwargs.setdefault("retries", {"mode": "standard", "max_attempts": 3})
        config_kwargs.setdefault("max_pool_connections", max(10, self.max_concurrency + 2))
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
        self.transfer = TransferConfig(
            multipart_threshold=self.part_size, multipart_chunksize=self.part_size,
            max_concurrency=self.max_concurrency, use_threads=True,
        )

    def _key(self, rel: str) -> str:
        return f"{self.prefix}/{rel}" if self.prefix else rel

    def check_access(self) -> None:
        self.client.head_bucket(Bucket=self.bucket)

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
            raise
        return resp["Body"].read(), resp["ETag"]

    def write_index(self, data: bytes, token: Any) -> Any:
        cond = {"IfMatch": token} if token is not None else {"IfNoneMatch": "*"}
        try:
            resp = self.client.put_object(Bucket=self.bucket, Key=self._key(INDEX_NAME), Body=data,
                                          ContentType="application/json", **cond)
            return resp.get("ETag")
        except self.client.exceptions.ClientError as e:
            code = e.response.get("Error", {}).get("Code")
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412):
                raise IndexConflictError(f"{self.url}: index changed since it was read") from e
            raise

    # --- objects -----------------------------------------------------------------------------------------------

    def upload(self, local: Path, rel: str, *, size: int, crc32c: Callable[[], str],
               progress: Progress | None = None) -> None:
        key = self._key(rel)
        self.client.upload_file(str(local), self.bucket, key, Config=self.transfer, Callback=progress)
        head = self.client.head_object(Bucket=self.bucket, Key=key, ChecksumMode="ENABLED")
        if head["ContentLength"] != size:
            raise IntegrityError(f"{self.url}/{rel}: stored object is {head['ContentLength']} bytes, expected {size}")
        server_crc = head.get("ChecksumCRC32")
        single_part = "-" not in head.get("ETag", "")
        if server_crc and single_part and head.get("ChecksumType", "FULL_OBJECT") == "FULL_OBJECT":
            if server_crc != _crc32_b64(local):
                raise IntegrityError(f"{self.url}/{rel}: server CRC32 {server_crc} differs from the local file's")
        self.check_uploaded(rel, crc32c())

    def download(self, rel: str, local: Path, *, progress: Progress | None = None) -> None:
        # One streaming GET written in 256 KiB blocks: bounded memory (s3fs get_file grew RSS past the object size
        # here), and no ranged GETs (which S3-compatible test servers serve by re-reading the whole object). Reads
        # of 1-8 MiB cost urllib3 extra buffer copies: 1 GiB took ~1.7x longer, ~2x the CPU (docs/benchmarks.md).
        with open(local, "wb") as f:
            self.read_stream(rel, f.write, progress)

    def read_stream(self, rel: str, sink: Callable[[bytes], None], progress: Progress | None = None) -> None:
        for chunk in self._get(rel)["Body"].iter_chunks(256 * 1024):
            sink(chunk)
            if progress:
                progress(len(chunk))

    def read_bytes(self, rel: str) -> bytes:
        return self._get(rel)["Body"].read()

    def _get(self, rel: str) -> dict:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(rel))
        except self.client.exceptions.NoSuchKey as e:  # the contract's built-in: callers test FileNotFoundError
            raise FileNotFoundError(f"{self.url}/{rel}: no such object") from e

    def write_bytes(self, rel: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._key(rel), Body=data)

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
            if errors:  # per-key errors come in a 200 answer: AccessDenied is permanent, not a retryable OSError
                denied = any(e.get("Code") in ("AccessDenied", "AllAccessDisabled") for e in errors)
                raise (PermissionError if denied else OSError)(
                    f"{self.url}: could not delete {len(errors)} objects: {errors[0]}")


class S3FsspecBackend(FsspecObjects, S3Backend):
    """``transport="fsspec"``: data through s3fs (bounded by s3fs's own buffering), the index still by boto3 CAS."""

    verification = "object size (data through s3fs)"

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        super().__init__(url, storage_options)
        import s3fs

        opts = self.storage_options
        fs_opts = {k: opts[k] for k in ("key", "secret", "token", "endpoint_url", "profile", "client_kwargs",
                                        "config_kwargs") if k in opts}
        self.fs = s3fs.S3FileSystem(**fs_opts)
        self.fs.retries = 2  # botocore already retries each request; s3fs's own loop would multiply it
        self.root = f"{self.bucket}/{self.prefix}" if self.prefix else self.bucket
