"""PyTorch DCP on cloudckpt (cloudckpt.torch.dcp): real torchrun jobs (gloo, CPU) of tests/support/dcp_job.py
saving and loading with every rank in its own process; FSDP2 and DDP; resharding 4 -> 2 -> 1 and 1 -> 4; a rank
SIGKILLed at each point of a save (every point on local, together every point across S3, GCS and Azure) and the
restart resuming to a final state bit-identical to an uninterrupted run's; the CLI on the run;
fencing of an older job."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support import rank_procs, trainer_runs

torch = pytest.importorskip("torch")
dcp = pytest.importorskip("torch.distributed.checkpoint")

from support import dcp_job  # noqa: E402

from cloudckpt import CheckpointStore  # noqa: E402
from cloudckpt.distributed_commit import forget_job_stores  # noqa: E402

JOB = str(Path(dcp_job.__file__))


def torchrun(n: int, *args: str, check: bool = True, agent: bool = False) -> subprocess.CompletedProcess:
    """``dcp_job.py`` on ``n`` ranks, each its own process, started as torchrun starts them; under torchrun itself
    with ``agent`` (a test that reads its report of how a rank died)."""
    for p in Path(args[2]).glob("load-*.json"):  # results of an earlier load
        p.unlink()
    if agent:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n), JOB, *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=trainer_runs.env())
    else:
        proc = rank_procs.run(JOB, args, world=n)
    if check:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def loaded(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(out.glob("load-*.json"))]


def load_here(remote: str, out: Path, selector: str = "latest") -> dict:
    """Load in this process (no torch.distributed: one rank) into a plain model; the job's comparison result."""
    for p in out.glob("load-*.json"):
        p.unlink()
    dcp_job.load(_args("load", remote, out, kind="plain", selector=selector))
    [result] = loaded(out)
    return result


def save_here(remote: str, out: Path, *, save_at: str, steps: int) -> None:
    dcp_job.save(_args("save", remote, out, kind="plain", save_at=save_at, steps=steps))


def _args(mode: str, remote: str, out: Path, **kw: object) -> object:
    a = dcp_job.parse([mode, remote, str(out)])  # the job's own defaults
    vars(a).update(kw)
    return a


@pytest.fixture(autouse=True)
def _fresh_job():
    """Each test's in-process saves are a new job (their own claim of the run)."""
    forget_job_stores()
    yield
    forget_job_stores()


def cli(*args: str) -> tuple[int, str]:
    from cloudckpt.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue() + err.getvalue()


def test_fsdp2_on_4_ranks_restores_bit_identical_on_2_and_1_reading_only_what_each_needs(tmp_path):
    run, out = str(tmp_path / "run"), tmp_path / "out"
    out.mkdir()
    torchrun(4, "save", run, str(out), "--kind", "fsdp", "--save-at", "2", "--async-at", "4",
             "--losses", json.dumps({2: 5.0, 4: 1.0}), "--stage-in-memory", "0")  # staged in files (the others:
    # in memory, the default for states this small)
    store = CheckpointStore(run)
    listed = store.list()
    assert [c.step for c in listed] == [2, 4]
    data_files = [f for f in listed[-1].files if f.path.endswith(".distcp")]
    assert sorted(f.path for f in data_files) == [f"__{r}_0.distcp" for r in range(4)]  # each rank wrote its own

    torchrun(2, "load", run, str(out), "--kind", "fsdp")  # 4 -> 2
    two = loaded(out)
    assert [r["world"] for r in two] == [2, 2]
    assert all(r["equal"] and r["step"] == 4 and r["compared"] > 20 for r in two), two
    for r in two:  # each rank fetched about half of the tensors' bytes (ranged reads), not whole objects
        assert 0 < r["stats"]["bytes"] < 0.6 * r["data_bytes"], r
        assert r["stats"]["requests"] <= len(data_files), r  # neighbouring items coalesced: <= one read per object
    assert sum(r["stats"]["bytes"] for r in two) >= two[0]["data_bytes"]

    torchrun(3, "load", run, str(out), "--kind", "fsdp")  # 4 -> 3: uneven shards, parts of saved ones
    three = loaded(out)
    assert len(three) == 3 and all(r["equal"] and r["step"] == 4 for r in three), three
    assert all(r["stats"]["bytes"] < 0.5 * r["data_bytes"] for r in three), three

    one = load_here(run, out)  # 4 -> 1
    assert one["equal"] and one["step"] == 4 and one["stats"]["bytes"] == one["data_bytes"], one
    assert load_here(run, out, selector=str(listed[0].id))["equal"]  # the older one too, by id

    # the CLI on the run; a pulled folder loads with DCP's own FileSystemReader
    code, text = cli("ls", "--remote", run, "--json")
    assert code == 0 and [r["id"] for r in json.loads(text)] == [c.id for c in listed]
    assert cli("show", "--remote", run, "latest")[0] == 0
    assert cli("verify", "--remote", run, "--all")[0] == 0
    code, _ = cli("pull", "--remote", run, "latest", "--to", str(tmp_path / "pulled"))
    assert code == 0 and (tmp_path / "pulled" / ".metadata").is_file()
    model, opt = dcp_job.build("plain", seed=99)
    sd = dcp_job.state(model, opt, 0)
    dcp.load(sd, storage_reader=dcp.FileSystemReader(str(tmp_path / "pulled")))
    want = torch.load(out / "ref-4.pt", weights_only=True)
    assert dcp_job.differences(dcp_job.full(sd), want) == []
    code, text = cli("prune", "--remote", run, "--keep-last", "1", "--json")
    assert code == 0 and [c["id"] for c in json.loads(text)["pruned"]] == [listed[0].id]
    assert not any(o.rel.startswith(listed[0].id) for o in store.backend.list_objects())


def test_ddp_on_s3_with_retention_then_1_rank_resharded_to_4(s3_url, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    losses = json.dumps({1: 0.1, 2: 5.0, 3: 4.0, 4: 3.0})  # step 1 stays the best
    torchrun(2, "save", s3_url, str(out), "--kind", "ddp", "--save-at", "1,2,3,4", "--losses", losses,
             "--keep-last", "2")
    store = CheckpointStore(s3_url)
    assert [c.step for c in store.list()] == [1, 3, 4]  # best + last 2; step 2 pruned
    assert store.best().step == 1
    listed = {c.id for c in store.list()}
    assert {o.rel.split("/")[0] for o in store.backend.list_objects() if o.rel.startswith("ckpt-")} == listed
    # replicated state: each item stored once, not once per rank
    meta = json.loads(store.backend.read_bytes(f"{store.latest().id}/dcp_metadata.json"))
    keys = [(s["fqn"], tuple(s.get("offset") or ())) for s in meta["storage"]]
    assert len(keys) == len(set(keys)) == len(meta["storage"])

    assert load_here(s3_url, out, selector="best")["equal"]  # 2 -> 1

    save_here(s3_url, out, save_at="5", steps=5)  # 1 rank (this process) ...
    torchrun(4, "load", s3_url, str(out), "--kind", "fsdp")  # ... -> 4 FSDP2 ranks
    four = loaded(out)
    assert len(four) == 4 and all(r["equal"] and r["step"] == 5 for r in four), four
    # each rank reads only the blocks holding its rows of each saved tensor (and the small non-tensor values)
    assert all(r["stats"]["bytes"] < 0.4 * r["data_bytes"] for r in four), four
    assert sum(r["stats"]["bytes"] for r in four) < 2 * four[0]["data_bytes"], four  # whole items: 4x


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict:
    """The full state at step 4 of the 2-rank FSDP job run without a crash (saves at 2 and 4, on local disk)."""
    out = tmp_path_factory.mktemp("uninterrupted")
    forget_job_stores()
    torchrun(2, "save", str(out / "run"), str(out), "--kind", "fsdp", "--save-at", "2,4")
    return torch.load(out / "ref-4.pt", weights_only=True)


# Every point on local disk; on each object store some of them, together every point once (CI time: each case is
# a killed 2-rank job, a load, gc and a resumed 2-rank job, ~20 s on a loaded 2-core box).
KILLS = [("local", "dcp.before_upload", 1), ("local", "dcp.mid_upload", 1), ("local", "dcp.after_upload", 1),
         ("local", "dcp.finish", 0), ("local", "dcp.finish.after_manifest", 0),
         ("s3", "dcp.mid_upload", 1), ("s3", "dcp.finish", 0),
         ("gcs", "dcp.before_upload", 1), ("gcs", "dcp.after_upload", 1),
         ("az", "dcp.finish.after_manifest", 0)]


@pytest.mark.parametrize("kind,point,rank", KILLS, ids=[f"{k}-{p}" for k, p, _ in KILLS])
def test_a_rank_sigkilled_mid_save_lists_nothing_and_the_resumed_run_ends_bit_identical(
        request, tmp_path, uninterrupted, kind, point, rank):
    run, out = request.getfixturevalue(f"{kind}_url"), tmp_path / "out"
    out.mkdir()
    proc = torchrun(2, "save", run, str(out), "--kind", "fsdp", "--save-at", "2,4", "--kill-at", "4",
                    "--kill-rank", str(rank), "--failpoint", point, check=False, agent=True)
    assert proc.returncode != 0 and "saved 2" in proc.stdout and "saved 4" not in proc.stdout, proc.stdout
    root = proc.stderr[proc.stderr.index("Root Cause"):]  # torchrun's report: the rank that died first, and how
    assert f"rank      : {rank} " in root and "SIGKILL" in root, root
    store = CheckpointStore(run)
    [only] = store.list()
    assert only.step == 2
    result = load_here(run, out)  # the previous checkpoint restores, bit-identical
    assert result["equal"] and result["step"] == 2, result
    report = store.gc(min_age=0)
    leftovers = set(report.checkpoints)
    assert only.id not in leftovers
    if point not in ("dcp.before_upload", "dcp.mid_upload"):  # the killed save had stored objects: gc removes them
        assert len(leftovers) == 1 and next(iter(leftovers)).startswith("ckpt-s0000000004-"), report
    assert {o.rel.split("/")[0] for o in store.backend.list_objects() if o.rel.startswith("ckpt-")} == {only.id}
    assert [v.ok for v in store.verify(all=True)] == [True]

    (out / "ref-4.pt").unlink(missing_ok=True)
    again = torchrun(2, "save", run, str(out), "--kind", "fsdp", "--save-at", "2,4", "--resume")  # the restart
    assert f"resumed 2 {only.id}" in again.stdout and "saved 4" in again.stdout and "saved 2" not in again.stdout
    resumed = torch.load(out / "ref-4.pt", weights_only=True)
    assert len(resumed) == len(uninterrupted) > 20
    assert dcp_job.differences(resumed, uninterrupted) == []  # the final state: bit for bit the uninterrupted run's
    assert [c.step for c in store.list()] == [2, 4]


def test_a_newer_job_fences_an_older_one(tmp_path):
    run, out = str(tmp_path / "run"), tmp_path / "out"
    out.mkdir()
    go = tmp_path / "go"
    old = subprocess.Popen([sys.executable, JOB, "save", run, str(out), "--kind", "plain", "--steps", "3",
                            "--save-at", "1,3", "--wait-before", "3", "--wait-file", str(go)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=trainer_runs.env())
    try:
        lines = []
        deadline = time.monotonic() + 300
        while not any(line.startswith("waiting 3") for line in lines):
            line = old.stdout.readline()
            assert line and time.monotonic() < deadline, "".join(lines) + old.stderr.read()
            lines.append(line)
        new = subprocess.run([sys.executable, JOB, "save", run, str(tmp_path), "--kind", "plain", "--steps", "1",
                              "--save-at", "1"], capture_output=True, text=True, env=trainer_runs.env(), timeout=300)
        assert new.returncode == 0, new.stderr
        go.touch()
        _, err = old.communicate(timeout=300)
    finally:
        old.kill()
    assert old.returncode != 0 and "StaleWriterError" in err, err[-2000:]
    assert [c.step for c in CheckpointStore(run).list()] == [1, 1]  # the old job's step 3 is not listed


@pytest.mark.parametrize("kind", ["gcs", "az"])
def test_fsdp2_on_2_ranks_on_gcs_and_azure(kind, request, tmp_path):
    url, out = request.getfixturevalue(f"{kind}_url"), tmp_path / "out"
    out.mkdir()
    torchrun(2, "save", url, str(out), "--kind", "fsdp", "--save-at", "2", "--steps", "2")
    [entry] = CheckpointStore(url).list()
    assert sorted(f.path for f in entry.files) == ["__0_0.distcp", "__1_0.distcp", "dcp_metadata.json"]
    result = load_here(url, out)  # 2 -> 1
    assert result["equal"] and result["step"] == 2, result


def test_the_torchrun_example_trains_then_resumes_on_another_number_of_ranks(tmp_path):
    example = str(Path(__file__).resolve().parent.parent / "examples" / "torch_dcp_fsdp.py")
    env = {**trainer_runs.env(), "CLOUDCKPT_REMOTE": str(tmp_path / "store")}

    def launch(n: int) -> str:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n), example]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout

    assert "resumed" not in launch(2)
    store = CheckpointStore(str(tmp_path / "store"))
    latest = store.latest()
    assert latest.step == 300 and latest.meta["ranks"] == "2" and len(store.list()) <= 3  # keep_best=1, keep_last=2
    assert f"resumed from step 300 ({latest.id})" in launch(3)
