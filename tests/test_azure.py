"""Azure Blob Storage specifics, on Azurite: URL forms, every way to give credentials, staged blocks and their
checks, bytes damaged in transit refused by the service, CLI exit codes, and no key in any output."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from reliability.faultproxy import FaultProxy
from support import servers

from cloudckpt import CheckpointStore
from cloudckpt.backends import open_backend
from cloudckpt.backends.azure import split_url
from cloudckpt.errors import AccessError, ConfigurationError
from cloudckpt.redact import Redactor

MiB = 2**20
CONN_ENV = "AZURE_STORAGE_CONNECTION_STRING"


def _ckpt(root: Path, sizes: dict[str, int]) -> Path:
    for rel, size in sizes.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(os.urandom(size))
    return root


def _same(a: Path, b: Path, rels) -> bool:
    return all((a / r).read_bytes() == (b / r).read_bytes() for r in rels)


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full = {**os.environ, **(env or {})}
    full.pop("CLOUDCKPT_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "cloudckpt", *args], capture_output=True, text=True, timeout=120,
                          env={k: v for k, v in full.items() if v is not None})


def _container(url: str) -> str:
    return split_url(url)[0]


def test_url_forms_and_bad_options():
    assert split_url("az://ckpts/runs/r1") == ("ckpts", "runs/r1", None)
    assert split_url("abfs://ckpts/runs/r1/") == ("ckpts", "runs/r1", None)
    assert split_url("abfss://ckpts@acct.dfs.core.windows.net/r") == ("ckpts", "r", "acct")
    for bad in ("az://ab/run", "az://", "az:///run"):
        with pytest.raises(ConfigurationError):
            split_url(bad)
    with pytest.raises(ConfigurationError, match="unknown Azure storage option"):
        open_backend("az://ckpts/r", {"bogus": 1, "connection_string": "UseDevelopmentStorage=true"})
    with pytest.raises(ConfigurationError, match="transport"):
        open_backend("az://ckpts/r", {"transport": "fsspec", "connection_string": "UseDevelopmentStorage=true"})


def test_default_azure_credential_when_no_key_or_sas_is_given(monkeypatch):
    for name in (CONN_ENV, "AZURE_STORAGE_ACCOUNT_KEY", "AZURE_STORAGE_KEY", "AZURE_STORAGE_SAS_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    from azure.identity import DefaultAzureCredential

    backend = open_backend("abfs://ckpts@acct.dfs.core.windows.net/r")
    assert isinstance(backend.service.credential, DefaultAzureCredential)  # built lazily, no request made
    assert backend.service.account_name == "acct" and backend.service.url.startswith("https://acct.blob.core")
    assert backend.url == "abfs://ckpts/r"  # shown without the host part, which would read as user info
    monkeypatch.delenv("AZURE_STORAGE_ACCOUNT_NAME", raising=False)
    with pytest.raises(ConfigurationError, match="no Azure storage account"):
        open_backend("az://ckpts/r")


def test_account_key_and_sas_token_options(az_url, azure_server, tmp_path, monkeypatch):
    from azure.storage.blob import ContainerSasPermissions, generate_container_sas

    monkeypatch.delenv(CONN_ENV)
    base = {"account_name": servers.AZURITE_ACCOUNT, "account_host": azure_server.endpoint}
    src = _ckpt(tmp_path / "src", {"w.bin": 3000})
    with CheckpointStore(az_url, **base, account_key=servers.AZURITE_KEY) as store:
        first = store.push(src, epoch=1)
    sas = generate_container_sas(servers.AZURITE_ACCOUNT, _container(az_url), account_key=servers.AZURITE_KEY,
                                 permission=ContainerSasPermissions(read=True, write=True, delete=True, list=True),
                                 expiry=datetime.now(timezone.utc) + timedelta(hours=1))
    with CheckpointStore(az_url, **base, sas_token=sas) as store:
        second = store.push(src, epoch=2)
        assert [c.id for c in store.list()] == [first.id, second.id]
        assert _same(src, store.pull("latest", to=tmp_path / "out").path, ["w.bin"])
    with pytest.raises(AccessError):  # a wrong key is refused by the service at once, not retried
        with CheckpointStore(az_url, **base, account_key="d3Jvbmcga2V5IGZvciB0aGUgdGVzdA==", budget=20) as store:
            store.list()
    with pytest.raises(AccessError):  # anonymous access to a private container
        with CheckpointStore(az_url, **base, anon=True, budget=20) as store:
            store.list()


def test_large_file_is_staged_in_md5_checked_blocks_and_the_block_list_checked(az_url, tmp_path):
    src = _ckpt(tmp_path / "src", {"big.bin": 2 * MiB + 12345, "small.bin": 100})
    with CheckpointStore(az_url, block_size=MiB) as store:
        entry = store.push(src, epoch=1)
        blob = store.backend._blob(f"{entry.id}/big.bin")
        committed = blob.get_block_list("committed")[0]
        data = (src / "big.bin").read_bytes()
        chunks = [data[i:i + MiB] for i in range(0, len(data), MiB)]
        expected = [f"{i:05d}-{hashlib.md5(c).hexdigest()}" for i, c in enumerate(chunks, start=1)]
        assert [b.id for b in committed] == expected
        small = store.backend._blob(f"{entry.id}/small.bin").get_blob_properties()
        assert bytes(small.content_settings.content_md5) == hashlib.md5((src / "small.bin").read_bytes()).digest()
        assert _same(src, store.pull("latest", to=tmp_path / "out").path, ["big.bin", "small.bin"])


@pytest.mark.parametrize("request_kind", ["put-block", "put-blob"])
def test_bytes_damaged_in_transit_are_refused_and_sent_again(az_url, azure_server, tmp_path, monkeypatch, request_kind):
    """A proxy flips one byte in the first data request's body: the service refuses it (the body's MD5), the upload
    is sent again, and what is committed verifies. Without the per-request MD5 a damaged block would be stored."""
    refused = []

    def damage(method, target, body):
        is_data = "/ckpt-" in target and ("comp=block&" in target + "&" if request_kind == "put-block"
                                          else "comp=" not in target)
        if method == "PUT" and is_data and not refused and len(body) > 1000:
            refused.append(target)
            return body[:500] + bytes([body[500] ^ 0xFF]) + body[501:]
        return body

    with FaultProxy(azure_server.endpoint.rsplit("/", 1)[0], on_request_body=damage) as proxy:
        monkeypatch.setenv(CONN_ENV, servers.azure_connection_string(f"{proxy.endpoint}/{servers.AZURITE_ACCOUNT}"))
        src = _ckpt(tmp_path / "src", {"w.bin": 2 * MiB + 7 if request_kind == "put-block" else 5000})
        with CheckpointStore(az_url, block_size=MiB, budget=60) as store:
            entry = store.push(src, epoch=1)
            assert refused, "no data request went through the proxy"
            assert all(r.ok for r in store.verify(entry.id))
            assert _same(src, store.pull("latest", to=tmp_path / "out").path, ["w.bin"])


def test_cli_exit_codes_on_azure(az_url, tmp_path):
    src = _ckpt(tmp_path / "src", {"model.weights.h5": 5000})
    proc = _cli("ls", "--remote", az_url)
    assert proc.returncode == 3, proc.stderr  # an empty run: nothing matches
    proc = _cli("push", str(src), "--remote", az_url, "--epoch", "1", "--json")
    assert proc.returncode == 0, proc.stderr
    entry = json.loads(proc.stdout)
    with CheckpointStore(az_url) as store:  # the object replaced behind the index's back
        store.backend._blob(f"{entry['id']}/model.weights.h5").upload_blob(b"\0" * 5000, overwrite=True)
    proc = _cli("pull", "latest", "--remote", az_url, "--to", str(tmp_path / "x"))
    assert proc.returncode == 4 and "checksum mismatch" in proc.stderr and not (tmp_path / "x").exists()
    proc = _cli("ls", "--remote", "az://no-such-container-here/run")
    assert proc.returncode == 5 and "no such container" in proc.stderr and proc.stderr.count("\n") == 1
    proc = _cli("-o", "bogus=1", "ls", "--remote", az_url)
    assert proc.returncode == 5 and "unknown Azure storage option" in proc.stderr


def test_no_key_reaches_cli_output_when_credentials_are_wrong(az_url, azure_server):
    key = "c2VjcmV0LWtleS1vZi10aGUtdGVzdC1hY2NvdW50LTEyMzQ1Njc4OTA="
    bad = (f"DefaultEndpointsProtocol=http;AccountName={servers.AZURITE_ACCOUNT};AccountKey={key};"
           f"BlobEndpoint={azure_server.endpoint};")
    for args, env in (((), {CONN_ENV: bad, "CLOUDCKPT_DEBUG": "1"}),  # with the traceback
                      (("-o", f"connection_string={bad}"), {CONN_ENV: None}),
                      (("-o", f"account_key={key}", "-o", f"account_host={azure_server.endpoint}", "-o",
                        f"account_name={servers.AZURITE_ACCOUNT}"), {CONN_ENV: None, "CLOUDCKPT_DEBUG": "1"})):
        proc = _cli("-vv", *args, "ls", "--remote", az_url, env=env)
        assert proc.returncode == 5, proc.stderr
        assert key not in proc.stderr + proc.stdout and key[:20] not in proc.stderr + proc.stdout


def test_redactor_masks_azure_key_fragments_it_was_never_told_of():
    text = ("BlobEndpoint=https://a.blob.core.windows.net;AccountName=a;AccountKey=Zm9vYmFyYmF6cXV4MTIzNDU2Nzg5MA==;"
            " SharedAccessSignature=sv=2024-01-01&sig=QWxhZGRpbjpvcGVu%2Bc2VzYW1l; "
            "Authorization: SharedKey a:YWJjZGVmZ2hpamtsbW5vcA== url https://a/c/b?sv=1&sig=c2lnbmF0dXJl&se=2")
    out = Redactor().scrub(text)
    for secret in ("Zm9vYmFyYmF6cXV4MTIzNDU2Nzg5MA", "QWxhZGRpbjpvcGVu", "YWJjZGVmZ2hpamtsbW5vcA", "c2lnbmF0dXJl"):
        assert secret not in out, out
    assert "AccountName=a" in out and "BlobEndpoint=https://a.blob.core.windows.net" in out


def test_requests_fit_the_roles_of_terraform_azure_access(az_url, azure_server, tmp_path, monkeypatch):
    """Every request cloudckpt makes, recorded at a proxy: restore (pull, ls, show, verify) only reads (GET/HEAD:
    Storage Blob Data Reader), and training (claim, push, prune, gc) touches blobs only, never the container itself
    (Storage Blob Data Contributor grants blob read/write/delete, not container writes)."""
    seen: list[tuple[str, str]] = []
    src = _ckpt(tmp_path / "src", {"w.bin": 2 * MiB + 1, "s.bin": 10})
    with FaultProxy(azure_server.endpoint.rsplit("/", 1)[0], on_request=lambda m, t: seen.append((m, t))) as proxy:
        monkeypatch.setenv(CONN_ENV, servers.azure_connection_string(f"{proxy.endpoint}/{servers.AZURITE_ACCOUNT}"))
        with CheckpointStore(az_url, block_size=MiB) as store:
            store.claim()
            for epoch in range(3):
                store.push(src, epoch=epoch, metrics={"val_loss": 1.0 / (epoch + 1)}, monitor="val_loss")
            store.prune(keep_last=1)
            store.gc(min_age=0)
        training, seen[:] = list(seen), []
        with CheckpointStore(az_url) as store:
            store.list()
            store.get("best")
            store.pull("best", to=tmp_path / "out")
            assert all(r.ok for r in store.verify(all=True))
        restore = list(seen)
    container = f"/{servers.AZURITE_ACCOUNT}/{_container(az_url)}"
    assert training and restore
    assert {m for m, _ in restore} <= {"GET", "HEAD"}, sorted({m for m, _ in restore})
    for method, target in training:
        path, _, query = target.partition("?")
        assert path.startswith(container), target
        assert not (path == container and method not in ("GET", "HEAD")), f"a container-level write: {target}"
