"""Messages (issue 24 item 5), as real processes: one line each, true, naming the fix. A push to a missing bucket
says only that (no warning about a probe object that was never created); `pull --fallback` reports its one event
in one line; missing S3 credentials name AWS's variables (not GOOGLE_APPLICATION_CREDENTIALS); credentials the
store rejects are said to be wrong, not to lack permission. (The wrong endpoint: test_cli.py's retry summary test;
the spot scripts' restore: test_spot_restore.py.)"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import boto3
from support import servers
from test_cli import one_line_error, push, run


def test_push_to_a_missing_bucket_is_one_line(s3_server, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "w.bin").write_bytes(b"x" * 100)
    proc = run("push", str(src), "-r", "s3://no-such-bucket-here/runs/r1")
    assert proc.returncode == 5
    line = one_line_error(proc)  # was preceded by "could not delete the probe object(s) ...; `cloudckpt gc` will"
    assert "no such bucket" in line.lower() and "probe" not in proc.stderr


def test_fallback_reports_one_line_for_one_event(local_url, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "w.bin").write_bytes(b"x" * 100)
    good = push(local_url, src, "--epoch", "1")
    bad = push(local_url, src, "--epoch", "2")
    (Path(local_url) / bad["id"] / "w.bin").write_bytes(b"y" * 100)
    proc = run("pull", "latest", "--fallback", "-r", local_url, "--to", str(tmp_path / "out"), "--json")
    assert proc.returncode == 0
    line = one_line_error(proc)
    assert good["id"] in line and bad["id"] in line and "checksum mismatch" in line, line
    assert json.loads(proc.stdout)["skipped"] == [bad["id"]]


def test_missing_s3_credentials_name_aws_settings(tmp_path):
    env = {"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": "", "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no"),
           "AWS_CONFIG_FILE": str(tmp_path / "no"), "AWS_EC2_METADATA_DISABLED": "true"}
    proc = run("ls", "-r", "s3://some-bucket/run", env=env)
    line = one_line_error(proc)
    assert proc.returncode == 5 and "GOOGLE_APPLICATION_CREDENTIALS" not in line
    assert "no AWS credentials found" in line and "AWS_ACCESS_KEY_ID" in line


def test_rejected_s3_credentials_are_said_to_be_wrong():
    """A moto server of its own with authentication on: an unknown access key is refused (InvalidAccessKeyId)."""
    server = servers.start_moto()
    try:
        s3 = boto3.client("s3", endpoint_url=server.endpoint, region_name="us-east-1", aws_access_key_id="testing",
                          aws_secret_access_key="testing")
        s3.create_bucket(Bucket="auth")
        auth = urllib.request.Request(server.endpoint + "/moto-api/reset-auth", method="POST", data=b"0",
                                      headers={"Content-Type": "text/plain"})  # authenticate every request from now
        urllib.request.urlopen(auth, timeout=30)
        env = {"AWS_ACCESS_KEY_ID": "AKIAWRONGWRONGWRONG1", "AWS_SECRET_ACCESS_KEY": "wrong-secret",
               "AWS_ENDPOINT_URL": server.endpoint, "AWS_ENDPOINT_URL_S3": server.endpoint}
        proc = run("ls", "-r", "s3://auth/run", env=env)
    finally:
        server.stop()
    line = one_line_error(proc)
    assert proc.returncode == 5 and "rejected the credentials" in line and "lack permission" not in line, line
    assert "wrong-secret" not in proc.stderr
