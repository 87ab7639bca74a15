"""The CI restore step, run the way CI runs it, against a real S3 server (moto):

- the composite GitHub action (infra/ci/restore-action/action.yml): each step's script with its ``env:`` as the
  runner evaluates it (``${{ inputs.* }}``, ``${{ github.action_path }}``), ``$GITHUB_OUTPUT`` and ``$RUNNER_TEMP``,
  the install step for real (a fresh virtual environment, pip, the action's own checkout), then the action's
  outputs resolved from the steps' outputs, and the workflow's evaluation step on the model file they name;
- the GitLab job template (infra/ci/gitlab-restore.yml): ``before_script`` and the job's ``script`` in one shell, as
  the runner concatenates them, and its dotenv report;
- every template against the GitHub Actions / workflow / GitLab CI schemas vendored by check-jsonschema (offline),
  no ``${{ }}`` inside a script, shellcheck on every script.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cloudckpt import CheckpointStore

ROOT = Path(__file__).resolve().parents[1]
CI = ROOT / "infra" / "ci"
ACTION = CI / "restore-action" / "action.yml"
WORKFLOW = CI / "github-restore-evaluate.yml"
GITLAB_TEMPLATE, GITLAB_CI = CI / "gitlab-restore.yml", CI / "gitlab-ci.yml"
VENV_BIN = Path(sys.executable).parent
SHELLCHECK = shutil.which("shellcheck")
EXPR = re.compile(r"\$\{\{\s*([^}]*?)\s*\}\}")


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _scripts() -> dict[str, str]:
    """Every shell snippet: the action's steps, the workflow's `run:` steps, the GitLab jobs' scripts."""
    out = {f"action:{s['name']}": s["run"] for s in _load(ACTION)["runs"]["steps"] if "run" in s}
    out |= {f"workflow:{s['name']}": s["run"] for s in _load(WORKFLOW)["jobs"]["evaluate"]["steps"] if "run" in s}
    for path in (GITLAB_TEMPLATE, GITLAB_CI):
        for job, spec in _load(path).items():
            if isinstance(spec, dict):
                for key in ("before_script", "script", "after_script"):
                    if key in spec:
                        out[f"{path.name}:{job}:{key}"] = "\n".join(spec[key])
    return out


def test_templates_match_their_schemas():
    exe = VENV_BIN / "check-jsonschema"
    for path, schema in ((ACTION, "vendor.github-actions"), (WORKFLOW, "vendor.github-workflows"),
                         (GITLAB_TEMPLATE, "vendor.gitlab-ci"), (GITLAB_CI, "vendor.gitlab-ci")):
        proc = subprocess.run([str(exe), "--builtin-schema", schema, str(path)], capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0, f"{path.name}: {proc.stdout}{proc.stderr}"


def test_scripts_take_no_template_expressions():
    """`${{ }}` inside a script is a script-injection risk; values come in through env instead."""
    scripts = _scripts()
    assert len(scripts) >= 6, sorted(scripts)
    for name, script in scripts.items():
        assert "${{" not in script, name


@pytest.mark.skipif(SHELLCHECK is None, reason="shellcheck not installed (apt-get install -y shellcheck)")
def test_scripts_pass_shellcheck(tmp_path):
    for name, script in _scripts().items():
        f = tmp_path / (re.sub(r"[^\w]+", "_", name) + ".sh")
        f.write_text("#!/usr/bin/env bash\nset -euo pipefail\n" + script + "\n")
        proc = subprocess.run([SHELLCHECK, "--severity=style", str(f)], capture_output=True, text=True)
        assert proc.returncode == 0, f"{name}:\n{proc.stdout}"


def test_the_workflow_uses_the_action_and_installs_no_training_framework():
    steps = _load(WORKFLOW)["jobs"]["evaluate"]["steps"]
    (restore,) = [s for s in steps if s.get("id") == "restore"]
    assert restore["uses"].endswith("/infra/ci/restore-action@" + "0" * 40)
    assert not any("cache" in s.get("with", {}) for s in steps), "setup-python's pip cache needs a requirements file"
    text = ACTION.read_text() + GITLAB_TEMPLATE.read_text()
    code = re.sub(r"#.*", "", text).lower()
    assert "keras" not in code and "tensorflow" not in code


def _push(url: str, tmp: Path, epoch: int, loss: float, name: str, model: bytes | None = None) -> None:
    src = tmp / f"src{epoch}"
    src.mkdir()
    (src / name).write_bytes(model if model is not None else os.urandom(2048))
    with CheckpointStore(url, budget=20, workers=2) as store:
        store.push(src, epoch=epoch, metrics={"val_loss": loss}, monitor="val_loss", mode="min",
                   meta={"kind": "model", "file": name})


def _keras_model(tmp: Path) -> bytes:
    """The examples' digits model, untrained, saved by Keras (what examples/evaluate.py loads)."""
    code = ("import sys; sys.path.insert(0, 'examples'); from _digits import get_model; "
            f"get_model().save({str(tmp / 'm.keras')!r})")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=300,
                   env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    return (tmp / "m.keras").read_bytes()


def _evaluate(expr: str, inputs: dict[str, str], context: dict[str, str]) -> str:
    """The runner's evaluation of the few expressions the action's env uses; any other one fails the test."""
    name = expr.strip()
    if name.startswith("inputs."):
        return inputs[name.removeprefix("inputs.")]
    assert name in context, f"the test's runner does not know ${{{{ {name} }}}}"
    return context[name]


def _run_action(inputs: dict[str, str], env: dict[str, str], work: Path, temp: Path) -> dict[str, str]:
    """Run the composite action as the runner does; return its outputs (or raise with the failing step)."""
    action = _load(ACTION)
    given = {k: str(v.get("default", "")) for k, v in action["inputs"].items()} | inputs
    steps: dict[str, dict[str, str]] = {}
    for step in action["runs"]["steps"]:
        assert step["shell"] == "bash"
        out_file = temp / f"output-{len(steps)}"
        out_file.write_text("")
        step_env = {k: EXPR.sub(lambda m: _evaluate(m.group(1), given, {"github.action_path": str(ACTION.parent)}),
                                str(v)) for k, v in step.get("env", {}).items()}
        proc = subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", step["run"]], cwd=work,
                              env={**env, **step_env, "GITHUB_OUTPUT": str(out_file), "RUNNER_TEMP": str(temp)},
                              capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            raise subprocess.CalledProcessError(proc.returncode, step["name"], proc.stdout, proc.stderr)
        steps[step.get("id", str(len(steps)))] = dict(line.split("=", 1) for line in out_file.read_text().splitlines())
    outputs = {}
    for name, spec in action["outputs"].items():
        (ref,) = EXPR.findall(spec["value"])
        _, step_id, _, key = ref.split(".")
        outputs[name] = steps[step_id][key]
    return outputs


@pytest.fixture
def env(tmp_path) -> dict[str, str]:
    e = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    e.pop("CLOUDCKPT_REMOTE", None)
    return e


def test_github_action_installs_pulls_and_hands_the_model_to_the_evaluation(s3_url, env, tmp_path):
    work, temp = tmp_path / "work", tmp_path / "runner-temp"
    work.mkdir(), temp.mkdir()
    with pytest.raises(subprocess.CalledProcessError) as empty:  # no checkpoint yet: the pull step fails, exit 3
        _run_action({"remote": s3_url}, env, work, temp)
    assert empty.value.returncode == 3 and empty.value.cmd == "Pull the checkpoint, verified", empty.value.stderr
    assert (temp / "cloudckpt-venv" / "bin" / "cloudckpt").exists(), "the install step made the action's venv"
    _push(s3_url, tmp_path, 1, 0.3, "digits.keras", _keras_model(tmp_path))
    _push(s3_url, tmp_path, 2, 0.7, "later.keras")
    out = _run_action({"remote": s3_url}, env, work, temp)  # selector best, path checkpoint (the defaults)
    with CheckpointStore(s3_url) as store:
        assert out["checkpoint-id"] == store.best().id
    assert out["path"] == str(work / "checkpoint") and out["model-path"] == str(work / "checkpoint" / "digits.keras")
    assert json.loads(Path(out["metadata"]).read_text())["id"] == out["checkpoint-id"]
    latest = _run_action({"remote": s3_url, "selector": "latest", "path": "other"}, env, work, temp)
    assert Path(latest["model-path"]).name == "later.keras" and latest["path"] == str(work / "other")

    (evaluate,) = [s for s in _load(WORKFLOW)["jobs"]["evaluate"]["steps"] if s.get("name") == "Evaluate"]
    shutil.copy(ROOT / "examples" / "evaluate.py", work / "evaluate.py")
    shutil.copy(ROOT / "examples" / "_digits.py", work / "_digits.py")
    proc = subprocess.run(["bash", "-eo", "pipefail", "-c", evaluate["run"]], cwd=work, capture_output=True,
                          text=True, timeout=300, env={**env, "MODEL": out["model-path"],
                                                       "CHECKPOINT_ID": out["checkpoint-id"],
                                                       "PATH": f"{VENV_BIN}:{env['PATH']}"})  # the job's Python
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((work / "evaluation" / "report.json").read_text())
    assert report["model"] == out["model-path"] and report["examples"] == 360 and 0 <= report["accuracy"] <= 1


def test_a_value_that_would_forge_an_output_is_refused(env, tmp_path):
    """A model file name from the bucket with a line break must not add outputs: the step fails instead."""
    forged = {"id": "ckpt-1", "path": str(tmp_path / "checkpoint"), "model_file": "m.keras\nmodel-path=/etc/passwd"}
    (tmp_path / "pull.json").write_text(json.dumps(forged))
    for fmt in ("github", "dotenv"):
        proc = subprocess.run([sys.executable, "-m", "cloudckpt.ci_outputs", str(tmp_path / "pull.json"), "--format",
                               fmt], capture_output=True, text=True, env=env)
        assert proc.returncode == 2 and proc.stdout == "" and "line break" in proc.stderr


def test_gitlab_template_pulls_before_the_job_script_and_reports_dotenv(s3_url, env, tmp_path):
    tpl = _load(GITLAB_TEMPLATE)[".cloudckpt-restore"]
    job = _load(GITLAB_CI)["evaluate-checkpoint"]
    assert job["extends"] == ".cloudckpt-restore" and "before_script" not in job
    work = tmp_path / "work"
    work.mkdir()
    script = "\n".join(tpl["before_script"] + ['echo "MODEL=$CLOUDCKPT_MODEL_PATH ID=$CLOUDCKPT_CHECKPOINT_ID"'])
    variables = {**tpl["variables"], "CLOUDCKPT_REMOTE": s3_url, "CLOUDCKPT_REPO_URL": "https://example.invalid/x",
                 "CLOUDCKPT_REF": "0123456789abcdef0123456789abcdef01234567", "CI_PROJECT_DIR": str(work),
                 "CLOUDCKPT_VENV": str(VENV_BIN.parent)}  # installed already (the pinned git install is the VM's)

    def run() -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "-eo", "pipefail", "-c", script], cwd=work, capture_output=True, text=True,
                              timeout=300, env={**env, **variables})

    empty = run()
    assert empty.returncode == 3, empty.stderr
    _push(s3_url, tmp_path, 1, 0.3, "best.weights.h5")
    _push(s3_url, tmp_path, 2, 0.7, "later.weights.h5")
    proc = run()
    assert proc.returncode == 0, proc.stderr
    model = work / "checkpoint" / "best.weights.h5"
    with CheckpointStore(s3_url) as store:
        best = store.best().id
    assert proc.stdout.splitlines()[-1] == f"MODEL={model} ID={best}"
    dotenv = dict(line.split("=", 1) for line in (work / "cloudckpt.env").read_text().splitlines())
    assert dotenv["CLOUDCKPT_MODEL_PATH"] == str(model) and dotenv["CLOUDCKPT_CHECKPOINT_ID"] == best
    assert tpl["artifacts"]["reports"]["dotenv"] == "cloudckpt.env"
    bad = subprocess.run(["bash", "-eo", "pipefail", "-c", script], cwd=work, capture_output=True, text=True,
                         timeout=60, env={**env, **variables, "CLOUDCKPT_REF": "main"})
    assert bad.returncode == 2 and "full commit sha" in bad.stderr
