"""Credentials never reach output, logs or files: sentinel secrets go through every CLI command and failure path on
local, S3 (moto), GCS (fake-gcs-server) and a generic fsspec URL with user info (FTP, served by pyftpdlib), as
secret options, inline tokens, URL user info and environment credentials, with ``-vv`` logging (the SDKs' debug
lines included) and ``--json``. Every stdout, stderr and every file and object cloudckpt wrote is searched."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from cloudckpt.redact import Redactor, redact_url

CLI = [sys.executable, "-m", "cloudckpt"]
S = {  # sentinels: plain words, so any quoting or escaping of them still contains them
    "key_id": "AKIASENTINELKEYID0001",
    "secret": "sentinelSECRETvalue0002",
    "token": "sentinelSESSIONtoken0003",
    "password": "sentinelPASSWORD0004",
    "private_key": "sentinelPRIVATEKEY0005",
    "env_secret": "sentinelENVsecret0006",
    "env_token": "sentinelENVtoken0007",
    "google_file_key": "sentinelGOOGLEFILEKEY0008",
    "sas": "sentinelSASsig0009",
    "key_id_id": "sentinelKEYID0010",
}
ENV = {"AWS_ACCESS_KEY_ID": S["key_id"], "AWS_SECRET_ACCESS_KEY": S["env_secret"], "AWS_SESSION_TOKEN": S["env_token"]}


def pem(body: str) -> str:
    return f"-----BEGIN PRIVATE KEY-----\nMIIE{body}\nAAAA\n-----END PRIVATE KEY-----\n"


PARALLEL = 2  # CLI processes at a time: each spends most of its life starting Python or waiting for a server


INLINE_TOKEN = json.dumps({"type": "service_account", "project_id": "p", "private_key_id": S["key_id_id"],
                           "private_key": pem(S["private_key"]), "client_email": "ci@p.iam.gserviceaccount.com"})


class Transcript:
    """Every CLI run of the test: its command, exit code, stdout and stderr. Runs may come from several threads."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.runs: list[tuple[list[str], int, str, str]] = []

    def run(self, *args: str, env: dict | None = None, drop: tuple[str, ...] = (), expect: int | None = 0,
            timeout: float = 180) -> subprocess.CompletedProcess:
        full = {**os.environ, **ENV, **(env or {})}
        for name in drop + ("CLOUDCKPT_DEBUG",):
            full.pop(name, None)
        full.update({k: v for k, v in (env or {}).items() if k == "CLOUDCKPT_DEBUG"})
        proc = subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, env=full, cwd=self.tmp)
        self.runs.append((list(args), proc.returncode, proc.stdout, proc.stderr))
        if expect is not None:
            assert proc.returncode == expect, f"{args}: exit {proc.returncode}: {proc.stderr[-600:]}"
        return proc

    def run_all(self, calls: list[tuple[tuple[str, ...], dict]]) -> None:
        """Independent runs, :data:`PARALLEL` at a time: each is still a process of its own, checked as by run()."""
        with ThreadPoolExecutor(PARALLEL) as pool:
            for done in [pool.submit(self.run, *args, **kwargs) for args, kwargs in calls]:
                done.result()

    def leaks(self) -> list[str]:
        found = []
        for args, code, out, err in self.runs:
            for name, value in S.items():
                for where, text in (("stdout", out), ("stderr", err)):
                    if value in text:
                        line = next(ln for ln in text.splitlines() if value in ln)
                        found.append(f"{name} in {where} of {' '.join(args)[:120]} (exit {code}): {line[:200]}")
        return found


def files_leaks(root: Path, skip: set[Path]) -> list[str]:
    found = []
    for p in root.rglob("*"):
        if p.is_file() and not p.is_symlink() and not any(p == s or s in p.parents for s in skip):
            data = p.read_bytes()
            found += [f"{name} in file {p}" for name, v in S.items() if v.encode() in data]
    return found


def objects_leaks(url: str) -> list[str]:
    from cloudckpt.store import CheckpointStore

    found = []
    with CheckpointStore(url) as store:
        for o in store.backend.list_objects():
            data = store.backend.read_bytes(o.rel)
            found += [f"{name} in object {url}/{o.rel}" for name, v in S.items() if v.encode() in data]
    return found


FTP_SERVER = """
import sys
from pyftpdlib.authorizers import DummyAuthorizer
from pyftpdlib.handlers import FTPHandler
from pyftpdlib.servers import ThreadedFTPServer
auth = DummyAuthorizer()
auth.add_user("alice", sys.argv[2], sys.argv[1], perm="elradfmwMT")
FTPHandler.authorizer = auth
server = ThreadedFTPServer(("127.0.0.1", 0), FTPHandler)
print(server.address[1], flush=True)
server.serve_forever()
"""


@pytest.fixture
def ftp_url(tmp_path):
    """A real FTP server (pyftpdlib, its own process) on 127.0.0.1: the run URL carries user and password."""
    pytest.importorskip("pyftpdlib")
    root = tmp_path / "ftp-root"
    root.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", FTP_SERVER, str(root), S["password"]], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    port = int(proc.stdout.readline())
    yield f"ftp://alice:{S['password']}@127.0.0.1:{port}/runs/r1"
    proc.terminate()
    proc.wait(timeout=10)


def make_source(tmp: Path, name: str, nested: bool = True) -> Path:
    src = tmp / name
    (src / "sub").mkdir(parents=True)
    (src / "model.bin").write_bytes(os.urandom(3000))
    if nested:  # fsspec's FTP client is one connection: parallel transfers of several files fail there
        (src / "sub" / "opt.json").write_text('{"step": 3}')
    return src


def every_command(t: Transcript, url: str, opts: list[str], tmp: Path, kind: str) -> None:
    """push, ls, show, pull, verify, prune, gc and sync on one run, logged at -vv, JSON where offered."""
    v = ["-vv", *opts]
    for i in range(3):
        t.run(*v, "push", str(make_source(tmp, f"{kind}-src{i}", nested=kind != "ftp")), "--remote", url,
              "--epoch", str(i), "--metric", f"val_loss={1 - i / 10}", "--monitor", "val_loss", "--json")
    t.run(*v, "ls", "--remote", url, "--json")
    t.run("-v", *opts, "ls", "--remote", url)
    t.run(*v, "show", "latest", "--remote", url, "--json")
    t.run(*v, "pull", "best", "--remote", url, "--to", str(tmp / f"{kind}-pulled"), "--json")
    t.run("-v", *opts, "pull", "latest", "--remote", url, "--to", str(tmp / f"{kind}-pulled"))
    t.run(*v, "verify", "--remote", url, "--all", "--json")
    t.run(*v, "prune", "--remote", url, "--keep-last", "1", "--json")
    t.run(*v, "gc", "--remote", url, "--min-age", "0", "--json")
    t.run(*v, "pull", "no-such-checkpoint", "--remote", url, "--to", str(tmp / f"{kind}-x"), expect=3)
    watch = tmp / f"{kind}-watch"
    (watch / "e01").mkdir(parents=True)
    (watch / "e01" / "w.bin").write_bytes(b"w" * 100)
    env = {**os.environ, **ENV}
    env.pop("CLOUDCKPT_DEBUG", None)
    # the output goes to files, not pipes: at -vv the SDKs' debug lines fill a pipe nobody reads until the end, and
    # the sync then blocks in its logging (it did, on S3: 60 s, and the push only ran at SIGTERM)
    with tempfile.TemporaryFile("w+") as out_f, tempfile.TemporaryFile("w+") as err_f:
        proc = subprocess.Popen([*CLI, *v, "sync", str(watch), "--remote", url, "--settle", "0.2", "--poll", "0.1",
                                 "--name-pattern", r"e(?P<epoch>\d+)"], stdout=out_f, stderr=err_f, text=True,
                                env=env, cwd=tmp)
        deadline = time.monotonic() + 60
        from cloudckpt.store import CheckpointStore

        synced = False
        while not synced and time.monotonic() < deadline and proc.poll() is None:
            with CheckpointStore(url, **_api_options(opts)) as store:
                synced = any(c.epoch == 1 and "w.bin" in {f.path for f in c.files} for c in store.list())
            if not synced:
                time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        out_f.seek(0)
        err_f.seek(0)
        out, err = out_f.read(), err_f.read()
    assert synced, f"{kind}: sync did not commit e01 while it ran (exit {proc.returncode}): {err[-600:]}"
    t.runs.append((["sync", url], proc.returncode, out, err))


def _api_options(opts: list[str]) -> dict:
    return dict(o.split("=", 1) for o in opts[1::2])


def failure_paths(t: Transcript, s3_url: str, gcs_url: str, ftp_url: str, tmp: Path) -> None:
    """Each failure path: a one-line error (or, with CLOUDCKPT_DEBUG, a traceback) that names no credential."""
    secret_opts = ["-o", f"key={S['key_id']}", "-o", f"secret={S['secret']}", "-o", f"token={S['token']}"]
    wrong = ftp_url.replace(S["password"], S["password"] + "x")
    creds = tmp / "gcp-creds.json"
    creds.write_text(INLINE_TOKEN.replace(S["private_key"], S["google_file_key"]))
    t.run_all([
        # an endpoint nobody answers at (first: its retries take the longest)
        (("-vv", *secret_opts, "-o", "endpoint_url=http://127.0.0.1:9", "ls", "--remote", s3_url),
         dict(expect=None, timeout=300)),
        # a bad option beside secret ones, and a malformed option holding a secret
        (("-vv", *secret_opts, "-o", "bogus_option=1", "ls", "--remote", s3_url), dict(expect=5)),
        (("-o", f"token{S['token']}", "ls", "--remote", s3_url), dict(expect=2)),
        # URLs that can't be used: credentials in an S3 URL, a bad bucket name, a SAS signature in the query
        (("-vv", "ls", "--remote", f"s3://{S['key_id']}:{S['secret']}@{s3_url[5:]}"), dict(expect=None)),
        (("-vv", "ls", "--remote", f"gs://x?sig={S['sas']}"), dict(expect=None)),
        # a generic fsspec URL with user:password: a wrong password, a missing run, the traceback on request
        (("-vv", "ls", "--remote", wrong), dict(expect=None)),
        (("-vv", "ls", "--remote", ftp_url + "-missing"), dict(expect=3)),
        (("-vv", "ls", "--remote", wrong), dict(env={"CLOUDCKPT_DEBUG": "1"}, expect=None)),
        (("-vv", "pull", "latest", "--remote", ftp_url + "-missing", "--to", str(tmp / "ftp-x")), dict(expect=3)),
        # GCS: an inline service-account token, and a credentials file from the environment (no emulator)
        (("-vv", "-o", f"token={INLINE_TOKEN}", "ls", "--remote", gcs_url), dict(expect=5)),
        (("-vv", "-o", f"token={INLINE_TOKEN}", "ls", "--remote", gcs_url), dict(env={"CLOUDCKPT_DEBUG": "1"},
                                                                                 expect=5)),
        (("-vv", "ls", "--remote", gcs_url), dict(env={"GOOGLE_APPLICATION_CREDENTIALS": str(creds)},
                                                  drop=("STORAGE_EMULATOR_HOST",), expect=None, timeout=300)),
    ])
    # access denied: a bucket whose policy refuses everyone
    import boto3

    bucket = s3_url.split("/")[2]
    boto3.client("s3").put_bucket_policy(Bucket=bucket, Policy=json.dumps({"Version": "2012-10-17", "Statement": [
        {"Effect": "Deny", "Principal": "*", "Action": "s3:*", "Resource": [f"arn:aws:s3:::{bucket}",
                                                                             f"arn:aws:s3:::{bucket}/*"]}]}))
    t.run("-vv", *secret_opts, "ls", "--remote", s3_url, "--json", expect=5)
    t.run("-vv", *secret_opts, "push", str(make_source(tmp, "denied-src")), "--remote", s3_url, expect=5)


def test_no_credential_reaches_output_logs_or_files(tmp_path, local_url, s3_url, gcs_url, ftp_url):
    t = Transcript(tmp_path)
    s3_opts = ["-o", f"key={S['key_id']}", "-o", f"secret={S['secret']}", "-o", f"token={S['token']}"]
    stores = {"local": (local_url, []), "s3": (s3_url, s3_opts), "gcs": (gcs_url, []),
              "ftp": (ftp_url, ["-o", "unsafe_no_cas=true"])}  # a generic store: writes need the option
    with ThreadPoolExecutor(PARALLEL) as pool:  # the stores side by side; each store's commands in order
        for done in [pool.submit(every_command, t, url, opts, tmp_path, kind) for kind, (url, opts) in stores.items()]:
            done.result()
    leaks = t.leaks() + files_leaks(tmp_path, {tmp_path / "gcp-creds.json"})
    for url, _ in stores.values():
        leaks += objects_leaks(url)
    failure_paths(t, s3_url, gcs_url, ftp_url, tmp_path)
    leaks += t.leaks() + files_leaks(tmp_path, {tmp_path / "gcp-creds.json"})
    failed = [r for r in t.runs if r[1] != 0]
    assert all(r[3].strip() for r in failed), "every failure says something"
    assert len(t.runs) >= 50
    assert not sorted(set(leaks)), f"{len(set(leaks))} leaks:\n" + "\n".join(sorted(set(leaks))[:40])
    marker = json.loads((tmp_path / "ftp-pulled" / ".cloudckpt.json").read_text())
    assert marker["url"] == redact_url(ftp_url) and "alice" not in marker["url"]


def test_redactor_masks_options_urls_keys_and_environment(tmp_path):
    creds = tmp_path / "sa.json"
    creds.write_text(INLINE_TOKEN)
    r = Redactor.from_environ({"AWS_SECRET_ACCESS_KEY": S["env_secret"], "GOOGLE_APPLICATION_CREDENTIALS": str(creds),
                               "MY_SERVICE_TOKEN": S["env_token"], "HOME": "/root"})
    r.add_options({"token": json.loads(INLINE_TOKEN), "client_kwargs": {"aws_secret_access_key": S["secret"]},
                   "endpoint_url": "http://127.0.0.1:9"})
    text = (f"{S['env_secret']} {json.loads(INLINE_TOKEN)!r} {S['env_token']} {S['secret']} "
            f"sftp://bob:{S['password']}@host/x https://a.blob.core.windows.net/c?sv=1&sig={S['sas']} /root")
    out = r.scrub(text)
    assert not [name for name, v in S.items() if v in out], out
    assert "/root" in out and "http" in out and "sv=1" in redact_url(f"https://h/c?sv=1&sig={S['sas']}")
    assert redact_url(f"https://h/c?sv=1&sig={S['sas']}") == "https://h/c?sv=1&sig=***"
    assert redact_url("s3://bucket/runs/r1") == "s3://bucket/runs/r1"
