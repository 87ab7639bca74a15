"""The clients :mod:`bench.shaped` compares cloudckpt with, made for one endpoint (the raw server or the shaping
proxy): their verified pulls and their pushes, and cloudckpt's store on the same endpoint."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

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

        import adlfs

        def one(k: str) -> None:
            with open(dests[k], "wb") as f:
                service.get_blob_client(bucket, k).download_blob(max_concurrency=8).readinto(f)

        def sdk_pull() -> None:
            _each(one, list(dests))
            _verify(want)

        fs = adlfs.AzureBlobFileSystem(connection_string=servers.azure_connection_string(endpoint))

        def adlfs_pull() -> None:
            fs.get([f"{bucket}/{k}" for k in dests], [str(d) for d in dests.values()])
            _verify(want)

        runs[f"download_blob(max_concurrency=8){FILES_AT_ONCE} + crc32c"] = sdk_pull
        runs["adlfs get + crc32c"] = adlfs_pull
    return runs


def _warm(ours: Any, src: Path) -> None:
    """One untimed push of a small file: a store checks once that the bucket enforces conditional writes, before its
    first write (the Keras callback's uploader, a long-lived store, has done so before the pushes that matter)."""
    tiny = src.parent / "warm-up.bin"
    tiny.write_bytes(b"warm")
    try:
        ours.push(tiny, epoch=0)
    finally:
        tiny.unlink()


def _fs_put(fs: Any, bucket: str, keys: dict[str, Path]) -> None:
    """An fsspec filesystem's own upload of several files at once (its async batches)."""
    fs.put([str(p) for p in keys.values()], [f"{bucket}/{k}" for k in keys])


#: how the clients without a many-files call of their own are given several files: this many at a time, in threads
FILE_THREADS = 8
FILES_AT_ONCE = f", {FILE_THREADS} files at a time"


def _each(fn: Callable[[Any], None], items: list[Any]) -> None:
    """``fn`` over ``items``, :data:`FILE_THREADS` at a time (one at a time for a single item); the first error."""
    if len(items) == 1:
        fn(items[0])
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(FILE_THREADS) as pool:
        list(pool.map(fn, items))


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
    """cloudckpt's push and the raw clients' parallel uploads of ``src`` (a file, or a folder of files) through
    ``endpoint``."""
    url = f"{'gs' if kind == 'gcs' else kind}://{bucket}/run"
    ours = store(kind, url, endpoint)
    files = [src] if src.is_file() else sorted(src.iterdir())
    runs: dict[str, Callable[[], None]] = {"cloudckpt push": lambda: (ours.push(src, epoch=1), None)[1]}
    _warm(ours, src)

    def keys() -> dict[str, Path]:  # a fresh prefix per push: nothing is overwritten
        prefix = f"raw/{uuid.uuid4()}"
        return {f"{prefix}/{f.name}": f for f in files}

    if kind == "s3":
        import boto3
        from boto3.s3.transfer import TransferConfig, create_transfer_manager

        client = boto3.client("s3", endpoint_url=endpoint)

        def boto3_push() -> None:  # upload_file's machinery (aws s3 cp): 8 MiB parts, 10 threads, files at once
            with create_transfer_manager(client, TransferConfig()) as tm:
                for f in [tm.upload(str(path), bucket, k) for k, path in keys().items()]:
                    f.result()

        runs["boto3 upload_file (10 threads)"] = boto3_push
        if s3_clients.s5cmd_exe():
            target = f"s3://{bucket}/raw/{uuid.uuid4()}" + ("" if src.is_file() else "/")
            runs["s5cmd cp (defaults)"] = lambda: s3_clients._s5cmd(
                endpoint, "cp", str(src) if src.is_file() else f"{src}/*", target)
    elif kind == "gcs":
        import gcsfs
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage
        from google.cloud.storage import transfer_manager

        single = store(kind, url, endpoint)
        single.backend.composite_threshold = 0
        _warm(single, src)
        runs["cloudckpt push, composite_threshold=0 (one stream)"] = lambda: (single.push(src, epoch=2), None)[1]
        fs = gcsfs.GCSFileSystem(token="anon", endpoint_url=endpoint)
        client = storage.Client(project="bench", credentials=AnonymousCredentials(),
                                client_options={"api_endpoint": endpoint})

        def sdk_push() -> None:
            if src.is_file():
                client.bucket(bucket).blob(f"raw/{uuid.uuid4()}").upload_from_filename(str(src))
                return
            results = transfer_manager.upload_many(
                [(str(path), client.bucket(bucket).blob(k)) for k, path in keys().items()], max_workers=8,
                worker_type=transfer_manager.THREAD)
            bad = [r for r in results if isinstance(r, Exception)]
            if bad:
                raise bad[0]

        runs["upload_from_filename" if src.is_file() else "transfer_manager.upload_many (8 threads)"] = sdk_push
        runs["gcsfs put"] = lambda: _fs_put(fs, bucket, keys())
    else:
        import adlfs
        from azure.storage.blob import BlobServiceClient

        service = BlobServiceClient.from_connection_string(servers.azure_connection_string(endpoint))

        def sdk_push() -> None:
            def one(item: tuple[str, Path]) -> None:
                with open(item[1], "rb") as f:
                    service.get_blob_client(bucket, item[0]).upload_blob(f, max_concurrency=8)

            _each(one, list(keys().items()))

        afs = adlfs.AzureBlobFileSystem(connection_string=servers.azure_connection_string(endpoint))
        runs["upload_blob(max_concurrency=8)" + ("" if src.is_file() else FILES_AT_ONCE)] = sdk_push
        runs["adlfs put"] = lambda: _fs_put(afs, bucket, keys())
    return runs
