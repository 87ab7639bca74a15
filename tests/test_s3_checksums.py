"""What the S3 backend asks the server to check, on each path: the composite of the part crc32cs (the default) is
the one of the bytes read; with ``multipart_checksum="full_object"`` the object's crc32c equals the crc32c the
manifest records; Content-MD5 per request (``request_checksum_calculation=when_required``) also stores objects that
verify."""

from __future__ import annotations

import base64
import os

import google_crc32c
import pytest

from cloudckpt import CheckpointStore
from cloudckpt.errors import ConfigurationError

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
    if path == "full-object":
        options["multipart_checksum"] = "full_object"
    with CheckpointStore(s3_url, **options) as store:
        entry = store.push(src, epoch=1)
        assert all(r.ok for r in store.verify(entry.id))
        if path == "full-object":
            for f in entry.files:  # the server's own crc32c of each stored object is the manifest's
                key = f"{store.backend.prefix}/{entry.id}/{f.path}"
                head = store.backend.client.head_object(Bucket=store.backend.bucket, Key=key, ChecksumMode="ENABLED")
                assert base64.b64decode(head["ChecksumCRC32C"]).hex() == f.crc32c
        if path == "composite":  # S3's composite: the crc32c of the parts' crc32cs, recomputed here from the file
            data = (src / "big.bin").read_bytes()
            parts = [data[i:i + 5 * MiB] for i in range(0, len(data), 5 * MiB)]
            joined = b"".join(google_crc32c.value(p).to_bytes(4, "big") for p in parts)
            key = f"{store.backend.prefix}/{entry.id}/big.bin"
            head = store.backend.client.head_object(Bucket=store.backend.bucket, Key=key, ChecksumMode="ENABLED")
            got = head["ChecksumCRC32C"].partition("-")[0]
            assert base64.b64decode(got) == google_crc32c.value(joined).to_bytes(4, "big")


def test_multipart_checksum_option_is_checked(s3_url):
    with pytest.raises(ConfigurationError, match="multipart_checksum"):
        CheckpointStore(s3_url, multipart_checksum="sha1")
