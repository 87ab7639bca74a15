"""Parallel composite uploads to GCS: a large file's parts uploaded as temporary objects in parallel, then composed
into the object, whose crc32c GCS computes over the whole composed object — the crc32c the manifest records.

GCS's other parallel upload, the XML API multipart upload, is not served by fake-gcs-server (404), so it can't be
tested here; composition can, and keeps the stored checksum equal to the manifest's (a composite object has a
crc32c, no MD5). Parts are read in order from one pass over the file (:func:`~cloudckpt.backends.parts.send_parts`:
at most ``max_concurrency`` / 2 parts in memory per store, each held twice while it is sent: ours and the
multipart body google-cloud-storage builds), each uploaded with its crc32c checked by the
service, named ``<object>.cloudckpt-part-<random>-<n>`` beside the object; at most 32 are composed at a time (GCS's
limit), in a tree when there are more. The temporary objects are deleted once the object is checked; if the push
fails they are deleted too, and whatever a crash leaves behind sits inside the checkpoint's folder, where ``gc``
removes it (a stray file of a listed checkpoint, or part of an uncommitted one). On a bucket with soft delete (GCS's
default: 7 days) the deleted parts are billed until then: set ``composite_threshold=0`` to upload in one stream.
"""

from __future__ import annotations

import base64
import logging
import threading
import uuid
from typing import Any

import google_crc32c

from ..errors import IntegrityError
from ..source import Source
from .base import Progress
from .parts import send_parts

log = logging.getLogger(__name__)
MAX_SOURCES = 32  # GCS composes at most 32 objects in one request


def composite_upload(backend: Any, source: Source, rel: str, *, deadline: float | None,
                     progress: Progress | None) -> None:
    """Upload ``source`` to ``rel`` of ``backend`` (a GCSBackend) as a composite of parts sent in parallel; the
    composed object's size and crc32c must equal the bytes read."""
    tag = uuid.uuid4().hex[:12]
    made: list[str] = []
    lock = threading.Lock()

    def send(number: int, data: bytes) -> str:
        name = backend._name(f"{rel}.cloudckpt-part-{tag}-{number:05d}")
        blob = backend.bucket.blob(name)
        with lock:
            made.append(name)
        blob.upload_from_string(data, checksum="crc32c", timeout=backend.timeout,  # a unique name: no precondition
                                retry=backend._retry(deadline))
        _check(blob, len(data), f"{google_crc32c.value(data):08x}", f"{backend.url}/{rel} part {number}")
        if progress is not None:
            progress(len(data))
        return name

    try:
        names = send_parts(source, backend.part_size, send, slots=backend._slots,
                           remaining=lambda: backend.remaining(deadline), workers=backend.parts_in_flight,
                           name="cloudckpt-gcs-part")
        level = 0
        while len(names) > MAX_SOURCES:  # a tree of composes: each level has at most 1/32 of the objects below it
            level += 1
            groups = [names[i:i + MAX_SOURCES] for i in range(0, len(names), MAX_SOURCES)]
            names = []
            for n, group in enumerate(groups):
                name = backend._name(f"{rel}.cloudckpt-part-{tag}-l{level}-{n:05d}")
                with lock:
                    made.append(name)
                _compose(backend, group, name, deadline)
                names.append(name)
        target = _compose(backend, names, backend._name(rel), deadline)
        _check(target, source.size, source.crc32c(), f"{backend.url}/{rel}")
    finally:
        _delete(backend, made)


def _compose(backend: Any, names: list[str], into: str, deadline: float | None) -> Any:
    blob = backend.bucket.blob(into)
    blob.compose([backend.bucket.blob(n) for n in names], timeout=backend.timeout, retry=backend._retry(deadline))
    return blob


def _check(blob: Any, size: int, crc32c: str, where: str) -> None:
    """The stored object's size and crc32c (from the service's answer) are those of the bytes sent."""
    stored = base64.b64decode(blob.crc32c).hex() if blob.crc32c else None
    if blob.size != size or stored != crc32c:
        raise IntegrityError(f"{where}: stored object is {blob.size} bytes crc32c {stored}, sent {size} {crc32c}")


def _delete(backend: Any, names: list[str]) -> None:
    from google.api_core.exceptions import NotFound

    for name in names:
        try:
            backend.bucket.blob(name).delete(timeout=backend.timeout)
        except NotFound:
            pass
        except Exception as exc:  # left for gc (it sits in the checkpoint's folder); the push's outcome stands
            log.warning("%s: could not delete the temporary part %s (%s); gc removes it", backend.url, name, exc)
