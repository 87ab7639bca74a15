"""The bad day outside the store: bad URLs, a missing bucket, denied access (IAM enforced by a moto server of its
own), missing credentials, and a full local disk during a pull and during a push. Each ends in a typed error and its
documented exit code, leaves no partial files, and leaves the run as it was."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from cloudckpt import CheckpointStore, cli
from cloudckpt.errors import AccessError, CheckpointNotFoundError, CloudCkptError, ConfigurationError, TransferError

from .invariants import check_run
from .procs import cli_cmd, env_with, run

sys.path.insert(0, str(Path(__file__).parents[1]))
import servers  # noqa: E402


def cli_exit(*args: str) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = cli.main(list(args))
    return code, err.getvalue()


def _ckpt(root: Path, size: int = 10_000) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "w.bin").write_bytes(os.urandom(size))
    return root


# --- bad URLs and a missing bucket ----------------------------------------------------------------------------------

BAD_URLS = ["s3://ab/run", "gs://x/run", "s3://", "nosuchproto://bucket/run", "file://"]


@pytest.mark.filterwarnings("ignore:.*no conditional write")
@pytest.mark.parametrize("url", BAD_URLS)
def test_bad_url_is_a_configuration_error(url, tmp_path, figures):
    src = _ckpt(tmp_path / "c")
    with pytest.raises(ConfigurationError):
        with CheckpointStore(url) as store:
            store.push(src)
    code, err = cli_exit("push", str(tmp_path / "c"), "--to", url)
    assert code == 5 and err.startswith("cloudckpt: error:") and err.count("\n") == 1, (code, err)
    figures["bad_inputs"]["bad-url"] += 1


@pytest.mark.parametrize("kind", ["s3", "gcs", "azure"])
def test_missing_bucket_is_an_access_error_at_once(kind, request, tmp_path, figures):
    request.getfixturevalue(f"{kind}_server")
    url = {"s3": "s3://no-such-bucket-cloudckpt/run", "gcs": "gs://no-such-bucket-cloudckpt/run",
           "azure": "az://no-such-bucket-cloudckpt/run"}[kind]
    for op in ("pull", "push"):
        with pytest.raises(AccessError) as info:
            with CheckpointStore(url, budget=30) as store:
                store.pull("latest", to=tmp_path / "t") if op == "pull" else store.push(_ckpt(tmp_path / "c"))
        assert "no-such-bucket-cloudckpt" in str(info.value)
        assert not (tmp_path / "t").exists()
    code, err = cli_exit("pull", "latest", "--from", url, "--to", str(tmp_path / "t"))
    assert code == 5, err
    figures["bad_inputs"][f"missing-bucket/{kind}"] += 3


def test_no_run_at_url_is_nothing_matches(local_url, s3_url, tmp_path):
    for url in (local_url, s3_url):
        with pytest.raises(CheckpointNotFoundError):
            CheckpointStore(url).pull("latest", to=tmp_path / "t")
        assert cli_exit("ls", url)[0] == 3


# --- missing credentials --------------------------------------------------------------------------------------------

NO_AWS_CREDENTIALS = {"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None, "AWS_SESSION_TOKEN": None,
                      "AWS_PROFILE": None, "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/credentials",
                      "AWS_CONFIG_FILE": "/nonexistent/config", "AWS_EC2_METADATA_DISABLED": "true",
                      "AWS_CONTAINER_CREDENTIALS_FULL_URI": None, "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI": None}


def test_missing_aws_credentials_fail_at_once_with_exit_5(s3_url, tmp_path, figures):
    with CheckpointStore(s3_url) as store:
        store.push(_ckpt(tmp_path / "c"))
    out = run(cli_cmd("pull", "latest", "--from", s3_url, "--to", str(tmp_path / "t")),
              env=env_with(**NO_AWS_CREDENTIALS))
    assert out.returncode == 5, out.stderr
    assert "credentials" in out.stderr and s3_url in out.stderr and out.stderr.count("\n") == 1
    out = run(cli_cmd("push", str(tmp_path / "c"), "--to", s3_url), env=env_with(**NO_AWS_CREDENTIALS))
    assert out.returncode == 5, out.stderr
    assert not (tmp_path / "t").exists()
    figures["bad_inputs"]["missing-credentials"] += 2


# --- denied access: a moto server enforcing IAM ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def iam_moto(s3_server):
    """A moto server of its own (so the shared one stays open): a bucket with one checkpoint, users with no rights,
    read-only rights, and an explicit Deny; then authentication is switched on."""
    import boto3

    server = servers.start_moto()
    ep = server.endpoint
    admin = dict(endpoint_url=ep, aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1")
    s3 = boto3.client("s3", **admin)
    iam = boto3.client("iam", **admin)
    s3.create_bucket(Bucket="guarded")
    read_policy = {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": ["s3:GetObject", "s3:ListBucket", "s3:HeadObject"],
         "Resource": ["arn:aws:s3:::guarded", "arn:aws:s3:::guarded/*"]}]}
    deny_policy = {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": "s3:*", "Resource": "*"},
        {"Effect": "Deny", "Action": "s3:*", "Resource": ["arn:aws:s3:::guarded", "arn:aws:s3:::guarded/*"]}]}
    all_policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
    keys = {}
    admin_policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
    for user, policy in (("nobody", None), ("reader", read_policy), ("denied", deny_policy), ("writer", all_policy),
                         ("admin", admin_policy)):
        iam.create_user(UserName=user)
        if policy:
            iam.put_user_policy(UserName=user, PolicyName="p", PolicyDocument=json.dumps(policy))
        k = iam.create_access_key(UserName=user)["AccessKey"]
        keys[user] = (k["AccessKeyId"], k["SecretAccessKey"])
    req = urllib.request.Request(ep + "/moto-api/reset-auth", data=b"0", method="POST",
                                 headers={"Content-Type": "text/plain"})
    urllib.request.urlopen(req).read()
    yield ep, keys
    server.stop()


def _as(ep: str, keys, user: str) -> dict:
    key, secret = keys[user]
    return {"endpoint_url": ep, "key": key, "secret": secret}


def test_denied_access_is_an_access_error_with_exit_5(iam_moto, tmp_path, figures):
    ep, keys = iam_moto
    url = "s3://guarded/runs/r1"
    with CheckpointStore(url, **_as(ep, keys, "writer")) as store:
        store.push(_ckpt(tmp_path / "c"), epoch=0)  # something for a prune to delete
        entry = store.push(tmp_path / "c", epoch=1)
    before = {o.rel for o in CheckpointStore(url, **_as(ep, keys, "writer")).backend.list_objects()}
    for user, op in (("nobody", "pull"), ("denied", "pull"), ("nobody", "push"), ("reader", "push"),
                     ("denied", "push"), ("reader", "prune"), ("reader", "gc")):
        with CheckpointStore(url, budget=30, **_as(ep, keys, user)) as store:
            with pytest.raises(AccessError) as info:
                if op == "pull":
                    store.pull("latest", to=tmp_path / "t")
                elif op == "push":
                    store.push(tmp_path / "c", epoch=2)
                elif op == "prune":
                    store.prune(keep_last=0)
                else:
                    # gc has nothing to delete unless there is a leftover: plant one as the writer
                    CheckpointStore(url, **_as(ep, keys, "writer")).backend.write_bytes("ckpt-x-deadbeef/w.bin", b"x")
                    store.gc(min_age=0)
            assert "guarded" in str(info.value), str(info.value)
        figures["bad_inputs"][f"denied/{user}-{op}"] += 1
        assert not (tmp_path / "t").exists()
    # the reader can read, and nothing the denied calls tried is visible
    with CheckpointStore(url, **_as(ep, keys, "reader")) as store:
        assert store.pull("latest", to=tmp_path / "ok").entry.id == entry.id
    with CheckpointStore(url, **_as(ep, keys, "writer")) as store:
        store.backend.delete(["ckpt-x-deadbeef/w.bin"])
        assert {o.rel for o in store.backend.list_objects()} - before == set()
    # the CLI: one line, exit 5
    code, err = cli_exit("--storage-option", f"endpoint_url={ep}", "--storage-option", f"key={keys['nobody'][0]}",
                         "--storage-option", f"secret={keys['nobody'][1]}", "pull", "latest", "--from", url,
                         "--to", str(tmp_path / "t2"))
    assert code == 5 and "access denied" in err, err
    code, err = cli_exit("--storage-option", f"endpoint_url={ep}", "--storage-option", "key=AKIAUNKNOWN0000000000",
                         "--storage-option", "secret=x", "ls", url)
    assert code == 5, err


# --- a full local disk ----------------------------------------------------------------------------------------------

@pytest.fixture
def small_fs(tmp_path):
    """A 4 MiB tmpfs the test mounts (root only); skipped with the reason when mounting is not permitted."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command: can't create a size-limited filesystem")
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if p.returncode != 0:
        pytest.skip(f"mounting a 4 MiB tmpfs is not permitted here: {p.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _tree(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")}


def test_full_disk_during_pull_leaves_target_and_disk_as_they_were(small_fs, local_url, tmp_path, figures):
    with CheckpointStore(local_url) as store:
        small = store.push(_ckpt(tmp_path / "small", 100_000), epoch=1)
        store.pull("latest", to=small_fs / "target")
        big = store.push(_ckpt(tmp_path / "big", 6 * 2**20), epoch=2)
        before = _tree(small_fs)
        free = shutil.disk_usage(small_fs).free
        with pytest.raises(CloudCkptError) as info:
            store.pull("latest", to=small_fs / "target")
        assert "No space left" in str(info.value) or "No space left" in str(info.value.__cause__)
        assert _tree(small_fs) == before, "a partial download was left behind"
        assert shutil.disk_usage(small_fs).free == free
        assert json.loads((small_fs / "target" / ".cloudckpt.json").read_text())["checkpoint"]["id"] == small.id
    code, err = cli_exit("pull", big.id, "--from", local_url, "--to", str(small_fs / "target"))
    assert code == 1 and "No space left" in err and err.count("\n") == 1, err
    assert _tree(small_fs) == before
    figures["bad_inputs"]["full-disk/pull"] += 2


def test_full_disk_during_push_keeps_the_committed_run(small_fs, tmp_path, figures):
    url = str(small_fs / "run")
    with CheckpointStore(url) as store:
        first = store.push(_ckpt(tmp_path / "a", 1_000_000), epoch=1)
        with pytest.raises(TransferError) as info:
            store.push(_ckpt(tmp_path / "b", 5 * 2**20), epoch=2)
        assert "No space left" in str(info.value)
        assert [c.id for c in store.list()] == [first.id]
    code, err = cli_exit("push", str(tmp_path / "b"), "--to", url, "--epoch", "3")
    assert code == 1 and "No space left" in err, err
    state = check_run(url)  # gc frees the partial upload; the first checkpoint is intact
    assert [c.id for c in state.index.checkpoints] == [first.id]
    assert not [p for p in small_fs.rglob("*") if ".cloudckpt-tmp-" in p.name]
    figures["bad_inputs"]["full-disk/push"] += 2


# --- credentials that expire mid-run -----------------------------------------------------------------------------

def test_rotated_credentials_are_picked_up_by_a_long_running_store(iam_moto, tmp_path, monkeypatch, figures):
    """A run outliving its credentials: the key it started with is revoked and a new one issued through the
    profile's refreshable source (``credential_process`` with an expiry). The same store object keeps committing.
    With static keys, the revoked key is an AccessError at once (exit 5), not retries forever."""
    import datetime

    import boto3

    ep, keys = iam_moto
    admin = boto3.client("iam", endpoint_url=ep, aws_access_key_id=keys["admin"][0],
                         aws_secret_access_key=keys["admin"][1], region_name="us-east-1")
    admin.create_user(UserName="rotating")
    admin.put_user_policy(UserName="rotating", PolicyName="p", PolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
    creds = tmp_path / "creds.json"

    def issue() -> str:
        k = admin.create_access_key(UserName="rotating")["AccessKey"]
        soon = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(minutes=5)  # inside botocore's
        creds.write_text(json.dumps({"Version": 1, "AccessKeyId": k["AccessKeyId"],  # refresh window: re-read
                                     "SecretAccessKey": k["SecretAccessKey"], "Expiration": soon.isoformat()}))
        return k["AccessKeyId"]

    first = issue()
    config = tmp_path / "aws-config"
    config.write_text(f"[profile rotating]\ncredential_process = cat {creds}\nregion = us-east-1\n")
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    url = "s3://guarded/runs/rotating"
    src = _ckpt(tmp_path / "c")
    with CheckpointStore(url, budget=30, endpoint_url=ep, profile="rotating") as store:
        store.push(src, epoch=1)
        static = CheckpointStore(url, budget=30, endpoint_url=ep, key=first,
                                 secret=json.loads(creds.read_text())["SecretAccessKey"])
        static.push(src, epoch=2)
        for round_ in range(3):  # revoke the key in use, issue a new one: the long-lived store carries on
            old = json.loads(creds.read_text())["AccessKeyId"]
            issue()
            admin.delete_access_key(UserName="rotating", AccessKeyId=old)
            store.push(src, epoch=3 + round_)
            assert store.pull("latest", to=tmp_path / f"p{round_}").entry.epoch == 3 + round_
            figures["credential_rotations_survived"]["s3"] += 1
        with pytest.raises(AccessError):
            static.push(src, epoch=9)  # its key is gone and nothing refreshes it
        static.close()
        assert [c.epoch for c in store.list()] == [1, 2, 3, 4, 5]
