"""Least privilege on GCP, verified: cloudckpt's CLI works when every GCS request it sends is checked, at a proxy in
front of the real fake-gcs-server, against the roles and IAM conditions of terraform/modules/gcp-access — a request
needing a permission outside the role, or a resource outside the run prefix, gets 403 as on GCP.

The only request refused is google-cloud-storage's own background bucket-metadata lookup (storage.buckets.get, for
its tracing attributes), which the library tolerates when denied: the commands must succeed regardless."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from infra_support import tf
from infra_support.gcs_recorder import OBJECT_USER, OBJECT_VIEWER, ROLES, GcsCall, parse_gcs
from infra_support.s3_recorder import RecordingProxy
from support import servers

from cloudckpt import CheckpointStore

PREFIX = "runs/r1"
CLI = Path(sys.executable).with_name("cloudckpt")
pytestmark = pytest.mark.skipif(not CLI.exists(), reason="the cloudckpt CLI is not installed in this venv")


@pytest.fixture
def bucket(gcs_server) -> str:
    name = f"iam-{os.urandom(5).hex()}"
    servers.make_gcs_bucket(name)
    return name


OPTIONAL = {"storage.buckets.get"}  # google-cloud-storage's best-effort metadata lookup, tolerated when denied


class Enforcer:
    """``fail_when`` for the proxy: 403 for any request the role + condition of ``member`` would not allow."""

    def __init__(self, member: str, bucket: str) -> None:
        self.role = _roles()[member]
        self.permissions = ROLES[self.role]
        self.admits = tf.gcs_condition(f"{member}_condition", bucket, PREFIX)
        self.denied: list[tuple] = []

    def __call__(self, call: GcsCall):
        for need in call.needs():
            if need[0] not in self.permissions or not self.admits(*need[1:]):
                self.denied.append(need)
                body = json.dumps({"error": {"code": 403, "message": f"{need[0]} denied on {need[2]}",
                                             "errors": [{"reason": "forbidden", "message": "denied"}]}}).encode()
                return 403, "application/json", body
        return None


def _roles() -> dict[str, str]:
    members = tf.blocks(tf.load_dir(tf.TERRAFORM / "modules" / "gcp-access"), "resource",
                        "google_storage_bucket_iam_member")
    return {name: body["role"] for name, body in members.items()}


def _cli(*args: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "CLOUDCKPT_REMOTE"}
    proc = subprocess.run([str(CLI), *args], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"cloudckpt {' '.join(args)} → {proc.returncode}: {proc.stderr}"
    return proc.stdout


def _dir(root: Path, size: int) -> Path:
    root.mkdir(parents=True)
    (root / "model.weights.h5").write_bytes(os.urandom(size))
    (root / "state.json").write_bytes(b"{}")
    return root


def _orphan(endpoint: str, bucket: str) -> None:
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    client = storage.Client(project="cloudckpt-test", credentials=AnonymousCredentials(),
                            client_options={"api_endpoint": endpoint})
    client.bucket(bucket).blob(f"{PREFIX}/ckpt-e000099-deadbeef/orphan.bin").upload_from_string(b"x")


def _check(calls: list[GcsCall], enforcer: Enforcer) -> set[str]:
    """The permissions the commands used (the refused optional lookup aside), all within the role and condition."""
    needs = [n for c in calls for n in c.needs()]
    perms = {n[0] for n in needs}
    assert not [p for p in perms if p.startswith("UNMAPPED")], f"unknown requests: {perms}"
    assert {n[0] for n in enforcer.denied} <= OPTIONAL, f"refused: {enforcer.denied[:5]}"
    used = {n[0] for n in needs if n not in enforcer.denied}
    assert used <= enforcer.permissions
    assert all(enforcer.admits(*n[1:]) for n in needs if n not in enforcer.denied)
    return used


def test_training_works_with_object_admin_under_the_prefix_condition(gcs_server, bucket, tmp_path, monkeypatch):
    url = f"gs://{bucket}/{PREFIX}"
    enforcer = Enforcer("training", bucket)
    with RecordingProxy(gcs_server.endpoint, parse=parse_gcs, fail_when=enforcer) as proxy:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.endpoint)
        with CheckpointStore(url, budget=20, workers=2) as store:
            store.claim()
        for epoch, loss in ((1, 0.9), (2, 0.5), (3, 0.7)):
            size = 600 * 1024 if epoch == 2 else 4096  # > chunk_size: a resumable upload
            _cli("-o", "chunk_size=262144", "push", str(_dir(tmp_path / f"e{epoch}", size)), "--remote", url,
                 "--epoch", str(epoch), "--metric", f"val_loss={loss}", "--monitor", "val_loss", "--mode", "min",
                 "--keep-last", "2", "--keep-best", "1")
        _cli("ls", "--remote", url)
        _cli("pull", "best", "--remote", url, "--to", str(tmp_path / "restored"))
        _cli("verify", "--remote", url, "--all")
        _cli("prune", "--remote", url, "--keep-last", "1")
        calls = proxy.take()
        _orphan(gcs_server.endpoint, bucket)  # what a crashed commit leaves; written past the proxy
        assert "orphan.bin" in _cli("gc", "--remote", url, "--min-age", "0", "--json")
        calls += proxy.take()
    used = _check(calls, enforcer)
    print(f"\nGCS training: {sorted(used)} in {len(calls)} requests under {enforcer.role}; "
          f"refused {len(enforcer.denied)} optional {sorted({n[0] for n in enforcer.denied})}")
    assert {"storage.objects.create", "storage.objects.delete", "storage.objects.get", "storage.objects.list"} <= used
    assert used <= OBJECT_USER  # roles/storage.objectUser would do as well
    assert (tmp_path / "restored" / "model.weights.h5").stat().st_size == 600 * 1024  # the best: epoch 2


def test_restore_works_with_object_viewer_under_the_prefix_condition(gcs_server, bucket, tmp_path, monkeypatch):
    url = f"gs://{bucket}/{PREFIX}"
    for epoch, loss in ((1, 0.4), (2, 0.6)):
        _cli("push", str(_dir(tmp_path / f"s{epoch}", 4096 * epoch)), "--remote", url, "--epoch", str(epoch),
             "--metric", f"val_loss={loss}", "--monitor", "val_loss", "--mode", "min")
    enforcer = Enforcer("restore", bucket)
    assert enforcer.role == "roles/storage.objectViewer"
    with RecordingProxy(gcs_server.endpoint, parse=parse_gcs, fail_when=enforcer) as proxy:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.endpoint)
        _cli("pull", "best", "--remote", url, "--to", str(tmp_path / "checkpoint"))
        _cli("ls", "--remote", url)
        _cli("show", "latest", "--remote", url)
        _cli("verify", "--remote", url, "best")
        calls = proxy.take()
    used = _check(calls, enforcer)
    print(f"\nGCS restore: {sorted(used)} in {len(calls)} requests under {enforcer.role}; "
          f"refused {len(enforcer.denied)} optional {sorted({n[0] for n in enforcer.denied})}")
    assert used <= OBJECT_VIEWER and "storage.objects.get" in used
    assert (tmp_path / "checkpoint" / "model.weights.h5").stat().st_size == 4096  # epoch 1 is the best


def test_enforcer_refuses_outside_the_grant(bucket):
    """The enforcing proxy is not vacuous: other runs, writes by the CI identity and bucket listings are refused."""
    viewer, admin = Enforcer("restore", bucket), Enforcer("training", bucket)
    o = "/storage/v1/b/{}/o/{}"
    assert viewer(GcsCall("GET", o.format(bucket, "x"), {}, bucket, f"{PREFIX}/index.json")) is None
    assert viewer(GcsCall("GET", o.format(bucket, "x"), {}, bucket, "runs/r2/index.json"))[0] == 403
    assert viewer(GcsCall("DELETE", o.format(bucket, "x"), {}, bucket, f"{PREFIX}/index.json"))[0] == 403
    assert admin(GcsCall("DELETE", o.format(bucket, "x"), {}, bucket, f"{PREFIX}/index.json")) is None
    assert admin(GcsCall("GET", f"/storage/v1/b/{bucket}/o", {"prefix": "runs/"}, bucket, None))[0] == 403
    assert admin(GcsCall("GET", f"/storage/v1/b/{bucket}/o", {"prefix": f"{PREFIX}/"}, bucket, None)) is None
