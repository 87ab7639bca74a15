"""Least privilege, verified: the S3 requests cloudckpt really sends, recorded at a proxy in front of the real S3
server (moto), against the actions the Terraform policies grant (terraform/modules/aws-access, read with
python-hcl2).

The training policy must grant exactly the actions that push / pull / prune / gc / ls / verify / claim and a failed
multipart upload use, and every recorded request must be allowed by it with its real resource ARN and list prefix
(so the run-prefix scoping is exercised too). The CI restore policy must grant exactly what pull / ls / verify / show
use, and nothing those requests did not need.

The CI restore identity is also run with IAM enforced at the proxy (:class:`S3Enforcer`): every request its Terraform
policy would deny gets 403, and so does a GET of a missing key when the identity may not list the bucket — real S3's
rule, which moto doesn't model. Under it, a pull on an empty run must still say "nothing matches" (exit 3) and a pull
whose checkpoint is pruned while it downloads must resolve again, not fail as "access denied".
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from infra_support import tf
from infra_support.s3_recorder import RecordingProxy, S3Call
from support import servers

from cloudckpt import CheckpointStore, TransferError
from cloudckpt.errors import AccessError, CheckpointNotFoundError

ACCESS = tf.TERRAFORM / "modules" / "aws-access"
PREFIX = "runs/r1"
MiB = 2**20
CLI = Path(sys.executable).with_name("cloudckpt")


def _fail_upload_part(call: S3Call) -> bool:
    """A failure injected into the second part of a multipart upload."""
    return call.method == "PUT" and call.query.get("partNumber") == "2"


@pytest.fixture
def bucket(s3_server) -> str:
    name = f"iam-{os.urandom(5).hex()}"
    servers.make_s3_bucket(name)
    return name


@pytest.fixture
def proxy(s3_server):
    with RecordingProxy(s3_server.endpoint) as p:
        yield p


@pytest.fixture(scope="module")
def module():
    return tf.load_dir(ACCESS)


def _values(bucket: str) -> dict[str, str]:
    return {"var.bucket_arn": f"arn:aws:s3:::{bucket}", "var.run_prefix": PREFIX, "local.restore_prefix": PREFIX}


def granted(module, name: str) -> set[str]:
    return {a for st in tf.policy_statements(module, name, _values("b")) for a in st.actions if a.startswith("s3:")}


def needs(call: S3Call) -> list[tuple[str, str, dict[str, str]]]:
    """(action, resource ARN, condition context) for each authorization the request needs."""
    action = call.action
    if action == "s3:ListBucket":
        ctx = {"s3:prefix": call.query["prefix"]} if "prefix" in call.query else {}
        return [(action, f"arn:aws:s3:::{call.bucket}", ctx)]
    if call.delete_keys:
        return [(action, f"arn:aws:s3:::{call.bucket}/{k}", {}) for k in call.delete_keys]
    return [(action, f"arn:aws:s3:::{call.bucket}/{call.key}", {})]


def _summary(calls: list[S3Call]) -> str:
    kinds = Counter(f"{c.method}{'?' + '&'.join(sorted(c.query)) if set(c.query) - {'prefix', 'encoding-type'} else ''}"
                    f"{' bucket' if not c.key else ''} -> {c.action}" for c in calls)
    return f"{len(calls)} requests: " + ", ".join(f"{n}x {k}" for k, n in sorted(kinds.items()))


def assert_allowed(calls: list[S3Call], statements: list[tf.Statement]) -> None:
    denied = [(c.method, c.bucket, c.key, c.query, need) for c in calls for need in needs(c)
              if not any(st.allows(*need) for st in statements)]
    assert not denied, f"requests the policy would deny: {denied[:5]}"


def _files(root: Path, big: int) -> Path:
    root.mkdir(parents=True)
    (root / "model.weights.h5").write_bytes(os.urandom(big))  # multipart when big > part_size
    (root / "state.json").write_bytes(b'{"epoch": 1}')
    return root


def _cli(proxy: RecordingProxy, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "AWS_ENDPOINT_URL": proxy.endpoint, "AWS_ENDPOINT_URL_S3": proxy.endpoint}
    env.pop("CLOUDCKPT_REMOTE", None)
    proc = subprocess.run([str(CLI), *args], env=env, capture_output=True, text=True, timeout=120)
    if check:
        assert proc.returncode == 0, f"cloudckpt {' '.join(args)} → {proc.returncode}: {proc.stderr}"
    return proc


def training_session(proxy: RecordingProxy, bucket: str, tmp: Path) -> list[S3Call]:
    """Everything a training job does with its run, through the Python API and the CLI."""
    url = f"s3://{bucket}/{PREFIX}"
    opts = dict(endpoint_url=proxy.endpoint, part_size=5 * MiB, max_concurrency=2)
    with CheckpointStore(url, budget=20, workers=2, **opts) as store:
        store.claim()
        for epoch, loss in enumerate([0.9, 0.5, 0.7, 0.6], start=1):
            store.push(_files(tmp / f"e{epoch}", 6 * MiB if epoch == 1 else 64 * 1024), epoch=epoch,
                       metrics={"val_loss": loss}, monitor="val_loss", mode="min", keep_best=1, keep_last=2)
        proxy.fail_when = _fail_upload_part
        with pytest.raises(TransferError):  # a multipart upload that fails: boto3 aborts it
            store.push(_files(tmp / "doomed", 11 * MiB), epoch=5, metrics={"val_loss": 0.1})
        proxy.fail_when = None
        store.pull("latest", to=tmp / "restored")
        store.verify(all=True)
        store.prune(keep_last=1)
        _orphan(bucket)
        report = store.gc(min_age=0)
        assert report.deleted == ["ckpt-e000099-deadbeef/orphan.bin"]
    assert any(c.action == "s3:AbortMultipartUpload" for c in proxy.calls), "the failed upload was not aborted"
    if CLI.exists():
        _cli(proxy, "push", str(_files(tmp / "cli", 1024)), "--remote", url, "--epoch", "9", "--metric", "val_loss=0.4")
        _cli(proxy, "ls", "--remote", url)
        _cli(proxy, "pull", "best", "--remote", url, "--to", str(tmp / "cli-restored"))
        _cli(proxy, "verify", "--remote", url, "--all")
        _cli(proxy, "prune", "--remote", url, "--keep-last", "1")
        _orphan(bucket)
        assert "orphan.bin" in _cli(proxy, "gc", "--remote", url, "--min-age", "0", "--json").stdout
    return proxy.take()


class S3Enforcer:
    """``fail_when`` for the recording proxy: one identity's Terraform policy, enforced as AWS does. A request the
    statements don't allow gets 403 AccessDenied; so does a GET/HEAD of a key that doesn't exist unless the identity
    may list the bucket ("If you don't have the s3:ListBucket permission, Amazon S3 returns 403"), which is taken
    strictly: a ListBucket grant scoped by ``s3:prefix`` doesn't count (the request carries no prefix).
    ``before(call)``, when set, runs first: a test's hook to change the store at a chosen request."""

    ERROR = (403, "application/xml", b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>AccessDenied</Code>'
                                     b"<Message>Access Denied</Message><RequestId>enforcer</RequestId></Error>")

    def __init__(self, statements: list[tf.Statement]) -> None:
        import boto3

        self.statements = statements
        self.s3 = boto3.client("s3")  # straight to the server, as its own view of what exists
        self.before = None
        self.denied: list[tuple[str, str, str]] = []

    def _allowed(self, action: str, resource: str, context: dict[str, str]) -> bool:
        return any(st.allows(action, resource, context) for st in self.statements)

    def __call__(self, call: S3Call):
        if self.before is not None:
            self.before(call)
        for need in needs(call):
            if not self._allowed(*need):
                self.denied.append((call.method, call.key, need[0]))
                return self.ERROR
        if call.action == "s3:GetObject" and not self._allowed("s3:ListBucket", f"arn:aws:s3:::{call.bucket}", {}):
            try:
                self.s3.head_object(Bucket=call.bucket, Key=call.key)
            except self.s3.exceptions.ClientError:
                self.denied.append((call.method, call.key, "missing key without s3:ListBucket"))
                return self.ERROR
        return None


def restore_statements(module, bucket: str, *, listing: bool = True) -> list[tf.Statement]:
    """The restore policy's statements; ``listing=False``: without its ListBucket grant (a GetObject-only role)."""
    return [st for st in tf.policy_statements(module, "restore", _values(bucket))
            if listing or "s3:ListBucket" not in st.actions]


def empty_run_session(proxy: RecordingProxy, bucket: str, tmp: Path) -> None:
    """The CI restore step before the run's first commit: pull says "nothing matches" (exit 3), API and CLI."""
    url = f"s3://{bucket}/{PREFIX}"
    with CheckpointStore(url, budget=20, workers=2, endpoint_url=proxy.endpoint) as store:
        with pytest.raises(CheckpointNotFoundError):
            store.pull("latest", to=tmp / "empty-api")
    if CLI.exists():
        proc = _cli(proxy, "pull", "latest", "--remote", url, "--to", str(tmp / "empty-cli"), check=False)
        assert proc.returncode == 3, f"pull on an empty run → {proc.returncode}: {proc.stderr}"
    assert not (tmp / "empty-api").exists() and not (tmp / "empty-cli").exists()


def restore_session(proxy: RecordingProxy, bucket: str, tmp: Path) -> list[S3Call]:
    """What the CI restore step does: pull best (as in infra/ci), ls, show, verify; API and CLI."""
    url = f"s3://{bucket}/{PREFIX}"
    with CheckpointStore(url, budget=20, workers=2, endpoint_url=proxy.endpoint) as store:
        store.list()
        store.pull("best", to=tmp / "ci-api")
        store.verify("best")
        store.verify(all=True)
    if CLI.exists():
        _cli(proxy, "pull", "best", "--remote", url, "--to", str(tmp / "checkpoint"))
        _cli(proxy, "ls", "--remote", url)
        _cli(proxy, "show", "latest", "--remote", url)
        _cli(proxy, "verify", "--remote", url, "best")
    return proxy.take()


def _orphan(bucket: str) -> None:
    """What a crashed commit leaves: an object in a checkpoint directory the index doesn't list (not recorded)."""
    import boto3

    boto3.client("s3").put_object(Bucket=bucket, Key=f"{PREFIX}/ckpt-e000099-deadbeef/orphan.bin", Body=b"x")


def _seed(bucket: str, tmp: Path) -> None:
    """A run with two committed checkpoints, written directly (not recorded)."""
    with CheckpointStore(f"s3://{bucket}/{PREFIX}", budget=20, workers=2, part_size=5 * MiB) as store:
        for epoch, loss in ((1, 0.8), (2, 0.6)):
            store.push(_files(tmp / f"seed{epoch}", 6 * MiB if epoch == 2 else 4096), epoch=epoch,
                       metrics={"val_loss": loss}, monitor="val_loss", mode="min")


def test_policy_evaluator_denies_outside_the_prefix(module, bucket):
    """The matcher used below is not vacuous: other runs, the bare bucket and unscoped listing are refused."""
    training = tf.policy_statements(module, "training", _values(bucket))
    ok = lambda *need: any(st.allows(*need) for st in training)  # noqa: E731
    assert ok("s3:GetObject", f"arn:aws:s3:::{bucket}/{PREFIX}/ckpt-1/a.bin", {})
    assert not ok("s3:GetObject", f"arn:aws:s3:::{bucket}/runs/r2/ckpt-1/a.bin", {})
    assert not ok("s3:GetObject", f"arn:aws:s3:::{bucket}/{PREFIX}-other/a.bin", {})
    assert not ok("s3:PutObject", f"arn:aws:s3:::other-{bucket}/{PREFIX}/a.bin", {})
    assert ok("s3:ListBucket", f"arn:aws:s3:::{bucket}", {"s3:prefix": f"{PREFIX}/"})
    assert not ok("s3:ListBucket", f"arn:aws:s3:::{bucket}", {"s3:prefix": "runs/"})
    assert not ok("s3:ListBucket", f"arn:aws:s3:::{bucket}", {})  # HeadBucket / whole-bucket listing
    assert not ok("s3:DeleteObjectVersion", f"arn:aws:s3:::{bucket}/{PREFIX}/a.bin", {})


def test_training_policy_grants_exactly_what_training_uses(module, proxy, bucket, tmp_path):
    calls = training_session(proxy, bucket, tmp_path)
    used = {c.action for c in calls}
    assert not [a for a in used if a.startswith("UNMAPPED")], f"requests with no known IAM action: {used}"
    assert {c.bucket for c in calls} == {bucket}
    policy = granted(module, "training")
    print(f"\ntraining: recorded {_summary(calls)}; granted {sorted(policy)}")
    assert used - policy == set(), f"used but not granted: {sorted(used - policy)}"
    assert policy - used == set(), f"granted but never used: {sorted(policy - used)}"
    assert_allowed(calls, tf.policy_statements(module, "training", _values(bucket)))


def test_restore_policy_grants_exactly_what_ci_restore_uses(module, proxy, bucket, tmp_path):
    proxy.fail_when = S3Enforcer(restore_statements(module, bucket))
    empty_run_session(proxy, bucket, tmp_path)
    _seed(bucket, tmp_path)
    calls = restore_session(proxy, bucket, tmp_path)
    used = {c.action for c in calls}
    assert not [a for a in used if a.startswith("UNMAPPED")], f"requests with no known IAM action: {used}"
    policy = granted(module, "restore")
    print(f"\nrestore: recorded {_summary(calls)}; granted {sorted(policy)}")
    assert used == policy, f"used {sorted(used)} != granted {sorted(policy)}"
    assert_allowed(calls, tf.policy_statements(module, "restore", _values(bucket)))
    assert (tmp_path / "ci-api" / "model.weights.h5").stat().st_size == 6 * MiB  # the best: epoch 2, multipart
    if CLI.exists():
        assert (tmp_path / "checkpoint" / "model.weights.h5").stat().st_size == 6 * MiB


def test_kms_grants_only_with_a_key(module):
    """SSE-KMS grants are dynamic statements that exist only when kms_key_arn is set, and hold only KMS actions."""
    for name, expected in (("training", {"kms:Decrypt", "kms:GenerateDataKey"}), ("restore", {"kms:Decrypt"})):
        dyn = tf.dynamic_statements(module, name)
        assert [set(d["actions"]) for d in dyn] == [expected]
        assert all("var.kms_key_arn == null ? []" in d["for_each"] for d in dyn)


# --- the CI restore identity under enforced IAM: a missing key is a 403 there, not a 404 --------------------------

def test_ci_restore_pull_on_an_empty_run_is_nothing_matches(module, proxy, bucket, tmp_path):
    enforcer = S3Enforcer(restore_statements(module, bucket))
    proxy.fail_when = enforcer
    empty_run_session(proxy, bucket, tmp_path)
    assert enforcer.denied, "the enforcer never answered 403: the case under test did not occur"
    listed = [c for c in proxy.take() if c.action == "s3:ListBucket"]
    assert listed and all(c.query["prefix"] == f"{PREFIX}/index.json" for c in listed)


def test_ci_restore_without_list_right_says_why_it_cant_tell(module, proxy, bucket, tmp_path):
    """A GetObject-only role (the old policy): a 403 is not taken for "missing" blindly; it stays an access error
    (exit 5) whose message names the missing s3:ListBucket grant."""
    proxy.fail_when = S3Enforcer(restore_statements(module, bucket, listing=False))
    url = f"s3://{bucket}/{PREFIX}"
    with CheckpointStore(url, budget=20, workers=2, endpoint_url=proxy.endpoint) as store:
        with pytest.raises(AccessError, match="s3:ListBucket"):
            store.pull("latest", to=tmp_path / "t")
    assert not (tmp_path / "t").exists()


def test_ci_restore_pull_racing_a_prune_resolves_again(module, proxy, bucket, tmp_path):
    """The checkpoint a pull chose is pruned by the training job while its files download: the pull resolves the
    selector again and restores the new latest, under the restore role."""
    url = f"s3://{bucket}/{PREFIX}"
    with CheckpointStore(url, budget=20, workers=2) as writer:
        first = writer.push(_files(tmp_path / "a", 64 * 1024), epoch=1)
        enforcer = S3Enforcer(restore_statements(module, bucket))
        newer = []

        def prune_under_the_pull(call: S3Call) -> None:
            if not newer and call.method == "GET" and call.key.startswith(f"{PREFIX}/{first.id}/"):
                newer.append(writer.push(_files(tmp_path / "b", 64 * 1024), epoch=2, keep_last=1))

        enforcer.before = prune_under_the_pull
        proxy.fail_when = enforcer
        with CheckpointStore(url, budget=20, workers=2, endpoint_url=proxy.endpoint) as store:
            result = store.pull("latest", to=tmp_path / "restored")
    assert newer and [c.id for c in CheckpointStore(url).list()] == [newer[0].id], "the race did not happen"
    assert result.entry.id == newer[0].id
    restored = (tmp_path / "restored" / "model.weights.h5").read_bytes()
    assert restored == (tmp_path / "b" / "model.weights.h5").read_bytes()
    assert any(d[2] == "missing key without s3:ListBucket" for d in enforcer.denied)
