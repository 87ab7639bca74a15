"""Finding runs (issue 24 item 8): `cloudckpt ls` at a prefix that holds runs, not a run, lists the runs under it
(each with its latest, best and size) on every kind of store, as a real process; an empty prefix is still exit 3."""

from __future__ import annotations

import json
import os

from test_cli import one_line_error, push, run


def test_ls_at_a_prefix_lists_its_runs(store_url, tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "w.bin").write_bytes(os.urandom(1000))
    (src / "sub" / "index.json").write_text("{}")  # a checkpoint's own file named index.json is not a run
    root = store_url.rsplit("/", 1)[0]  # .../runs
    a = [push(f"{root}/a", src, "--epoch", str(e), "--metric", f"val_loss={1 / e}", "--monitor", "val_loss")
         for e in (1, 2, 3)]
    b = push(f"{root}/team/b", src, "--epoch", "7")
    for prefix in (root, root + "/"):
        proc = run("ls", "-r", prefix, "--json")
        assert proc.returncode == 0, proc.stderr
        rows = json.loads(proc.stdout)
        assert [r["url"] for r in rows] == [f"{root}/a", f"{root}/team/b"]
        ra, rb = rows
        assert (ra["checkpoints"], ra["latest"]["id"], ra["best"]["id"], ra["monitor"]) == (3, a[2]["id"],
                                                                                            a[2]["id"], "val_loss")
        assert ra["best"]["metrics"] == {"val_loss": 1 / 3} and ra["error"] is None
        assert ra["size"] >= sum(c["size"] for c in a) and rb["size"] >= b["size"]
        assert (rb["checkpoints"], rb["latest"]["epoch"], rb["best"]) == (1, 7, None)
    text = run("ls", "-r", root).stdout.splitlines()
    assert len(text) == 2 and text[0].startswith(f"{root}/a  3 checkpoints") and f"best {a[2]['id']}" in text[0]
    proc = run("ls", "-r", f"{root}/nothing-here")
    assert proc.returncode == 3 and "no cloudckpt run" in one_line_error(proc)
