"""infra/: the Kubernetes Jobs, spot VM scripts, Dockerfile and CI workflows parse, lint, agree with the library's
exit codes and deadlines, and — run for real against the S3/GCS servers — restore the latest checkpoint (or start
fresh on exit code 3) before starting training, and restore the best one in the CI step."""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from infra_support.tf import ROOT
from packaging.requirements import Requirement

from cloudckpt import AccessError, CheckpointStore, IntegrityError, StaleWriterError

INFRA = ROOT / "infra"
VENV_BIN = Path(sys.executable).parent
SHELLCHECK = shutil.which("shellcheck")
needs_shellcheck = pytest.mark.skipif(
    SHELLCHECK is None, reason="shellcheck not installed (Debian package `shellcheck`: apt-get install -y shellcheck)")
SCRIPTS = sorted(INFRA.rglob("*.sh"))
FATAL = {2, IntegrityError.exit_code, AccessError.exit_code, StaleWriterError.exit_code}


def _callback_constants() -> dict[str, object]:
    """EXIT_PREEMPTED and the default preemption_deadline, read from the callback's source (no TensorFlow import)."""
    tree = ast.parse((ROOT / "cloudckpt" / "keras" / "callback.py").read_text())
    out: dict[str, object] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["EXIT_PREEMPTED"]:
            out["EXIT_PREEMPTED"] = ast.literal_eval(node.value)
        if isinstance(node, ast.FunctionDef) and node.name == "__init__":
            for arg, default in zip(node.args.kwonlyargs, node.args.kw_defaults):
                if arg.arg == "preemption_deadline":
                    out["preemption_deadline"] = ast.literal_eval(default)
    assert set(out) == {"EXIT_PREEMPTED", "preemption_deadline"}
    return out


# --- parsing and linting -----------------------------------------------------------------------------------------

def test_every_yaml_and_json_file_parses():
    files = [p for d in (INFRA, ROOT / "terraform") for p in d.rglob("*") if p.suffix in (".yml", ".yaml", ".json")]
    assert len(files) >= 4
    for p in files:
        docs = [json.loads(p.read_text())] if p.suffix == ".json" else list(yaml.safe_load_all(p.read_text()))
        assert docs and all(d is not None for d in docs), f"{p} is empty"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(INFRA)))
def test_shell_script_syntax(script):
    assert script.read_text().startswith("#!/usr/bin/env bash\n")
    assert os.access(script, os.X_OK), f"{script} is not executable"
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@needs_shellcheck
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(INFRA)))
def test_shellcheck(script):
    proc = subprocess.run([SHELLCHECK, "--severity=style", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


# --- Kubernetes ----------------------------------------------------------------------------------------------------

def _docs(name: str) -> dict[str, dict]:
    return {d["kind"]: d for d in yaml.safe_load_all((INFRA / "kubernetes" / name).read_text())}


@pytest.mark.parametrize("name,url,selector,sa_annotation", [
    ("train-job-eks.yaml", "s3://", {"eks.amazonaws.com/capacityType": "SPOT"}, "eks.amazonaws.com/role-arn"),
    ("train-job-gke.yaml", "gs://", {"cloud.google.com/gke-spot": "true"}, "iam.gke.io/gcp-service-account"),
    ("train-job-aks.yaml", "az://", {"kubernetes.azure.com/scalesetpriority": "spot"},
     "azure.workload.identity/client-id"),
])
def test_kubernetes_job_for_spot_gpus(name, url, selector, sa_annotation):
    consts = _callback_constants()
    docs = _docs(name)
    assert set(docs) == {"ServiceAccount", "Job", "NetworkPolicy"}
    assert sa_annotation in docs["ServiceAccount"]["metadata"]["annotations"]
    job = docs["Job"]["spec"]
    pod = job["template"]["spec"]
    assert pod["serviceAccountName"] == docs["ServiceAccount"]["metadata"]["name"]
    assert selector.items() <= pod["nodeSelector"].items()
    assert any(t["key"] == "nvidia.com/gpu" and t["effect"] == "NoSchedule" for t in pod["tolerations"])
    if url == "gs://":
        assert {"key": "cloud.google.com/gke-spot", "operator": "Equal", "value": "true",
                "effect": "NoSchedule"} in pod["tolerations"]
    if url == "az://":  # AKS taints Spot pools; workload identity is switched on per pod
        assert {"key": "kubernetes.azure.com/scalesetpriority", "operator": "Equal", "value": "spot",
                "effect": "NoSchedule"} in pod["tolerations"]
        assert job["template"]["metadata"]["labels"]["azure.workload.identity/use"] == "true"
    # the grace period covers the callback's preemption deadline with a margin
    assert pod["terminationGracePeriodSeconds"] >= consts["preemption_deadline"] + 10
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["CLOUDCKPT_REMOTE"].startswith(url)
    assert "command" not in container, "the image's entrypoint must run (it restores the checkpoint)"
    # restart behaviour: preemptions don't count against backoffLimit, cloudckpt's fatal exit codes fail at once
    assert pod["restartPolicy"] == "Never" and job["backoffLimit"] >= 3
    rules = job["podFailurePolicy"]["rules"]
    assert {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]} in rules
    ignored = [r["onExitCodes"] for r in rules if r["action"] == "Ignore" and "onExitCodes" in r]
    assert ignored == [{"containerName": "train", "operator": "In", "values": [consts["EXIT_PREEMPTED"]]}]
    assert env["CLOUDCKPT_PREEMPT_EXIT_CODE"] == str(consts["EXIT_PREEMPTED"])
    (fail,) = [r["onExitCodes"] for r in rules if r["action"] == "FailJob"]
    assert set(fail["values"]) == FATAL


@pytest.mark.parametrize("version", ["1.29.0", "1.31.0", "latest"])
def test_kubernetes_manifests_match_the_api_schema(version):
    """Strict OpenAPI validation (unknown fields rejected) for every supported Kubernetes version (1.29+)."""
    import kubernetes_validate

    version = kubernetes_validate.latest_version() if version == "latest" else version
    kinds = []
    for path in sorted((INFRA / "kubernetes").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            kubernetes_validate.validate(doc, version, strict=True)  # raises ValidationError
            kinds.append(doc["kind"])
    assert kinds.count("Job") == 3, kinds  # the EKS, GKE and AKS Jobs were all validated


def test_dockerfile_passes_hadolint():
    proc = subprocess.run([str(VENV_BIN / "hadolint"), str(INFRA / "docker" / "Dockerfile")], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("script", ["aws/spot-user-data.sh", "gcp/spot-startup-script.sh"])
def test_vm_scripts_default_to_the_callbacks_exit_code(script):
    text = (INFRA / script).read_text()
    code = _callback_constants()["EXIT_PREEMPTED"]
    assert f"CLOUDCKPT_PREEMPT_EXIT_CODE=${{CLOUDCKPT_PREEMPT_EXIT_CODE:-{code}}}" in text
    assert '--property="RestartPreventExitStatus=2 4 5 6"' in text


def test_dockerfile_installs_cloudckpt_and_restores_first():
    lines = [ln.strip() for ln in (INFRA / "docker" / "Dockerfile").read_text().splitlines()]
    assert lines[0] == "# syntax=docker/dockerfile:1"
    assert any(ln.startswith("FROM python:${PYTHON_VERSION}-slim") for ln in lines)
    assert any('pip install --no-cache-dir ".[s3,gcs]"' in ln for ln in lines)
    assert "COPY --chmod=0755 infra/docker/entrypoint.sh /usr/local/bin/cloudckpt-entrypoint" in lines
    assert 'ENTRYPOINT ["/usr/local/bin/cloudckpt-entrypoint"]' in lines
    assert "USER 10001" in lines
    copied = [ln.split()[1] for ln in lines if ln.startswith("COPY") and "--from" not in ln]
    sources = {s for ln in lines if ln.startswith("COPY") and "--from" not in ln for s in ln.split()[1:-1]
               if not s.startswith("--")}
    allowed = {ln[1:].rstrip("/") for ln in (INFRA / "docker" / "Dockerfile.dockerignore").read_text().splitlines()
               if ln.startswith("!")}
    assert copied and sources <= allowed, f"COPY sources excluded by the dockerignore: {sources - allowed}"
    for src in sources:
        assert (ROOT / src).exists() or src == "README.md", src


# --- cloudckpt is never installed by its bare name (no PyPI release: dependency confusion) --------------------------

def _pip_installs(path: Path) -> list[list[str]]:
    """The arguments of every ``pip install`` in a template (Dockerfile continuation lines joined)."""
    text = path.read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        _, found, rest = line.partition("pip install")
        if found:
            try:
                out.append(shlex.split(rest, comments=True))
            except ValueError:
                out.append(rest.split())
    return out


def test_no_template_installs_cloudckpt_by_bare_name():
    files = [p for d in (INFRA, ROOT / "terraform") for p in d.rglob("*") if p.is_file()]
    installs = {p: _pip_installs(p) for p in files}
    assert sum(len(v) for v in installs.values()) >= 5, "the scan found no pip installs"
    for path, commands in installs.items():
        for args in commands:
            for arg in args:
                if arg.startswith("cloudckpt"):
                    req = Requirement(re.sub(r"\$\{?\w+\}?", "x", arg))  # shell variables: any value
                    assert req.url and req.url.startswith("git+"), f"{path}: installs {arg!r} by name"
        for default in re.findall(r"SPEC:-([^}]*)\}", path.read_text()):  # ${CLOUDCKPT_SPEC:-...}
            assert not default.startswith("cloudckpt") or " @ " in default, f"{path}: default spec {default!r}"


SHA = "0123456789abcdef0123456789abcdef01234567"


def _spec(script: str, **env: str) -> subprocess.CompletedProcess:
    """Run a VM script's cloudckpt_spec function alone (nothing else of the script runs)."""
    code = (f"set -euo pipefail\nlog() {{ printf '%s\\n' \"$*\" >&2; }}\n"
            f"source <(sed -n '/^cloudckpt_spec() {{/,/^}}/p' {shlex.quote(str(INFRA / script))})\ncloudckpt_spec")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CLOUDCKPT_")}
    return subprocess.run(["bash", "-c", code], env={**clean, **env}, capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("script,extras", [("aws/spot-user-data.sh", "s3,keras"),
                                           ("gcp/spot-startup-script.sh", "gcs,keras")])
def test_vm_scripts_install_cloudckpt_from_a_pinned_commit(script, extras):
    url = "https://git.example.com/ml/cloudckpt.git"
    ok = _spec(script, CLOUDCKPT_REPO_URL=url, CLOUDCKPT_REF=SHA, CLOUDCKPT_EXTRAS=extras)
    assert ok.returncode == 0, ok.stderr
    req = Requirement(ok.stdout)
    assert req.name == "cloudckpt" and req.extras == set(extras.split(",")) and req.url == f"git+{url}@{SHA}"
    for bad in (dict(CLOUDCKPT_REPO_URL=url, CLOUDCKPT_REF="main"), dict(CLOUDCKPT_REF=SHA),
                dict(CLOUDCKPT_SPEC="cloudckpt[s3,keras]"), dict(CLOUDCKPT_SPEC="cloudckpt>=0.1"),
                dict(CLOUDCKPT_SPEC=" cloudckpt ")):
        proc = _spec(script, CLOUDCKPT_EXTRAS=extras, **bad)
        assert proc.returncode == 2 and not proc.stdout, bad
    wheel = "cloudckpt[s3] @ file:///opt/wheels/cloudckpt-0.1.0-py3-none-any.whl"
    assert _spec(script, CLOUDCKPT_SPEC=wheel).stdout == wheel


# --- run the scripts for real against the storage servers ---------------------------------------------------------

TRAIN = ("python -c 'import json, os, sys; d = os.environ[\"CLOUDCKPT_RESUME_DIR\"]; "
         "json.dump({\"resume\": d, \"files\": sorted(os.listdir(d)) if d else [], \"cwd\": os.getcwd(), "
         "\"remote\": os.environ[\"CLOUDCKPT_REMOTE\"]}, open(os.environ[\"TRAIN_REPORT\"], \"w\"))'")


def _env(tmp: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}", "TRAIN_REPORT": str(tmp / "report.json")}
    env.pop("CLOUDCKPT_REMOTE", None)
    env.update(extra)
    return env


def _push(url: str, tmp: Path, epoch: int, loss: float, name: str) -> None:
    src = tmp / f"src{epoch}"
    src.mkdir()
    (src / name).write_bytes(os.urandom(2048))
    with CheckpointStore(url, budget=20, workers=2) as store:
        store.push(src, epoch=epoch, metrics={"val_loss": loss}, monitor="val_loss", mode="min")


def _run(cmd: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=180)


def _launchers(tmp: Path) -> dict[str, tuple[list[str], dict[str, str]]]:
    vm = dict(CLOUDCKPT_INSTALL="0", CLOUDCKPT_LAUNCH="exec", CLOUDCKPT_METADATA="0", CLOUDCKPT_HOME=str(tmp / "home"),
              CLOUDCKPT_VENV=str(VENV_BIN.parent), TRAIN_COMMAND=TRAIN, TRAIN_PACKAGE="")
    return {
        "entrypoint": ([str(INFRA / "docker" / "entrypoint.sh"), "bash", "-c", TRAIN],
                       dict(CLOUDCKPT_CHECKPOINT_DIR=str(tmp / "ckpt"))),
        "aws-user-data": ([str(INFRA / "aws" / "spot-user-data.sh")], vm),
        "gce-startup-script": ([str(INFRA / "gcp" / "spot-startup-script.sh")], vm),
    }


@pytest.mark.parametrize("launcher,store", [("entrypoint", "s3"), ("entrypoint", "gcs"), ("aws-user-data", "s3"),
                                            ("gce-startup-script", "gcs")])
def test_launcher_starts_fresh_then_resumes(launcher, store, request, tmp_path):
    url = request.getfixturevalue(f"{store}_url")
    cmd, extra = _launchers(tmp_path)[launcher]
    env = _env(tmp_path, CLOUDCKPT_REMOTE=url, **extra)
    report = tmp_path / "report.json"

    first = _run(cmd, env, tmp_path)  # empty run: `cloudckpt pull latest` exits 3 → training starts fresh
    assert first.returncode == 0, first.stderr
    assert "starting fresh" in first.stderr
    assert json.loads(report.read_text())["resume"] == "" and json.loads(report.read_text())["remote"] == url

    _push(url, tmp_path, 1, 0.5, "model-e1.weights.h5")
    _push(url, tmp_path, 2, 0.9, "model-e2.weights.h5")  # latest, not best
    report.unlink()
    second = _run(cmd, env, tmp_path)
    assert second.returncode == 0, second.stderr
    got = json.loads(report.read_text())
    assert got["resume"] and Path(got["resume"]).is_dir()
    assert "model-e2.weights.h5" in got["files"] and "model-e1.weights.h5" not in got["files"]


@pytest.mark.parametrize("launcher", ["entrypoint", "aws-user-data"])
def test_launcher_stops_on_a_fatal_pull_error(launcher, s3_server, tmp_path):
    cmd, extra = _launchers(tmp_path)[launcher]
    env = _env(tmp_path, CLOUDCKPT_REMOTE="s3://no-such-bucket-here/runs/r1", **extra)
    proc = _run(cmd, env, tmp_path)
    assert proc.returncode == AccessError.exit_code, proc.stderr  # 5: not retried, training never started
    assert not (tmp_path / "report.json").exists()


SIGTERM_TRAIN = ("python -c 'import os, pathlib, signal, sys, time\n"
                 "def stop(*_):\n"
                 "    pathlib.Path(os.environ[\"TRAIN_REPORT\"]).write_text(\"SIGTERM\")\n"
                 "    sys.exit(int(os.environ.get(\"CLOUDCKPT_PREEMPT_EXIT_CODE\", \"143\")))\n"
                 "signal.signal(signal.SIGTERM, stop)\n"
                 "pathlib.Path(os.environ[\"TRAIN_REPORT\"] + \".ready\").write_text(\"1\")\n"
                 "time.sleep(120)'")


@pytest.mark.parametrize("launcher", ["entrypoint", "aws-user-data", "gce-startup-script"])
def test_launcher_hands_sigterm_to_training(launcher, s3_url, tmp_path):
    """The launcher execs the training command, so the preemption SIGTERM reaches training (not a waiting shell)
    and the preemption exit code comes back to the orchestrator."""
    import signal
    import time

    cmd, extra = _launchers(tmp_path)[launcher]
    if launcher == "entrypoint":
        cmd = cmd[:-1] + [SIGTERM_TRAIN]
    else:
        extra = {**extra, "TRAIN_COMMAND": SIGTERM_TRAIN}
    env = _env(tmp_path, CLOUDCKPT_REMOTE=s3_url, **extra)
    report = tmp_path / "report.json"
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group, so a failed test can end all of it
    try:
        deadline = time.monotonic() + 120
        while not Path(str(report) + ".ready").exists():
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "training never started"
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)  # what the kubelet / systemd sends to the container's / unit's process
        _, err = proc.communicate(timeout=30)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # leftovers of this launcher only (e.g. a child that missed SIGTERM)
        except ProcessLookupError:
            pass
        proc.wait()
    assert report.read_text() == "SIGTERM", err
    assert proc.returncode == _callback_constants()["EXIT_PREEMPTED"]
