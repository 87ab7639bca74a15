"""The cloudckpt CLI as a script would use it: real subprocesses, exit codes, one-line errors, --json output."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

CLI = [sys.executable, "-m", "cloudckpt"]


def run(*args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    full_env.pop("CLOUDCKPT_DEBUG", None)
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=120, env=full_env, cwd=cwd)


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("cloudckpt: "), lines[0]
    assert "Traceback" not in proc.stderr
    return lines[0]


@pytest.fixture
def ckpt(tmp_path) -> Path:
    d = tmp_path / "ckpt"
    (d / "opt").mkdir(parents=True)
    (d / "model.weights.h5").write_bytes(os.urandom(5000))
    (d / "opt" / "state.json").write_text('{"step": 7}')
    return d


def push(url: str, path: Path, *extra: str) -> dict:
    proc = run("push", str(path), "--to", url, "--json", *extra)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.mark.parametrize("kind", ["local", "s3", "gcs", "az"])
def test_push_ls_show_pull_json_on_each_store(kind, request, ckpt, tmp_path):
    url = request.getfixturevalue(f"{kind}_url")
    first = push(url, ckpt, "--epoch", "1", "--step", "70", "--metric", "val_loss=0.4", "--monitor", "val_loss")
    second = push(url, ckpt, "--epoch", "2", "--step", "140", "--metric", "val_loss=0.6")
    proc = run("ls", url, "--json")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert [r["id"] for r in rows] == [first["id"], second["id"]]
    for r in rows:
        assert {"id", "epoch", "step", "created", "metrics", "size", "tags"} <= set(r)
    assert rows[0]["tags"] == ["best"] and rows[1]["tags"] == ["latest"]
    assert rows[0]["size"] == sum(p.stat().st_size for p in ckpt.rglob("*") if p.is_file())
    shown = json.loads(run("show", "best", "--from", url, "--json").stdout)
    assert shown["id"] == first["id"] and {f["path"] for f in shown["files"]} == {"model.weights.h5", "opt/state.json"}
    proc = run("pull", "best", "--from", url, "--to", str(tmp_path / "out"), "--json")
    assert proc.returncode == 0, proc.stderr
    pulled = json.loads(proc.stdout)
    assert pulled["id"] == first["id"] and Path(pulled["path"]) == tmp_path / "out"
    assert (tmp_path / "out" / "model.weights.h5").read_bytes() == (ckpt / "model.weights.h5").read_bytes()
    assert sorted(pulled["local_files"]) == sorted(str(tmp_path / "out" / p)
                                                   for p in ("model.weights.h5", "opt/state.json"))


def test_remote_from_environment_and_default_target(ckpt, tmp_path, local_url):
    push(local_url, ckpt, "--epoch", "5")
    proc = run("pull", "latest", env={"CLOUDCKPT_REMOTE": local_url}, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "checkpoint" / "opt" / "state.json").read_text() == '{"step": 7}'
    assert "pulled" in proc.stdout


def test_exit_code_2_usage(tmp_path):
    proc = run("pull", env={"CLOUDCKPT_REMOTE": str(tmp_path)})
    assert proc.returncode == 2
    assert "usage" in one_line_error(proc)
    proc = run("push", str(tmp_path), "--to", str(tmp_path / "s"), "--metric", "loss")
    assert proc.returncode == 2
    proc = run("ls", env={"CLOUDCKPT_REMOTE": ""})
    assert proc.returncode == 2 and "CLOUDCKPT_REMOTE" in one_line_error(proc)


def test_exit_code_3_nothing_matches(ckpt, tmp_path, local_url):
    proc = run("ls", str(tmp_path / "no-run-here"))
    assert proc.returncode == 3 and "no cloudckpt run" in one_line_error(proc)
    push(local_url, ckpt, "--epoch", "1")
    proc = run("pull", "42", "--from", local_url, "--to", str(tmp_path / "x"))
    assert proc.returncode == 3 and "epoch 42" in one_line_error(proc)
    proc = run("pull", "best", "--from", local_url, "--to", str(tmp_path / "x"))
    assert proc.returncode == 3  # no monitor: no best
    assert not (tmp_path / "x").exists()


def test_exit_code_4_integrity(ckpt, tmp_path, local_url):
    entry = push(local_url, ckpt, "--epoch", "1")
    victim = Path(local_url) / entry["id"] / "model.weights.h5"
    victim.write_bytes(b"\0" * victim.stat().st_size)
    proc = run("pull", "latest", "--from", local_url, "--to", str(tmp_path / "x"))
    assert proc.returncode == 4 and "checksum mismatch" in one_line_error(proc)
    assert not (tmp_path / "x").exists()
    proc = run("verify", local_url, "--all", "--json")
    assert proc.returncode == 4
    assert json.loads(proc.stdout) == [{"id": entry["id"], "ok": False, "error": json.loads(proc.stdout)[0]["error"]}]
    (Path(local_url) / "index.json").write_text('{"schema": "cloudckpt/index", "schema_version": 99}')
    proc = run("ls", local_url)
    assert proc.returncode == 4 and "schema_version 99" in one_line_error(proc)


def test_exit_code_5_access_and_configuration(ckpt, tmp_path, s3_server):
    proc = run("ls", "s3://no-such-bucket-here/run")
    assert proc.returncode == 5 and "no such bucket" in one_line_error(proc).lower()
    env = {"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": "", "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
           "AWS_CONFIG_FILE": str(tmp_path / "none"), "AWS_EC2_METADATA_DISABLED": "true"}
    proc = run("ls", "s3://some-bucket/run", env=env)
    assert proc.returncode == 5 and "credentials" in one_line_error(proc)
    proc = run("-o", "bogus=1", "ls", "s3://some-bucket/run")
    assert proc.returncode == 5 and "unknown S3 storage option" in one_line_error(proc)


def test_prune_gc_verify_commands(ckpt, tmp_path, local_url):
    ids = [push(local_url, ckpt, "--epoch", str(e), "--metric", f"loss={1 / (e + 1)}", "--monitor", "loss",
                "--mode", "min")["id"] for e in range(4)]
    proc = run("prune", local_url, "--keep-last", "1", "--dry-run", "--json")
    assert proc.returncode == 0 and json.loads(proc.stdout)["dry_run"] is True
    assert {c["id"] for c in json.loads(proc.stdout)["pruned"]} == set(ids[:3])
    proc = run("prune", local_url, "--keep-last", "1")
    assert proc.returncode == 0 and proc.stdout.count("pruned") == 3
    rows = json.loads(run("ls", local_url, "--json").stdout)
    assert [r["id"] for r in rows] == [ids[-1]] and set(rows[0]["tags"]) == {"best", "latest"}
    orphan = Path(local_url) / "ckpt-e000009-0badf00d"
    orphan.mkdir()
    (orphan / "x.bin").write_bytes(b"left by a crash")
    proc = run("gc", local_url, "--min-age", "0", "--json")
    assert proc.returncode == 0 and json.loads(proc.stdout)["deleted"] == ["ckpt-e000009-0badf00d/x.bin"]
    assert not orphan.exists()
    proc = run("verify", local_url, "latest")
    assert proc.returncode == 0 and proc.stdout.startswith("ok")


def test_debug_variable_shows_traceback(tmp_path):
    env = {**os.environ, "CLOUDCKPT_DEBUG": "1"}
    proc = subprocess.run([*CLI, "ls", str(tmp_path / "none")], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 3 and "Traceback" in proc.stderr


def test_help_shows_examples_and_exit_codes():
    proc = run("--help")
    assert proc.returncode == 0
    assert "cloudckpt pull best" in proc.stdout and "3 nothing matches" in proc.stdout


def test_cli_imports_without_tensorflow():
    code = ("import sys, cloudckpt.cli, cloudckpt.store; "
            "sys.exit(1 if 'tensorflow' in sys.modules or 'keras' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


def test_storage_option_values_stay_strings():
    from cloudckpt.cli import _parse_value

    assert _parse_value("12e3") == "12e3" and _parse_value("null") == "null" and _parse_value("007") == "007"
    assert _parse_value("true") is True and _parse_value("false") is False
    assert _parse_value('{"a":1}') == {"a": 1} and _parse_value("[1, 2]") == [1, 2]
    assert _parse_value('"true"') == "true"  # a JSON-quoted string for a literal "true"


def test_a_secret_that_looks_like_a_number_reaches_the_client_as_typed(s3_url, ckpt):
    """moto accepts any secret; a secret coerced to 12000.0 can't even sign a request."""
    entry = push(s3_url, ckpt, "--epoch", "1")
    proc = run("-o", "key=testing", "-o", "secret=12e3", "ls", s3_url, "--json")
    assert proc.returncode == 0, proc.stderr
    assert [r["id"] for r in json.loads(proc.stdout)] == [entry["id"]]
    bad = run("-o", "client_kwargs={not json", "ls", s3_url)
    assert bad.returncode == 2 and "not json" not in bad.stderr and "valid JSON" in one_line_error(bad)


def test_retries_are_one_summary_line_by_default_and_each_with_v(tmp_path):
    """A dead endpoint: the clients and cloudckpt retry; by default stderr is the summary plus the error line."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: connections are refused
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": "", "AWS_ENDPOINT_URL_S3": ""}
    args = ("-o", f"endpoint_url=http://127.0.0.1:{port}", "ls", "s3://some-bucket/runs/r1")
    proc = run(*args, env=env)
    assert proc.returncode == 1
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 2, proc.stderr
    summary = re.fullmatch(r"cloudckpt: (\d+) failed attempt\(s\) retried \(last: read index at s3://some-bucket/"
                           r"runs/r1: attempt \d+ failed .*\); -v shows each", lines[0])
    assert summary, lines[0]
    assert lines[1].startswith("cloudckpt: error: ")
    verbose = run("-v", *args, env=env)
    assert verbose.returncode == 1
    assert verbose.stderr.count("; retrying") == int(summary.group(1)) >= 1
    assert "failed attempt(s) retried" not in verbose.stderr
