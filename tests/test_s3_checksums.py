"""What the S3 backend asks the server to check, on each path: the full-object crc32c of a multipart object equals
the crc32c the manifest records; the composite of the part crc32cs (botocore < 1.36) and Content-MD5 per request
(``request_checksum_calculation=when_required``) also store objects that verify."""

from __future__ import annotations

import base64
import os

import pytest

from cloudckpt import CheckpointStore

MiB = 2**20


@pytest.mark.parametrize("path", ["full-object", "composite", "content-md5"])
def test_multipart_and_single_part_objects_are_checked_whole(path, s3_url, tmp_path):
    src = tmp_path / "ckpt"
    src.mkdir()
    (src / "big.bin").write_bytes(os.urandom(12 * MiB))  # 3 parts of 5 MiB
    (src / "small.bin").write_bytes(os.urandom(1000))
    options = {"part_size": 5 * MiB}
    if path == "content-md5":
        options["request_checksum_calculation"] = "when_required"
    with CheckpointStore(s3_url, **options) as store:
        if path == "composite":
            store.backend._full_object = False  # as with a botocore that predates ChecksumType
        entry = store.push(src, epoch=1)
        assert all(r.ok for r in store.verify(entry.id))
        if path == "full-object":
            for f in entry.files:  # the server's own crc32c of each stored object is the manifest's
                key = f"{store.backend.prefix}/{entry.id}/{f.path}"
                head = store.backend.client.head_object(Bucket=store.backend.bucket, Key=key, ChecksumMode="ENABLED")
                assert base64.b64decode(head["ChecksumCRC32C"]).hex() == f.crc32c
