"""The clients :mod:`bench.shaped` compares cloudckpt with, made for one endpoint (the raw server or the shaping
proxy): their verified pulls and their pushes, and cloudckpt's store on the same endpoint."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from tests.support import servers

from . import s3_clients


@contextlib.contextmanager
def env(**values: str) -> Iterator[None]:
    """Environment variables set for the clients made inside (google-cloud-storage reads its emulator host then)."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _verify(paths: dict[Path, str]) -> None:
    from cloudckpt.checksum import file_checksums

    for path, crc in paths.items():
        got = file_checksums(path)["crc32c"]
        if got != crc:
            raise RuntimeError(f"{path}: crc32c {got}, expected {crc}")


def pullers(kind: str, endpoint: str, bucket: str, keys: dict[str, str], out: Path) -> dict[str, Callable[[], None]]:
    """The raw clients' verified pulls of ``keys`` (object key -> crc32c) into ``out``, through ``endpoint``."""
    dests = {k: out / Path(k).name for k in keys}
    want = {dests[k]: c for k, c in keys.items()}
    runs: dict[str, Callable[[], None]] = {}
    if kind == "s3":
        import boto3
        from boto3.s3.transfer import TransferConfig, create_transfer_manager

        client = boto3.client("s3", endpoint_url=endpoint)

        def boto3_pull() -> None:  # download_file's machinery (aws s3 cp): 8 MiB ranges, 10 threads, files at once
            with create_transfer_manager(client, TransferConfig()) as tm:
                futures = [tm.download(bucket, k, str(d)) for k, d in dests.items()]
                for f in futures:
                    f.result()
            _verify(want)

        runs["boto3 download_file (10 threads) + crc32c"] = boto3_pull
        if s3_clients.s5cmd_exe():
            prefix = os.path.dirname(next(iter(keys)))

            def s5cmd_pull() -> None:
                s3_clients._s5cmd(endpoint, "cp", f"s3://{bucket}/{prefix}/*", f"{out}/")
                _verify(want)

            runs["s5cmd cp (defaults) + crc32c"] = s5cmd_pull
    elif kind == "gcs":
        import gcsfs
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage
        from google.cloud.storage import transfer_manager

        fs = gcsfs.GCSFileSystem(token="anon", endpoint_url=endpoint)
        client = storage.Client(project="bench", credentials=AnonymousCredentials(),
                                client_options={"api_endpoint": endpoint})
        b = client.bucket(bucket)

        def gcsfs_pull() -> None:
            fs.get([f"{bucket}/{k}" for k in dests], [str(d) for d in dests.values()])
            _verify(want)

        def tm_pull() -> None:
            if len(dests) == 1:
                (k, d), = dests.items()
                transfer_manager.download_chunks_concurrently(b.blob(k), str(d), max_workers=8,
                                                              worker_type=transfer_manager.THREAD)
            else:
                prefix = os.path.dirname(next(iter(keys))) + "/"
                results = transfer_manager.download_many_to_path(
                    b, [k[len(prefix):] for k in dests], destination_directory=str(out), blob_name_prefix=prefix,
                    max_workers=8, worker_type=transfer_manager.THREAD)
                bad = [r for r in results if isinstance(r, Exception)]
                if bad:
                    raise bad[0]
            _verify(want)

        runs["gcsfs get + crc32c"] = gcsfs_pull
        runs["transfer_manager (8 threads) + crc32c"] = tm_pull
    else:
        from azure.storage.blob import BlobServiceClient

        service = BlobServiceClient.from_connection_string(servers.azure_connection_string(endpoint))

        def sdk_pull() -> None:
            for k, d in dests.items():
                with open(d, "wb") as f:
                    service.get_blob_client(bucket, k).download_blob(max_concurrency=8).readinto(f)
            _verify(want)

        runs["download_blob(max_concurrency=8) + crc32c"] = sdk_pull
    return runs


def store(kind: str, url: str, endpoint: str):
    from cloudckpt import CheckpointStore

    if kind == "s3":
        return CheckpointStore(url, endpoint_url=endpoint)
    if kind == "gcs":
        with env(STORAGE_EMULATOR_HOST=endpoint):
            return CheckpointStore(url)
    return CheckpointStore(url, connection_string=servers.azure_connection_string(endpoint))


def container(kind: str) -> str:
    name = f"bench-{uuid.uuid4().hex[:10]}"
    {"s3": servers.make_s3_bucket, "gcs": servers.make_gcs_bucket, "az": servers.make_azure_container}[kind](name)
    return name


def empty(kind: str, bucket: str, endpoint: str) -> None:
    """Delete every object of ``bucket`` (the servers keep them in RAM)."""
    if kind == "s3":
        import boto3

        client = boto3.client("s3", endpoint_url=endpoint)
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if keys:
                client.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})
    elif kind == "gcs":
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        client = storage.Client(project="bench", credentials=AnonymousCredentials(),
                                client_options={"api_endpoint": endpoint})
        for blob in client.list_blobs(bucket):
            blob.delete()
    else:
        from azure.storage.blob import BlobServiceClient

        container = BlobServiceClient.from_connection_string(
            servers.azure_connection_string(endpoint)).get_container_client(bucket)
        for blob in container.list_blobs():
            container.delete_blob(blob.name)


def pushers(kind: str, endpoint: str, bucket: str, src: Path) -> dict[str, Callable[[], None]]:
    """cloudckpt's push and the raw clients' parallel uploads of ``src`` through ``endpoint``."""
    url = f"{'gs' if kind == 'gcs' else kind}://{bucket}/run"
    ours = store(kind, url, endpoint)
    runs: dict[str, Callable[[], None]] = {"cloudckpt push": lambda: (ours.push(src, epoch=1), None)[1]}
    if kind == "s3":
        import boto3

        client = boto3.client("s3", endpoint_url=endpoint)
        runs["boto3 upload_file (10 threads)"] = lambda: client.upload_file(str(src), bucket, f"raw/{uuid.uuid4()}")
        if s3_clients.s5cmd_exe():
            runs["s5cmd cp (defaults)"] = lambda: s3_clients._s5cmd(endpoint, "cp", str(src),
                                                                    f"s3://{bucket}/raw/{uuid.uuid4()}")
    elif kind == "gcs":
        import gcsfs
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        single = store(kind, url, endpoint)
        single.backend.composite_threshold = 0
        runs["cloudckpt push, composite_threshold=0 (one stream)"] = lambda: (single.push(src, epoch=2), None)[1]
        fs = gcsfs.GCSFileSystem(token="anon", endpoint_url=endpoint)
        client = storage.Client(project="bench", credentials=AnonymousCredentials(),
                                client_options={"api_endpoint": endpoint})
        runs["upload_from_filename"] = lambda: client.bucket(bucket).blob(f"raw/{uuid.uuid4()}") \
            .upload_from_filename(str(src))
        runs["gcsfs put_file"] = lambda: fs.put_file(str(src), f"{bucket}/raw/{uuid.uuid4()}")
    else:
        from azure.storage.blob import BlobServiceClient

        service = BlobServiceClient.from_connection_string(servers.azure_connection_string(endpoint))

        def sdk_push() -> None:
            with open(src, "rb") as f:
                service.get_blob_client(bucket, f"raw/{uuid.uuid4()}").upload_blob(f, max_concurrency=8)

        runs["upload_blob(max_concurrency=8)"] = sdk_push
    return runs
