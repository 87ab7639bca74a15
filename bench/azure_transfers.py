"""Push and verified pull of one file on Azure Blob Storage (Azurite): cloudckpt against azure-storage-blob and adlfs.

Standalone (not yet wired into ``bench/run.py``): starts Azurite from ``.tools/azurite`` (``make tools``), times each
variant ``--reps`` times interleaved, and prints the medians as a Markdown table. "Verified" means the bytes on disk
are hashed after the transfer (crc32c) for the raw clients; cloudckpt's pull checks them against the manifest.

    python bench/azure_transfers.py --size-mib 256 --reps 3
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ACCOUNT = "devstoreaccount1"
KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="  # Azurite's, public
MiB = 2**20


def start_azurite(data: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    binary = ROOT / ".tools" / "azurite" / "node_modules" / ".bin" / "azurite-blob"
    proc = subprocess.Popen([str(binary), "--blobHost", "127.0.0.1", "--blobPort", str(port), "--location", str(data),
                             "--skipApiVersionCheck", "--silent"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}/{ACCOUNT}"
    for _ in range(300):
        try:
            urllib.request.urlopen(endpoint + "?comp=list", timeout=1)
            break
        except urllib.error.HTTPError:
            break
        except OSError:
            time.sleep(0.1)
    return proc, endpoint


def crc32c_of(path: Path) -> str:
    from cloudckpt.checksum import file_checksums

    return file_checksums(path)["crc32c"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="bench-azure-"))
    proc, endpoint = start_azurite(scratch / "azurite")
    conn = f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={KEY};BlobEndpoint={endpoint};"
    os.environ["AZURE_STORAGE_CONNECTION_STRING"] = conn
    try:
        import adlfs
        from azure.storage.blob import BlobServiceClient

        from cloudckpt import CheckpointStore

        service = BlobServiceClient.from_connection_string(conn)
        container = f"bench-{uuid.uuid4().hex[:8]}"
        service.create_container(container)
        fs = adlfs.AzureBlobFileSystem(connection_string=conn)
        src = scratch / "model.bin"
        src.write_bytes(os.urandom(args.size_mib * MiB))
        want = crc32c_of(src)
        store = CheckpointStore(f"az://{container}/run")
        entry = store.push(src, epoch=0)

        def sdk_push() -> None:
            with open(src, "rb") as f:
                service.get_blob_client(container, f"raw/{uuid.uuid4().hex}").upload_blob(f, max_concurrency=8)

        def sdk_pull() -> None:
            out = scratch / "sdk.bin"
            with open(out, "wb") as f:
                service.get_blob_client(container, f"run/{entry.id}/model.bin").download_blob(max_concurrency=8) \
                    .readinto(f)
            assert crc32c_of(out) == want

        def adlfs_pull() -> None:
            out = scratch / "adlfs.bin"
            fs.get_file(f"{container}/run/{entry.id}/model.bin", str(out))
            assert crc32c_of(out) == want

        def ours_pull() -> None:
            shutil.rmtree(scratch / "pulled", ignore_errors=True)
            store.pull("latest", to=scratch / "pulled")

        runs = {
            "push: cloudckpt push": lambda: store.push(src, epoch=1, prune=False),
            "push: azure-storage-blob upload_blob (8 threads)": sdk_push,
            "push: adlfs put_file": lambda: fs.put_file(str(src), f"{container}/raw/{uuid.uuid4().hex}"),
            "pull: cloudckpt pull (verified)": ours_pull,
            "pull: azure-storage-blob download_blob (8 threads) + crc32c": sdk_pull,
            "pull: adlfs get_file + crc32c": adlfs_pull,
        }
        times: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(args.reps):
            for name, fn in runs.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        print(f"| {args.size_mib} MiB on Azurite, median of {args.reps} | seconds | MiB/s |\n|---|---|---|")
        for name, ts in times.items():
            med = statistics.median(ts)
            print(f"| {name} | {med:.2f} | {args.size_mib / med:.0f} |")
        store.close()
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
