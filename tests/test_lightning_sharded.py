"""cloudckpt.lightning.CloudModelParallelStrategy: Lightning's ModelParallelStrategy (FSDP2 over 2 ranks, gloo, CPU)
committing each sharded checkpoint through the DCP plugin. Real torchrun jobs (tests/support/lightning_sharded_job.py):
a rank SIGKILLed mid-upload or in the commit lists nothing, the restart resumes from the previous checkpoint with
exactly the state saved there and ends bit-identical to an uninterrupted run; gc collects what the killed save
stored. CloudPreemption with the strategy: SIGTERM on one rank makes every rank save the same step (one commit) and
exit 143 within the deadline; the restart resumes from that step."""

from __future__ import annotations

import io
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("lightning")

from support import rank_procs, trainer_runs  # noqa: E402

from cloudckpt import CheckpointStore  # noqa: E402
from cloudckpt.errors import IntegrityError  # noqa: E402
from cloudckpt.lightning import CloudModelParallelStrategy  # noqa: E402

JOB = str(Path(trainer_runs.__file__).parent / "lightning_sharded_job.py")
RANKS = 2


def torchrun(remote: str, d: Path, *args: str, agent: bool = False) -> subprocess.CompletedProcess:
    """The job on RANKS ranks, started as torchrun starts them; under torchrun itself with ``agent`` (a test that
    reads its report of how a rank died)."""
    (d / "out").mkdir(parents=True, exist_ok=True)
    argv = [remote, str(d / "root"), str(d / "out"), *args]
    if not agent:
        return rank_procs.run(JOB, argv, world=RANKS, timeout=300)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(RANKS), JOB, *argv]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=trainer_runs.env())


def shards(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], dict):
            assert_identical(a[k], b[k])
        else:
            assert torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype, k


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted run's output folder."""
    d = tmp_path_factory.mktemp("lightning_sharded_ref")
    remote = str(d / "store")
    ref = torchrun(remote, d)
    assert ref.returncode == 0, ref.stderr[-3000:]
    assert "fresh" in ref.stdout and saved(ref.stdout) == [4, 8, 12]
    # each checkpoint carries the monitored score Lightning computed for its step; keep_last=2 pruned step 4
    losses = val_losses(ref.stdout)
    with CheckpointStore(remote) as store:
        listed = store.index().checkpoints
    assert [(c.step, c.metrics) for c in listed] == [(s, {"val_loss": losses[s]}) for s in (8, 12)]
    best = min(listed, key=lambda c: c.metrics["val_loss"])
    assert CloudModelParallelStrategy(remote).resume_path("best") == f"cloudckpt:{best.id}"
    return d / "out"


def saved(stdout: str) -> list[int]:
    return [int(ln.split()[1]) for ln in stdout.splitlines() if ln.startswith("saved ")]


def val_losses(stdout: str) -> dict[int, float]:
    return {int(ln.split()[1]): float(ln.split()[2]) for ln in stdout.splitlines() if ln.startswith("val ")}


@pytest.mark.parametrize("point,rank", [("dcp.mid_upload", 1), ("dcp.finish", 0)])
def test_a_rank_sigkilled_mid_save_lists_nothing_and_the_restart_resumes_to_identical_params(reference, tmp_path,
                                                                                            s3_url, point, rank):
    # a rank SIGKILLs itself at ``point`` of the epoch-1 save (step 8): mid-upload of its shards, or (rank 0) in
    # finish before the commit; torchrun stops the other rank
    killed = torchrun(s3_url, tmp_path / "a", "--kill-epoch", "1", "--kill-rank", str(rank), "--failpoint", point,
                      agent=True)
    assert killed.returncode != 0 and "done" not in killed.stdout, killed.stdout
    root = killed.stderr[killed.stderr.index("Root Cause"):]  # torchrun's report: the rank that died first, and how
    assert f"rank      : {rank} " in root and "SIGKILL" in root, root
    with CheckpointStore(s3_url) as store:
        listed = store.index().checkpoints
        store.gc(min_age=0)  # what the killed save stored (rank 0's shards) is collected; the listed one stays
        assert {o.rel.split("/")[0] for o in store.backend.list_objects() if o.rel.startswith("ckpt-")} \
            == {listed[0].id}
        assert [v.ok for v in store.verify(all=True)] == [True]
    assert [(c.step, c.meta["framework"], c.meta["ranks"]) for c in listed] == [(4, "lightning-sharded", "2")]
    assert listed[0].metrics == {"val_loss": val_losses(killed.stdout)[4]}
    assert listed[0].meta["name"] == "epoch=0-step=4.ckpt"

    again = torchrun(s3_url, tmp_path / "b")
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed cloudckpt:{listed[0].id}" in again.stdout
    for r in range(RANKS):  # the state restored is the one saved at step 4, on each rank
        assert_identical(shards(tmp_path / "b" / "out" / f"restored-{r}.pt"),
                         shards(tmp_path / "a" / "out" / f"saving-4-{r}.pt"))
        assert_identical(shards(tmp_path / "b" / "out" / f"final-{r}.pt"),
                         shards(reference / f"final-{r}.pt"))
    with CheckpointStore(s3_url) as store:
        assert [c.step for c in store.index().checkpoints] == [8, 12]  # keep_last=2


def test_the_lightning_state_is_read_as_plain_data_only():
    from cloudckpt.lightning.sharded import _from_plain_bytes, _plain_bytes

    state = {"epoch": 1, "loops": {"fit_loop": {"n": [1, 2]}}, "score": torch.tensor(0.5)}
    back = _from_plain_bytes(_plain_bytes(state), "c1")
    assert back["loops"] == state["loops"] and torch.equal(back["score"], state["score"])

    class Evil:
        def __reduce__(self):
            return (print, ("unpickled",))

    planted = io.BytesIO()
    torch.save({"epoch": Evil()}, planted, pickle_module=pickle)
    with pytest.raises(IntegrityError, match="not plain tensors and data"):
        _from_plain_bytes(planted.getvalue(), "c1")
    with pytest.raises(IntegrityError, match="not a dict"):
        _from_plain_bytes(_plain_bytes([1]), "c1")  # type: ignore[arg-type]



DEADLINE = 25.0  # CloudPreemption's deadline (its default), counted from the notice


def test_sigterm_on_one_rank_makes_every_rank_save_the_same_step_and_exit_143_then_the_restart_resumes(tmp_path,
                                                                                                      s3_url):
    # the ranks are processes of the test's own (rank_procs), as torchrun starts them, so it reads each one's status
    d = tmp_path / "a"
    (d / "out").mkdir(parents=True)
    codes, outs, took = rank_procs.sigterm_one_rank(
        "lightning_sharded_job.py", [s3_url, str(d / "root"), str(d / "out"), "--preempt", "--step-delay", "0.1"],
        d, when="step 6")  # in epoch 1: epoch 0's checkpoint (step 4) is committed (synchronously)
    for rank, code in enumerate(codes):
        assert code == 143, f"rank {rank} exited {codes}: {rank_procs.stderr_of(d, rank)}"
    saved = [[int(m) for m in re.findall(r"^preempted (\d+)$", out, re.M)] for out in outs]
    assert saved[0] == saved[1] and len(saved[0]) == 1, saved  # every rank saved the same step, once
    step = saved[0][0]
    assert 6 <= step < 12, step
    assert took < DEADLINE, f"the ranks exited {took:.1f}s after the signal"  # saved, committed and gone
    print(f"SIGTERM on rank 1: every rank saved step {step}; both exited 143 {took:.2f}s after the signal")
    with CheckpointStore(s3_url) as store:
        listed = store.index().checkpoints
    latest = listed[-1]
    assert [c.step for c in listed] == [4, step]  # epoch 0's, then the one every rank saved at the preemption
    assert (latest.meta["name"], latest.meta["ranks"]) == ("last.ckpt", "2")

    again = torchrun(s3_url, tmp_path / "b")
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed cloudckpt:{latest.id}" in again.stdout
    for r in range(RANKS):  # the restart starts from the state every rank saved at the preemption
        assert_identical(shards(tmp_path / "b" / "out" / f"restored-{r}.pt"),
                         shards(d / "out" / f"preempted-{r}.pt"))
