"""terraform/: every file parses (python-hcl2, no terraform binary), the modules keep their security promises, every
variable and output is documented, and checkov reports no failed check (skips only with an inline reason)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from infra_support import tf

MODULES = tf.TERRAFORM / "modules"
EXAMPLES = tf.TERRAFORM / "examples"
CHECKOV_VERSION = "3.3.30"
CHECKOV_VENV = Path(os.environ.get("CLOUDCKPT_CHECKOV_VENV", tf.ROOT / ".venv-checkov"))


@pytest.mark.parametrize("path", tf.tf_files(), ids=lambda p: str(p.relative_to(tf.TERRAFORM)))
def test_tf_file_parses(path):
    doc = tf.load(path)
    assert doc, f"{path} parsed to nothing"


def test_layout_covers_both_clouds():
    assert {p.name for p in MODULES.iterdir()} == {"aws-bucket", "aws-access", "gcp-bucket", "gcp-access",
                                                   "azure-storage", "azure-access"}
    assert {p.name for p in EXAMPLES.iterdir()} == {"aws", "gcp"}
    for module in [*MODULES.iterdir(), *EXAMPLES.iterdir()]:
        providers = [t["required_providers"] for t in tf.load_dir(module)["terraform"]]
        assert providers and all(p for p in providers), f"{module} does not pin its providers"
        assert (module / "variables.tf").exists() and (module / "outputs.tf").exists()


@pytest.mark.parametrize("directory", sorted([*MODULES.iterdir(), *EXAMPLES.iterdir()]), ids=lambda p: p.name)
def test_variables_and_outputs_are_documented(directory):
    module = tf.load_dir(directory)
    variables, outputs = tf.variables(module), tf.outputs(module)
    assert variables and outputs
    for name, body in variables.items():
        assert len(body.get("description", "")) > 15, f"variable {name} in {directory.name} has no description"
        assert "type" in body, f"variable {name} in {directory.name} has no type"
    for name, body in outputs.items():
        assert len(body.get("description", "")) > 10, f"output {name} in {directory.name} has no description"
    used = set(re.findall(r"var\.([a-z0-9_]+)", " ".join(p.read_text() for p in directory.glob("*.tf"))))
    assert used <= set(variables), f"undeclared variables {used - set(variables)}"
    assert set(variables) <= used, f"declared but unused variables {set(variables) - used}"


def _one(module, type_):
    (body,) = tf.blocks(module, "resource", type_).values()
    return body


def test_aws_bucket_is_secure_by_default():
    m = tf.load_dir(MODULES / "aws-bucket")
    assert _one(m, "aws_s3_bucket_versioning")["versioning_configuration"][0]["status"] == "Enabled"
    pab = _one(m, "aws_s3_bucket_public_access_block")
    assert all(pab[k] is True for k in ("block_public_acls", "block_public_policy", "ignore_public_acls",
                                        "restrict_public_buckets"))
    assert _one(m, "aws_s3_bucket_ownership_controls")["rule"][0]["object_ownership"] == "BucketOwnerEnforced"
    sse_rule = _one(m, "aws_s3_bucket_server_side_encryption_configuration")["rule"][0]
    sse = sse_rule["apply_server_side_encryption_by_default"][0]
    assert sse["sse_algorithm"] == '${var.kms_key_arn == null ? "AES256" : "aws:kms"}'
    assert tf.variables(m)["kms_key_arn"]["default"] is None  # SSE-S3 unless a key is given
    # TLS only: deny every s3 action to everyone when aws:SecureTransport is false, on the bucket and its objects
    (deny,) = tf.blocks(m, "data", "aws_iam_policy_document")["tls_only"]["statement"]
    assert deny["effect"] == "Deny" and deny["actions"] == ["s3:*"]
    assert deny["principals"][0]["identifiers"] == ["*"]
    assert deny["condition"][0] == {"test": "Bool", "variable": "aws:SecureTransport", "values": ["false"]}
    assert set(deny["resources"]) == {"${aws_s3_bucket.this.arn}", "${aws_s3_bucket.this.arn}/*"}
    rules = {r["id"]: r for r in _one(m, "aws_s3_bucket_lifecycle_configuration")["rule"]}
    abort = rules["abort-incomplete-multipart-uploads"]
    days = abort["abort_incomplete_multipart_upload"][0]["days_after_initiation"]
    assert days == "${var.abort_incomplete_multipart_upload_days}"
    assert tf.variables(m)["abort_incomplete_multipart_upload_days"]["default"] == 1
    noncurrent = rules["expire-noncurrent-versions"]["noncurrent_version_expiration"][0]
    assert noncurrent["noncurrent_days"] == "${var.noncurrent_version_expiration_days}"
    assert all(r["status"] == "Enabled" and r["filter"] == [{}] for r in rules.values())


def test_gcp_bucket_is_secure_by_default():
    m = tf.load_dir(MODULES / "gcp-bucket")
    b = _one(m, "google_storage_bucket")
    assert b["uniform_bucket_level_access"] is True
    assert b["public_access_prevention"] == "enforced"
    assert b["versioning"][0]["enabled"] == "${var.versioning}" and tf.variables(m)["versioning"]["default"] is True
    assert b["soft_delete_policy"][0]["retention_duration_seconds"] == "${var.soft_delete_retention_seconds}"
    assert tf.variables(m)["soft_delete_retention_seconds"]["default"] == 604800
    actions = {r["action"][0]["type"]: r["condition"][0] for r in b["lifecycle_rule"]}
    assert actions["Delete"] == {"with_state": "ARCHIVED",
                                 "days_since_noncurrent_time": "${var.noncurrent_version_expiration_days}"}
    assert actions["AbortIncompleteMultipartUpload"] == {"age": "${var.abort_incomplete_multipart_upload_days}"}


# --- the GCS IAM conditions, evaluated on requests inside and outside the prefix ---------------------------------

@pytest.mark.parametrize("name", ["training_condition", "restore_condition"])
def test_gcs_condition_admits_only_the_run_prefix(name):
    admits = tf.gcs_condition(name, "ckpt-bkt", "runs/r1")
    obj, bkt = "storage.googleapis.com/Object", "storage.googleapis.com/Bucket"
    assert admits(obj, "projects/_/buckets/ckpt-bkt/objects/runs/r1/index.json")
    assert admits(obj, "projects/_/buckets/ckpt-bkt/objects/runs/r1/ckpt-1/model.weights.h5")
    assert admits(bkt, "projects/_/buckets/ckpt-bkt", "runs/r1/")
    assert not admits(obj, "projects/_/buckets/ckpt-bkt/objects/runs/r2/index.json")
    assert not admits(obj, "projects/_/buckets/ckpt-bkt/objects/runs/r1-other/index.json")
    assert not admits(obj, "projects/_/buckets/other/objects/runs/r1/index.json")
    assert not admits(bkt, "projects/_/buckets/ckpt-bkt", "runs/")
    assert not admits(bkt, "projects/_/buckets/ckpt-bkt")  # bucket metadata, unscoped listing


def test_gcp_service_accounts_get_object_roles_under_conditions():
    m = tf.load_dir(MODULES / "gcp-access")
    members = tf.blocks(m, "resource", "google_storage_bucket_iam_member")
    assert members["training"]["role"] == "roles/storage.objectAdmin"
    assert members["restore"]["role"] == "roles/storage.objectViewer"
    assert members["training"]["condition"][0]["expression"] == "${local.training_condition}"
    assert members["restore"]["condition"][0]["expression"] == "${local.restore_condition}"
    assert not tf.blocks(m, "resource", "google_service_account_key"), "no long-lived keys"


def test_azure_storage_is_secure_by_default():
    m = tf.load_dir(MODULES / "azure-storage")
    account = _one(m, "azurerm_storage_account")
    assert account["shared_access_key_enabled"] is False and account["default_to_oauth_authentication"] is True
    assert account["min_tls_version"] == "TLS1_2" and account["https_traffic_only_enabled"] is True
    assert account["allow_nested_items_to_be_public"] is False
    assert account["network_rules"][0]["default_action"] == "Deny"
    blob = account["blob_properties"][0]
    assert blob["versioning_enabled"] is True
    assert blob["delete_retention_policy"][0]["days"] == "${var.soft_delete_retention_days}"
    assert _one(m, "azurerm_storage_container")["container_access_type"] == "private"


def test_azure_identities_get_blob_data_roles_on_the_container_only():
    m = tf.load_dir(MODULES / "azure-access")
    roles = tf.blocks(m, "resource", "azurerm_role_assignment")
    assert roles["training"]["role_definition_name"] == "Storage Blob Data Contributor"
    assert roles["restore"]["role_definition_name"] == "Storage Blob Data Reader"
    assert {r["scope"] for r in roles.values()} == {"${var.container_id}"}, "scoped to the container, nothing wider"
    assert set(roles) == {"training", "restore"}
    assert not tf.blocks(m, "resource", "azurerm_storage_account_sas"), "no long-lived keys"


# --- checkov ---------------------------------------------------------------------------------------------------

def _checkov() -> Path:
    """checkov lives in its own venv: it pins boto3/botocore versions that conflict with the project's."""
    exe = CHECKOV_VENV / "bin" / "checkov"
    if not exe.exists():
        subprocess.run([sys.executable, "-m", "venv", str(CHECKOV_VENV)], check=True)
        subprocess.run([str(CHECKOV_VENV / "bin" / "pip"), "install", "-q", f"checkov=={CHECKOV_VERSION}"],
                       check=True, timeout=900)
    return exe


@pytest.fixture(scope="module")
def checkov_reports(tmp_path_factory):
    exe = _checkov()
    env = {**os.environ, "BC_SKIP_MAPPING": "TRUE", "CHECKOV_RUN_SCA_PACKAGE_SCAN_V2": "false"}
    # checkov finds CI pipelines only where the CI systems look for them: lay the templates out that way
    ci = tmp_path_factory.mktemp("ci-layout")
    (ci / ".github" / "workflows").mkdir(parents=True)
    shutil.copy(tf.ROOT / "infra" / "ci" / "github-restore-evaluate.yml", ci / ".github" / "workflows")
    shutil.copy(tf.ROOT / "infra" / "ci" / "gitlab-ci.yml", ci / ".gitlab-ci.yml")
    out = {}
    for target, directory in (("terraform", tf.ROOT / "terraform"), ("infra", tf.ROOT / "infra"), ("ci", ci)):
        proc = subprocess.run([str(exe), "-d", str(directory), "--skip-download", "-o", "json"],
                              capture_output=True, text=True, env=env, timeout=600, cwd=tf.ROOT)
        assert proc.returncode in (0, 1), f"checkov crashed on {target}: {proc.stderr[-2000:]}"
        data = json.loads(proc.stdout)
        out[target] = data if isinstance(data, list) else [data]
    return out


@pytest.mark.parametrize("target", ["terraform", "infra", "ci"])
def test_checkov_passes_with_reasoned_skips(checkov_reports, target):
    reports = checkov_reports[target]
    frameworks = {r["check_type"] for r in reports}
    expected = {"terraform": {"terraform"}, "infra": {"kubernetes", "dockerfile"},
                "ci": {"github_actions", "gitlab_ci"}}[target]
    assert expected <= frameworks, f"checkov did not scan {expected - frameworks} in {target}/"
    for r in reports:
        s = r["summary"]
        failed = [(c["check_id"], c["resource"], c["file_path"]) for c in r["results"]["failed_checks"]]
        assert s["failed"] == 0 and not failed, f"{r['check_type']}: {failed}"
        assert s["parsing_errors"] == 0
        assert s["passed"] > 0
        for c in r["results"]["skipped_checks"]:
            reason = (c.get("check_result") or {}).get("suppress_comment") or ""
            assert len(reason) > 20, f"skip of {c['check_id']} on {c['resource']} carries no reason"
        print(f"\n{target}/{r['check_type']}: {s['passed']} passed, {s['failed']} failed, {s['skipped']} skipped: "
              + "; ".join(f"{c['check_id']} ({c['check_result']['suppress_comment']})"
                          for c in r["results"]["skipped_checks"]))


@pytest.mark.skipif(shutil.which("terraform") is None, reason="terraform binary not installed (optional check)")
def test_terraform_fmt_is_clean():
    proc = subprocess.run(["terraform", "fmt", "-check", "-recursive", "-diff", str(tf.TERRAFORM)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout


@pytest.mark.parametrize("directory", sorted(MODULES.iterdir()), ids=lambda p: p.name)
def test_readme_documents_every_input_and_output(directory):
    readme = (tf.TERRAFORM / "README.md").read_text()
    section = readme.split(f"### `modules/{directory.name}`", 1)[1].split("\n### ", 1)[0]
    module = tf.load_dir(directory)
    for name in [*tf.variables(module), *tf.outputs(module)]:
        assert f"| `{name}` |" in section, f"terraform/README.md does not document {directory.name}.{name}"
