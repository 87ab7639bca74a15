"""Flag order and the old spellings (issue 24 item 4), as real processes: the global options (-o, --progress, -v)
and the commands' -r/--remote and --json are accepted on either side of the command; a run URL given as a
positional argument gets a usage error naming --remote; every deprecated spelling README lists still works with one
warning line."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest
from test_cli import CLI, one_line_error, push, run


@pytest.fixture
def src(tmp_path) -> Path:
    d = tmp_path / "src"
    d.mkdir()
    (d / "w.bin").write_bytes(b"weights" * 100)
    return d


def test_global_options_on_either_side_of_the_command(s3_url, src, tmp_path, s3_server):
    entry = push(s3_url, src, "--epoch", "1")
    endpoint = f"endpoint_url={s3_server.endpoint}"
    variants = [
        ("ls", "-r", s3_url, "-o", endpoint, "--json"),
        ("-o", endpoint, "ls", "-r", s3_url, "--json"),
        ("-r", s3_url, "--json", "ls", "-o", endpoint),
        ("--json", "ls", f"--storage-option={endpoint}", f"--remote={s3_url}", "--no-progress", "-v"),
    ]
    for args in variants:
        proc = run(*args)
        assert proc.returncode == 0, (args, proc.stderr)
        assert [r["id"] for r in json.loads(proc.stdout)] == [entry["id"]], args
    proc = run("-r", s3_url, "pull", "best", "--to", str(tmp_path / "out"))
    assert proc.returncode == 3 and "no best" in one_line_error(proc)  # parsed: the run has no monitor
    proc = run("-r", s3_url, "pull", "latest", "--to", str(tmp_path / "out"), "-v", "--json")
    assert proc.returncode == 0 and json.loads(proc.stdout)["id"] == entry["id"], proc.stderr
    assert "cloudckpt: INFO: pulled" in proc.stderr  # -v after the command took effect
    proc = run("push", str(src), "-r", s3_url, "--metric", "-v=1")  # a command option's value is never moved
    assert proc.returncode == 0, proc.stderr


def test_a_misplaced_url_suggests_remote(local_url, src):
    push(local_url, src, "--epoch", "1")
    proc = run("pull", "best", "s3://bucket/runs/r1")
    assert proc.returncode == 2
    assert one_line_error(proc) == ("cloudckpt: usage error: 's3://bucket/runs/r1' is not an argument of this "
                                    "command: name the run with --remote s3://bucket/runs/r1")
    proc = run("pull", "best", local_url)  # a local run's directory, as the URL
    assert proc.returncode == 2 and f"name the run with --remote {local_url}" in one_line_error(proc)


OLD = [  # README: `ls/prune/gc URL`, `show/pull --from URL`, `push/sync --to URL`, `verify URL SELECTOR`/`URL --all`
    (("push", "{src}", "--to", "{url}", "--epoch", "2"), "push --to URL"),
    (("ls", "{url}"), "ls URL"),
    (("show", "latest", "--from", "{url}"), "show --from URL"),
    (("pull", "latest", "--from", "{url}", "--to", "{out}"), "pull --from URL"),
    (("verify", "{url}", "latest"), "verify URL SELECTOR"),
    (("verify", "{url}", "--all"), "verify URL --all"),
    (("prune", "{url}", "--dry-run"), "prune URL"),
    (("gc", "{url}", "--dry-run"), "gc URL"),
]


@pytest.mark.parametrize("args,old", OLD, ids=[o for _, o in OLD])
def test_every_old_spelling_in_readme_works_with_a_warning(args, old, local_url, src, tmp_path):
    push(local_url, src, "--epoch", "1")
    filled = [a.format(src=src, url=local_url, out=tmp_path / "out") for a in args]
    proc = run(*filled, env={"CLOUDCKPT_REMOTE": ""})
    assert proc.returncode == 0 and proc.stdout, proc.stderr
    assert proc.stderr == f"cloudckpt: warning: `{old}` is deprecated; name the run with --remote URL\n"


def test_old_sync_to_url_spelling(local_url, tmp_path):
    watch = tmp_path / "watch"
    watch.mkdir()
    proc = subprocess.Popen([*CLI, "sync", str(watch), "--to", local_url, "--poll", "0.1"], stderr=subprocess.PIPE,
                            text=True)
    try:
        lines = [proc.stderr.readline(), proc.stderr.readline()]  # the warning, then "watching" once it runs
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    assert lines[0] == "cloudckpt: warning: `sync --to URL` is deprecated; name the run with --remote URL\n"
    assert lines[1].startswith(f"cloudckpt sync: watching {watch} -> ") and proc.returncode == 0
