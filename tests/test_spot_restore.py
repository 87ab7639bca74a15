"""The VM scripts' restore step as it runs (issue 24 items 1 and 5): a new run starts fresh without logging
cloudckpt's "no cloudckpt run" error first; a latest checkpoint of resume state alone is restored and the log says
it holds no model. The script's restore() function runs alone, with the real CLI behind `$CLOUDCKPT_VENV/bin`."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from cloudckpt import CheckpointStore

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ["infra/aws/spot-user-data.sh", "infra/gcp/spot-startup-script.sh"]


def restore(script: str, tmp_path: Path, remote: str) -> subprocess.CompletedProcess:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True, exist_ok=True)
    cli = venv / "bin" / "cloudckpt"
    cli.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -m cloudckpt \"$@\"\n")
    cli.chmod(0o755)
    code = (f"set -euo pipefail\nlog() {{ printf 'cloudckpt-user-data: %s\\n' \"$*\" >&2; }}\n"
            f"source <(sed -n '/^restore() {{/,/^}}/p' {shlex.quote(str(ROOT / script))})\n"
            "restore\nprintf 'RESUME=%s\\n' \"$CLOUDCKPT_RESUME_DIR\"")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLOUDCKPT_")}
    env.update(CLOUDCKPT_VENV=str(venv), CLOUDCKPT_REMOTE=remote, CKPT_DIR=str(tmp_path / "ckpt"),
               PYTHONPATH=str(ROOT))
    return subprocess.run(["bash", "-c", code], env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_new_run_starts_fresh_without_an_error_line(script, tmp_path, local_url):
    proc = restore(script, tmp_path, local_url)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines() == [f"cloudckpt-user-data: no checkpoint at {local_url} yet: starting fresh"]
    assert proc.stdout == "RESUME=\n"


@pytest.mark.parametrize("script", SCRIPTS)
def test_resume_state_without_a_model_is_restored_and_said(script, tmp_path, local_url):
    src = tmp_path / "src" / "cloudckpt_state"
    src.mkdir(parents=True)
    (src / "state.json").write_text("{}")
    with CheckpointStore(local_url) as store:
        entry = store.push(src.parent, epoch=2, meta={"kind": "state"})
    proc = restore(script, tmp_path, local_url)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()  # cloudckpt's note and its "pulled" line, then the script's
    assert len(lines) == 3 and entry.id in lines[0] and "no model file" in lines[0], proc.stderr
    assert lines[1].startswith(f"pulled {entry.id}")
    assert lines[2].startswith("cloudckpt-user-data: restored the latest checkpoint")
    assert proc.stdout == f"RESUME={tmp_path / 'ckpt'}\n" and (tmp_path / "ckpt" / "cloudckpt_state").is_dir()
