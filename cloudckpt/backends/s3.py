"""S3 (and S3-compatible stores) through boto3: uploads in parallel parts read in one pass over the file, each
request's body checked by the server against a crc32c computed from exactly the bytes sent, and the object checked
as a whole after the upload (size, and its full-object crc32c: the crc32c the manifest records); downloads as one
streaming GET hashed as it is written; listing with ListObjectsV2 (no stale listing cache); the index through
conditional PutObject (``If-None-Match: *`` to create, ``If-Match: <etag>`` to swap).

Why not boto3's transfer manager: it reads the file again for each part and each retry, so a file that changes
during the push can be stored torn while the checksum came from another read; here a part is read once into
memory (at most ``max_concurrency`` parts per store) and a retry re-sends those same bytes. Why not s3fs on this
path: ``put_file`` reads files under ~100 MiB whole into memory and buffers ~500 MiB per large file
(shared/NOTES.md), ``get_file`` grew memory past the object's size (tests/test_large_files.py). Any other fsspec URL
still goes through fsspec.
"""

from __future__ import annotations

import base64
import hashlib
import io
import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import google_crc32c

from ..checksum import HashingWriter
from ..errors import ConfigurationError, IndexConflictError, IntegrityError
from ..manifest import INDEX_NAME
from ..source import Source
from ..versions import MIN_BOTOCORE, require
from .base import UNCHANGED, Backend, ObjectInfo, Progress
from .fsspec_objects import FsspecObjects

_MB = 2**20
log = logging.getLogger(__name__)


def _split(url: str) -> tuple[str, str]:
    rest = url[len("s3://"):]
    bucket, _, prefix = rest.partition("/")
    if len(bucket) < 3:
        raise ConfigurationError(f"S3 bucket names have 3 or more characters. Received: url={url!r}")
    return bucket, prefix.strip("/")


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def _same_checksum(got: str | None, want: str) -> bool:
    """A composite checksum is reported as ``<base64>-<parts>`` by S3 (some servers leave out the part count)."""
    if got is None:
        return False
    return got == want or ("-" in want and "-" not in got and got == want.partition("-")[0])


class _Sending(io.BytesIO):
    """A request body that tells ``progress`` of the bytes the client reads to send. A rewind (for a retry, or after
    the client hashed the body to sign it) takes back what was read past the new position; a seek that only
    measures the body (to its end and back) counts nothing."""

    def __init__(self, data: bytes, progress: Progress) -> None:
        super().__init__(data)
        self._progress = progress
        self._counted = 0  # bytes [0, _counted) have been reported

    def read(self, n: int | None = -1) -> bytes:
        data = super().read(n)
        if self.tell() > self._counted:
            self._progress(self.tell() - self._counted)
            self._counted = self.tell()
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        after = super().seek(offset, whence)
        if after < self._counted:
            self._progress(after - self._counted)
            self._counted = after
        return after


def _name_the_checksum(request: Any, **kwargs: Any) -> None:
    """A request that carries its body's crc32c also names the algorithm (``x-amz-sdk-checksum-algorithm``, as
    botocore does for ``ChecksumAlgorithm``): some S3-compatible servers record the checksum only then."""
    if "x-amz-checksum-crc32c" in request.headers and "x-amz-sdk-checksum-algorithm" not in request.headers:
        request.headers["x-amz-sdk-checksum-algorithm"] = "CRC32C"


def _body(data: bytes, progress: Progress | None) -> Any:
    return data if progress is None else _Sending(data, progress)


#: S3 error codes for a request whose body did not match the checksum sent with it
_DIGEST_CODES = {"BadDigest", "InvalidDigest", "XAmzContentChecksumMismatch", "XAmzContentSHA256Mismatch"}


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
    verification = ("crc32c of every request body checked by the server; object size and full-object crc32c (composite "
                    "of the parts' with botocore < 1.36) compared with the bytes sent")

    #: storage options understood here (names follow s3fs where s3fs has one)
    OPTIONS = {"key", "secret", "token", "endpoint_url", "profile", "region", "client_kwargs", "config_kwargs",
               "part_size", "max_concurrency", "request_checksum_calculation", "transport"}

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        super().__init__(url, storage_options)
        self.bucket, self.prefix = _split(self.url)
        opts = self.storage_options
        unknown = set(opts) - self.OPTIONS
        if unknown:
            raise ConfigurationError(
                f"{self.url}: unknown S3 storage option(s) {sorted(unknown)}; known: {sorted(self.OPTIONS)}")
        self.part_size = max(5 * _MB, int(opts.get("part_size", 8 * _MB)))
        self.max_concurrency = max(1, int(opts.get("max_concurrency", 8)))
        import boto3
        import botocore
        import botocore.config

        client_kwargs = dict(opts.get("client_kwargs") or {})
        config_kwargs = dict(opts.get("config_kwargs") or {})
        config_kwargs.setdefault("retries", {"mode": "standard", "max_attempts": 3})
        config_kwargs.setdefault("max_pool_connections", max(10, self.max_concurrency + 2))
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
        create = self.client.meta.service_model.operation_model("CreateMultipartUpload").input_shape.members
        self._full_object = "ChecksumType" in create  # botocore >= 1.36: full-object crc32c of multipart objects
        self._slots = threading.BoundedSemaphore(self.max_concurrency)  # parts in memory, over all uploads
        for op in ("PutObject", "UploadPart"):
            self.client.meta.events.register(f"before-sign.s3.{op}", _name_the_checksum)

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
                raise PermissionError(f"{self.url}/{rel}: access denied, and so is listing the run prefix, so a "
                                      "missing object can't be told from a forbidden one: grant s3:ListBucket on "
                                      "the run prefix (docs/deploy.md)") from error
            raise  # transient (or other) trouble listing: the caller's retry decides
        return not any(o.get("Key") == key for o in resp.get("Contents", []))

    def write_index(self, data: bytes, token: Any) -> Any:
        return self.put_if(INDEX_NAME, data, token)

    def put_if(self, rel: str, data: bytes, token: Any) -> Any:
        cond = {"IfMatch": token} if token is not None else {"IfNoneMatch": "*"}
        try:
            resp = self.client.put_object(Bucket=self.bucket, Key=self._key(rel), Body=data,
                                          ContentType="application/json", **cond)
            return resp.get("ETag")
        except self.client.exceptions.ClientError as e:
            code = e.response.get("Error", {}).get("Code")
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412):
                raise IndexConflictError(f"{self.url}: {rel} changed since it was read") from e
            raise

    # --- objects -----------------------------------------------------------------------------------------------

    def upload(self, source: Source, rel: str, *, deadline: float | None = None,
               progress: Progress | None = None) -> None:
        key = self._key(rel)
        try:
            if source.size <= self.part_size:
                want = self._put(key, source, deadline, progress)
            else:
                want = self._put_multipart(key, source, deadline, progress)
        except self.client.exceptions.ClientError as e:
            if e.response.get("Error", {}).get("Code") in _DIGEST_CODES:  # the server refused the bytes' checksum
                raise IntegrityError(f"{self.url}/{rel}: the store refused a checksum of the bytes sent ({e})") from e
            raise
        self.remaining(deadline)
        head = self.client.head_object(Bucket=self.bucket, Key=key, ChecksumMode="ENABLED")
        if head["ContentLength"] != source.size:
            raise IntegrityError(
                f"{self.url}/{rel}: stored object is {head['ContentLength']} bytes, expected {source.size}")
        got = head.get("ChecksumCRC32C")
        if want is not None and not _same_checksum(got, want):
            raise IntegrityError(f"{self.url}/{rel}: the store reports crc32c {got!r} for the object, the bytes "
                                 f"sent have {want!r}")
        self.check_uploaded(rel, source.crc32c())

    def _body_checksum(self, data: bytes) -> dict[str, str]:
        """Arguments that make the server check one request's body: its crc32c (computed here, so botocore needs no
        awscrt), or its Content-MD5 where the store takes no flexible checksums (``when_required``)."""
        if not self.send_checksums:
            return {"ContentMD5": base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode()}
        # the value without ChecksumAlgorithm: botocore < 1.36 demands awscrt for CRC32C even when the value is
        # given (_name_the_checksum adds the algorithm header instead)
        return {"ChecksumCRC32C": _b64(google_crc32c.value(data).to_bytes(4, "big"))}

    def _put(self, key: str, source: Source, deadline: float | None, progress: Progress | None) -> str | None:
        """One PutObject from one read of the file; return the object crc32c to expect (base64)."""
        self._acquire_slot(deadline)
        try:
            data = source.read()
            args = self._body_checksum(data)
            self.remaining(deadline)
            self.client.put_object(Bucket=self.bucket, Key=key, Body=_body(data, progress), **args)
        finally:
            self._slots.release()
        return args.get("ChecksumCRC32C")

    def _acquire_slot(self, deadline: float | None) -> None:
        if not self._slots.acquire(timeout=self.remaining(deadline)):
            raise TimeoutError("the transfer's wall-clock budget is spent")

    def _put_multipart(self, key: str, source: Source, deadline: float | None,
                       progress: Progress | None) -> str | None:
        """Parts read in order from one pass over the file (held in memory: at most ``max_concurrency`` parts per
        store), each sent with its own checksum; the object is checked as a whole: its full-object crc32c (or, where
        botocore predates full-object checksums, the composite of the part crc32cs) must be the one of the bytes
        read. Return the object crc32c to expect (base64)."""
        part_size = max(self.part_size, -(-source.size // 10_000))  # S3 allows 10,000 parts
        create: dict[str, str] = {}
        if self.send_checksums:
            create = {"ChecksumAlgorithm": "CRC32C", **({"ChecksumType": "FULL_OBJECT"} if self._full_object else {})}
        upload_id = self.client.create_multipart_upload(Bucket=self.bucket, Key=key, **create)["UploadId"]

        failed = threading.Event()

        def send(number: int, data: bytes) -> dict:
            try:
                args = self._body_checksum(data)
                r = self.client.upload_part(Bucket=self.bucket, Key=key, UploadId=upload_id, PartNumber=number,
                                            Body=_body(data, progress), **args)
                return {"PartNumber": number, "ETag": r["ETag"],
                        **({"ChecksumCRC32C": args["ChecksumCRC32C"]} if "ChecksumCRC32C" in args else {})}
            except BaseException:
                failed.set()
                raise
            finally:
                self._slots.release()

        pool = ThreadPoolExecutor(self.max_concurrency, thread_name_prefix="cloudckpt-s3-part")
        futures: list[Future[dict]] = []
        try:
            while not failed.is_set():
                self._acquire_slot(deadline)
                try:
                    data = source.read(part_size)
                    if data:
                        futures.append(pool.submit(send, len(futures) + 1, data))  # send releases the slot
                except BaseException:
                    self._slots.release()
                    raise
                if not data:
                    self._slots.release()
                    break
            done, waiting = wait(futures, timeout=self.remaining(deadline))
            if waiting:
                raise TimeoutError("the transfer's wall-clock budget is spent")
            parts = [f.result() for f in futures]
            complete: dict[str, Any] = {}
            want = None
            if self.send_checksums and self._full_object:
                want = _b64(bytes.fromhex(source.crc32c()))
                complete = {"ChecksumCRC32C": want, "ChecksumType": "FULL_OBJECT"}
            elif self.send_checksums:
                joined = b"".join(base64.b64decode(p["ChecksumCRC32C"]) for p in parts)
                want = f"{_b64(google_crc32c.value(joined).to_bytes(4, 'big'))}-{len(parts)}"
            self.remaining(deadline)
            self.client.complete_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id,
                                                  MultipartUpload={"Parts": parts}, **complete)
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            for f in futures:
                if f.cancelled():  # never ran: its slot is still held
                    self._slots.release()
            try:
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
            except Exception as exc:  # the original error matters more; gc / the bucket's lifecycle rule clean up
                log.debug("could not abort the multipart upload of %s (%s)", key, exc)
            raise
        pool.shutdown(wait=False)
        return want

    def download(self, rel: str, local: Path, *, deadline: float | None = None,
                 progress: Progress | None = None) -> str | None:
        # One streaming GET written in 256 KiB blocks: bounded memory (s3fs get_file grew RSS past the object size
        # here), and no ranged GETs (which S3-compatible test servers serve by re-reading the whole object). Reads
        # of 1-8 MiB cost urllib3 extra buffer copies: 1 GiB took ~1.7x longer, ~2x the CPU (docs/benchmarks.md).
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

    def _get(self, rel: str) -> dict:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(rel))
        except self.client.exceptions.NoSuchKey as e:  # the contract's built-in: callers test FileNotFoundError
            raise FileNotFoundError(f"{self.url}/{rel}: no such object") from e
        except self.client.exceptions.ClientError as e:
            if self._missing_behind_403(e, rel):
                raise FileNotFoundError(f"{self.url}/{rel}: no such object") from e
            raise

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
