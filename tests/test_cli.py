"""The cloudckpt CLI as a script would use it: real subprocesses, exit codes, one-line errors, --json output."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
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
    proc = run("push", str(path), "--remote", url, "--json", *extra)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.mark.parametrize("kind", ["local", "s3", "gcs", "az"])
def test_push_ls_show_pull_json_on_each_store(kind, request, ckpt, tmp_path):
    url = request.getfixturevalue(f"{kind}_url")
    first = push(url, ckpt, "--epoch", "1", "--step", "70", "--metric", "val_loss=0.4", "--monitor", "val_loss")
    second = push(url, ckpt, "--epoch", "2", "--step", "140", "--metric", "val_loss=0.6")
    proc = run("ls", "--remote", url, "--json")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert [r["id"] for r in rows] == [first["id"], second["id"]]
    for r in rows:
        assert {"id", "epoch", "step", "created", "metrics", "size", "tags"} <= set(r)
    assert rows[0]["tags"] == ["best"] and rows[1]["tags"] == ["latest"]
    assert rows[0]["size"] == sum(p.stat().st_size for p in ckpt.rglob("*") if p.is_file())
    shown = json.loads(run("show", "best", "--remote", url, "--json").stdout)
    assert shown["id"] == first["id"] and {f["path"] for f in shown["files"]} == {"model.weights.h5", "opt/state.json"}
    proc = run("pull", "best", "--remote", url, "--to", str(tmp_path / "out"), "--json")
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


def cli_main(*args: str) -> tuple[int, str, str]:
    """The CLI in this process (main() is what the console script calls): no interpreter start per command."""
    from cloudckpt.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


def test_every_command_takes_its_run_as_remote_and_never_guesses(ckpt, tmp_path, monkeypatch):
    """One rule: the run is --remote/-r on every command, a positional is never read as a URL. So a run whose path
    looks like a selector (``best``) and a checkpoint id that looks like a path (``final.v2``) mean what they are."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CLOUDCKPT_REMOTE", raising=False)
    for epoch in (1, 2):
        code, _, err = cli_main("push", str(ckpt), "-r", "best", "--epoch", str(epoch), "--metric",
                                f"loss={epoch}", "--monitor", "loss")
        assert code == 0, err
    code, out, err = cli_main("ls", "--remote", "best", "--json")
    assert code == 0 and err == "", err
    first, second = (r["id"] for r in json.loads(out))
    results = {cmd[0]: cli_main(*cmd) for cmd in (
        ("show", "2", "-r", "best", "--json"), ("pull", "best", "-r", "best", "--to", "out", "--json"),
        ("verify", "best", "-r", "best", "--json"), ("prune", "-r", "best", "--keep-last", "1", "--dry-run"),
        ("gc", "-r", "best", "--dry-run"))}
    assert all(code == 0 and err == "" for code, _, err in results.values()), results
    assert json.loads(results["show"][1])["id"] == second and json.loads(results["pull"][1])["id"] == first
    assert [r["id"] for r in json.loads(results["verify"][1])] == [first]  # the run's best, not a run named best
    # another writer's id, which the index schema admits: read as a checkpoint of $CLOUDCKPT_REMOTE, not as a URL
    for f in (tmp_path / "best" / "index.json", tmp_path / "best" / first / "_cloudckpt_manifest.json"):
        f.write_text(f.read_text().replace(first, "final.v2"))
    (tmp_path / "best" / first).rename(tmp_path / "best" / "final.v2")
    monkeypatch.setenv("CLOUDCKPT_REMOTE", "best")
    code, out, err = cli_main("verify", "final.v2", "--json")
    assert code == 0 and json.loads(out) == [{"id": "final.v2", "ok": True, "error": None}], err
    code, _, err = cli_main("verify", "best")
    assert code == 0, err


def test_old_spellings_of_the_run_still_work_with_a_warning(ckpt, tmp_path, monkeypatch, local_url):
    """``ls URL``, ``show/pull --from``, ``push/sync --to``, ``verify URL SELECTOR``: deprecated, one warning line."""
    monkeypatch.delenv("CLOUDCKPT_REMOTE", raising=False)
    for args, old in ((("push", str(ckpt), "--to", local_url), "push --to URL"), (("ls", local_url), "ls URL"),
                      (("show", "latest", "--from", local_url), "show --from URL"),
                      (("pull", "latest", "--from", local_url, "--to", str(tmp_path / "p")), "pull --from URL"),
                      (("verify", local_url, "latest"), "verify URL SELECTOR"),
                      (("prune", local_url, "--dry-run"), "prune URL"), (("gc", local_url, "--dry-run"), "gc URL")):
        code, out, err = cli_main(*args)
        assert code == 0 and out, err
        assert err == f"cloudckpt: warning: `{old}` is deprecated; name the run with --remote URL\n"
    code, _, err = cli_main("ls", local_url, "--remote", local_url)
    assert code == 2 and "the run is given twice" in err
    code, _, err = cli_main("verify", local_url)  # a lone argument is the SELECTOR: no run given
    assert code == 2 and "no run: pass --remote URL" in err


def test_exit_code_2_usage(tmp_path):
    proc = run("pull", env={"CLOUDCKPT_REMOTE": str(tmp_path)})
    assert proc.returncode == 2
    assert "usage" in one_line_error(proc)
    proc = run("push", str(tmp_path), "--remote", str(tmp_path / "s"), "--metric", "loss")
    assert proc.returncode == 2
    proc = run("ls", env={"CLOUDCKPT_REMOTE": ""})
    assert proc.returncode == 2 and "CLOUDCKPT_REMOTE" in one_line_error(proc)


def test_exit_code_3_nothing_matches(ckpt, tmp_path, local_url):
    proc = run("ls", "--remote", str(tmp_path / "no-run-here"))
    assert proc.returncode == 3 and "no cloudckpt run" in one_line_error(proc)
    push(local_url, ckpt, "--epoch", "1")
    proc = run("pull", "42", "--remote", local_url, "--to", str(tmp_path / "x"))
    assert proc.returncode == 3 and "epoch 42" in one_line_error(proc)
    proc = run("pull", "best", "--remote", local_url, "--to", str(tmp_path / "x"))
    assert proc.returncode == 3  # no monitor: no best
    assert not (tmp_path / "x").exists()


def test_exit_code_4_integrity(ckpt, tmp_path, local_url):
    entry = push(local_url, ckpt, "--epoch", "1")
    victim = Path(local_url) / entry["id"] / "model.weights.h5"
    victim.write_bytes(b"\0" * victim.stat().st_size)
    proc = run("pull", "latest", "--remote", local_url, "--to", str(tmp_path / "x"))
    assert proc.returncode == 4 and "checksum mismatch" in one_line_error(proc)
    assert not (tmp_path / "x").exists()
    proc = run("verify", "--remote", local_url, "--all", "--json")
    assert proc.returncode == 4
    assert json.loads(proc.stdout) == [{"id": entry["id"], "ok": False, "error": json.loads(proc.stdout)[0]["error"]}]
    (Path(local_url) / "index.json").write_text('{"schema": "cloudckpt/index", "schema_version": 99}')
    proc = run("ls", "--remote", local_url)
    assert proc.returncode == 4 and "schema_version 99" in one_line_error(proc)


def test_exit_code_5_access_and_configuration(ckpt, tmp_path, s3_server):
    proc = run("ls", "--remote", "s3://no-such-bucket-here/run")
    assert proc.returncode == 5 and "no such bucket" in one_line_error(proc).lower()
    env = {"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": "", "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
           "AWS_CONFIG_FILE": str(tmp_path / "none"), "AWS_EC2_METADATA_DISABLED": "true"}
    proc = run("ls", "--remote", "s3://some-bucket/run", env=env)
    assert proc.returncode == 5 and "credentials" in one_line_error(proc)
    proc = run("-o", "bogus=1", "ls", "--remote", "s3://some-bucket/run")
    assert proc.returncode == 5 and "unknown S3 storage option" in one_line_error(proc)


def test_prune_gc_verify_commands(ckpt, tmp_path, local_url):
    ids = [push(local_url, ckpt, "--epoch", str(e), "--metric", f"loss={1 / (e + 1)}", "--monitor", "loss",
                "--mode", "min")["id"] for e in range(4)]
    proc = run("prune", "--remote", local_url, "--keep-last", "1", "--dry-run", "--json")
    assert proc.returncode == 0 and json.loads(proc.stdout)["dry_run"] is True
    assert {c["id"] for c in json.loads(proc.stdout)["pruned"]} == set(ids[:3])
    proc = run("prune", "--remote", local_url, "--keep-last", "1")
    assert proc.returncode == 0 and proc.stdout.count("pruned") == 3
    rows = json.loads(run("ls", "--remote", local_url, "--json").stdout)
    assert [r["id"] for r in rows] == [ids[-1]] and set(rows[0]["tags"]) == {"best", "latest"}
    orphan = Path(local_url) / "ckpt-e000009-0badf00d"
    orphan.mkdir()
    (orphan / "x.bin").write_bytes(b"left by a crash")
    proc = run("gc", "--remote", local_url, "--min-age", "0", "--json")
    assert proc.returncode == 0 and json.loads(proc.stdout)["deleted"] == ["ckpt-e000009-0badf00d/x.bin"]
    assert not orphan.exists()
    proc = run("verify", "--remote", local_url, "latest")
    assert proc.returncode == 0 and proc.stdout.startswith("ok")


def test_debug_variable_shows_traceback(tmp_path):
    env = {**os.environ, "CLOUDCKPT_DEBUG": "1"}
    proc = subprocess.run([*CLI, "ls", "-r", str(tmp_path / "none")], capture_output=True, text=True, env=env,
                          timeout=60)
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
    proc = run("-o", "key=testing", "-o", "secret=12e3", "ls", "--remote", s3_url, "--json")
    assert proc.returncode == 0, proc.stderr
    assert [r["id"] for r in json.loads(proc.stdout)] == [entry["id"]]
    bad = run("-o", "client_kwargs={not json", "ls", "--remote", s3_url)
    assert bad.returncode == 2 and "not json" not in bad.stderr and "valid JSON" in one_line_error(bad)


def test_retries_are_one_summary_line_by_default_and_each_with_v(tmp_path):
    """A dead endpoint: the clients and cloudckpt retry; by default stderr is the summary plus the error line."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: connections are refused
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": "", "AWS_ENDPOINT_URL_S3": ""}
    args = ("-o", f"endpoint_url=http://127.0.0.1:{port}", "ls", "--remote", "s3://some-bucket/runs/r1")
    with ThreadPoolExecutor(2) as pool:  # both wait out the same backoffs: side by side
        proc, verbose = pool.map(lambda a: run(*a, env=env), [args, ("-v", *args)])
    assert proc.returncode == 1
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 2, proc.stderr
    endpoint = f"http://127.0.0.1:{port}"  # whole, never cut (the URL ended at `index.jso...`), naming the fix
    summary = re.fullmatch(r"cloudckpt: (\d+) failed attempt\(s\) retried \(last: read index: s3://some-bucket/"
                           rf"runs/r1: could not connect to {endpoint}/some-bucket/runs/r1/index.json; check the "
                           r"endpoint \(-o endpoint_url, "
                           r"AWS_ENDPOINT_URL\) and the network\); -v shows each", lines[0])
    assert summary, lines[0]
    assert lines[1].startswith("cloudckpt: error: ") and lines[1].endswith(
        f"could not connect to {endpoint}/some-bucket/runs/r1/index.json; check the endpoint (-o endpoint_url, "
        "AWS_ENDPOINT_URL) and the network")
    assert verbose.returncode == 1
    assert verbose.stderr.count("; retrying") == int(summary.group(1)) >= 1
    assert "failed attempt(s) retried" not in verbose.stderr


def test_gc_dry_run_says_what_young_objects_it_keeps(ckpt, local_url):
    """An interrupted push's objects are young: gc keeps them, and its line (no --json) says how many and how big."""
    from cloudckpt import CheckpointStore

    assert run("push", str(ckpt), "--remote", local_url, "--epoch", "1").returncode == 0
    with CheckpointStore(local_url) as store:  # what a push cut short leaves: objects, never indexed
        store.backend.write_bytes("ckpt-e000002-deadbeef/part0.bin", b"x" * 3000)
        store.backend.write_bytes("ckpt-e000002-deadbeef/part1.bin", b"y" * 2000)
    proc = run("gc", "--remote", local_url, "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "kept 2 young objects (4.88kB) of 1 uncommitted checkpoints" in proc.stdout, proc.stdout
    proc = run("gc", "--remote", local_url, "--dry-run", "--json")
    data = json.loads(proc.stdout)
    assert (data["young_objects"], data["young_bytes"], data["kept_young"]) == (2, 5000, ["ckpt-e000002-deadbeef"])
    proc = run("gc", "--remote", local_url, "--dry-run", "--min-age", "0")
    assert "young" not in proc.stdout and "would remove 2 objects" in proc.stdout, proc.stdout
