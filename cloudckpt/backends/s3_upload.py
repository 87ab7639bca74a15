"""S3 uploads: one PutObject, or a multipart upload whose parts are read in order from one pass over the source and
sent in parallel, each request's body checked by the server against a crc32c computed from exactly the bytes sent,
and the stored object checked as a whole (size, and its crc32c: for a multipart object the composite of the part
crc32cs, computed here from the bytes read, or with ``multipart_checksum="full_object"`` the crc32c of the whole
object, the one the manifest records).

A PutObject whose answer's ETag is the MD5 of the bytes sent needs no HEAD: the server computed that digest of what
it stored (the request carried a crc32c, no MD5 to echo). Not every server checks the crc32c a request carries (moto
stores and echoes a wrong one), so the crc32c echoed in an answer is never taken as proof; where the ETag is not the
MD5 (SSE-KMS, SSE-C, ``request_checksum_calculation=when_required`` which sends Content-MD5) and for multipart
objects, a HEAD compares the stored object's size and crc32c.

Why not boto3's transfer manager: it reads the file again for each part and each retry, so a file that changes
during the push can be stored torn while the checksum came from another read; here a part is read once into
memory (at most ``max_concurrency`` parts per store) and a retry re-sends those same bytes.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import threading
from collections.abc import Callable
from typing import Any

import google_crc32c

from ..errors import IntegrityError
from ..source import Source
from .base import Progress
from .body import request_body as _body
from .parts import acquire, send_parts

log = logging.getLogger(__name__)

def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def _same_checksum(got: str | None, want: str) -> bool:
    """A composite checksum is reported as ``<base64>-<parts>`` by S3 (some servers leave out the part count)."""
    if got is None:
        return False
    return got == want or ("-" in want and "-" not in got and got == want.partition("-")[0])


def _name_the_checksum(request: Any, **kwargs: Any) -> None:
    """A request that carries its body's crc32c also names the algorithm (``x-amz-sdk-checksum-algorithm``, as
    botocore does for ``ChecksumAlgorithm``): some S3-compatible servers record the checksum only then."""
    if "x-amz-checksum-crc32c" in request.headers and "x-amz-sdk-checksum-algorithm" not in request.headers:
        request.headers["x-amz-sdk-checksum-algorithm"] = "CRC32C"


class S3Uploads:
    """The upload half of :class:`~cloudckpt.backends.s3.S3Backend` (which sets the attributes below)."""

    client: Any
    bucket: str
    url: str
    part_size: int
    max_concurrency: int
    send_checksums: bool  # a crc32c per request and of the whole object, else a Content-MD5 per request
    _full_object: bool  # multipart_checksum="full_object": the stored checksum is the whole object's crc32c
    _slots: threading.BoundedSemaphore  # parts in memory, over all uploads

    _key: Callable[[str], str]
    remaining: Callable[[float | None], float | None]  # Backend's
    check_uploaded: Callable[[str, str], None]  # Backend's

    def upload(self, source: Source, rel: str, *, deadline: float | None = None,
               progress: Progress | None = None) -> None:
        key = self._key(rel)
        if source.size <= self.part_size:
            want, proven = self._put(key, source, deadline, progress)
        else:
            want, proven = self._put_multipart(key, source, deadline, progress), False
        if proven:  # the PutObject answer proves the stored bytes: no HEAD
            self.check_uploaded(rel, source.crc32c())
            return
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

    def _put(self, key: str, source: Source, deadline: float | None,
             progress: Progress | None) -> tuple[str | None, bool]:
        """One PutObject from one read of the file; return the object crc32c to expect (base64), and whether the
        answer proves the stored object: its ETag is the MD5 of exactly the bytes sent, which the server computed
        (S3's ETag of a single-part object stored plain or with SSE-S3; we sent no MD5 it could echo)."""
        acquire(self._slots, self.remaining(deadline))
        try:
            data = source.read()
            args = self._body_checksum(data)
            self.remaining(deadline)
            answer = self.client.put_object(Bucket=self.bucket, Key=key, Body=_body(data, progress), **args)
            proven = self.send_checksums and answer.get("ETag", "").strip('"') == hashlib.md5(
                data, usedforsecurity=False).hexdigest()
        finally:
            self._slots.release()
        return args.get("ChecksumCRC32C"), proven

    def _put_multipart(self, key: str, source: Source, deadline: float | None,
                       progress: Progress | None) -> str | None:
        """Parts read in order from one pass over the file (held in memory: at most ``max_concurrency`` parts per
        store), each sent with its own checksum; the object is checked as a whole: the composite of the part crc32cs
        (or, with ``multipart_checksum="full_object"``, its full-object crc32c) must be the one of the bytes read, in
        order. Return the object crc32c to expect (base64)."""
        part_size = max(self.part_size, -(-source.size // 10_000))  # S3 allows 10,000 parts
        create: dict[str, str] = {}
        if self.send_checksums:
            create = {"ChecksumAlgorithm": "CRC32C", **({"ChecksumType": "FULL_OBJECT"} if self._full_object else {})}
        upload_id = self.client.create_multipart_upload(Bucket=self.bucket, Key=key, **create)["UploadId"]

        def send(number: int, data: bytes) -> dict:
            args = self._body_checksum(data)
            r = self.client.upload_part(Bucket=self.bucket, Key=key, UploadId=upload_id, PartNumber=number,
                                        Body=_body(data, progress), **args)
            return {"PartNumber": number, "ETag": r["ETag"],
                    **({"ChecksumCRC32C": args["ChecksumCRC32C"]} if "ChecksumCRC32C" in args else {})}

        try:
            parts = send_parts(source, part_size, send, slots=self._slots, remaining=lambda: self.remaining(deadline),
                               workers=self.max_concurrency, name="cloudckpt-s3-part")
            want, complete = self._completion(parts, source)
            self.remaining(deadline)
            self.client.complete_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id,
                                                  MultipartUpload={"Parts": parts}, **complete)
        except BaseException:
            self._abort(key, upload_id)
            raise
        return want

    def _completion(self, parts: list[dict], source: Source) -> tuple[str | None, dict[str, Any]]:
        """The object crc32c to expect (base64; None when no checksums are sent) and the checksum arguments of
        CompleteMultipartUpload: none (the store reports the composite of the part crc32cs: S3's default for
        CRC32C, ``<crc32c of the parts' crc32cs>-<parts>``) or, with ``multipart_checksum="full_object"``, the
        full-object crc32c of the bytes read."""
        if self.send_checksums and self._full_object:
            want = _b64(bytes.fromhex(source.crc32c()))
            return want, {"ChecksumCRC32C": want, "ChecksumType": "FULL_OBJECT"}
        if self.send_checksums:
            joined = b"".join(base64.b64decode(p["ChecksumCRC32C"]) for p in parts)
            return f"{_b64(google_crc32c.value(joined).to_bytes(4, 'big'))}-{len(parts)}", {}
        return None, {}

    def _abort(self, key: str, upload_id: str) -> None:
        """After a failure: abort the upload, best effort (parts still being sent may land after it)."""
        try:
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
        except Exception as exc:  # the original error matters more; gc / the bucket's lifecycle rule clean up
            log.debug("could not abort the multipart upload of %s (%s)", key, exc)
