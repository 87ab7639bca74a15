"""The Hugging Face Trainer under FSDP2 with a sharded state dict (2 ranks, gloo, CPU) and CloudCheckpointCallback:
every rank stores its own files of ``checkpoint-N``, rank 0 commits one checkpoint. Real torchrun jobs
(tests/support/hf_fsdp_job.py): a rank SIGKILLed mid-save lists nothing, the restart pulls the previous checkpoint on
every rank, resumes from exactly the state saved there and ends bit-identical to an uninterrupted run. A pulled
checkpoint is read without unpickling anything of the store's. SIGTERM on one rank makes every rank save the same
step (one commit) and exit 143 within the deadline; the restart resumes from that step."""

from __future__ import annotations

import json
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from support import rank_procs, trainer_runs  # noqa: E402

from cloudckpt import CheckpointStore  # noqa: E402
from cloudckpt.errors import IntegrityError  # noqa: E402
from cloudckpt.hf.sharded import check_dcp_folders  # noqa: E402
from cloudckpt.torch.dcp_format import METADATA_NAME  # noqa: E402

JOB = str(Path(trainer_runs.__file__).parent / "hf_fsdp_job.py")
RANKS = 2


def torchrun(remote: str, d: Path, *args: str, agent: bool = False) -> subprocess.CompletedProcess:
    """The job on RANKS ranks, started as torchrun starts them; under torchrun itself with ``agent`` (a test that
    reads its report of how a rank died)."""
    d.mkdir(parents=True, exist_ok=True)
    if not agent:
        return rank_procs.run(JOB, [remote, str(d), *args], world=RANKS, timeout=300)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(RANKS), JOB,
           remote, str(d), *args]
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
def reference(tmp_path_factory) -> tuple[Path, str]:
    """An uninterrupted run (its output folder, its store): checkpoints at steps 4, 8, 12; keep_last=2."""
    d = tmp_path_factory.mktemp("hf_fsdp_ref")
    remote = str(d / "store")
    ref = torchrun(remote, d / "out")
    assert ref.returncode == 0, ref.stderr[-3000:]
    assert "fresh" in ref.stdout and "done" in ref.stdout
    with CheckpointStore(remote) as store:
        listed = store.index().checkpoints
    assert [(c.step, c.meta["framework"], c.meta["ranks"]) for c in listed] == [(8, "hf", "2"), (12, "hf", "2")]
    paths = {f.path for f in listed[-1].files}
    # every rank's shards and rng state, our JSON metadata per DCP folder, never DCP's pickled .metadata
    for folder in ("pytorch_model_fsdp_0", "optimizer_0"):
        assert {f"{folder}/__0_0.distcp", f"{folder}/__1_0.distcp", f"{folder}/{METADATA_NAME}"} <= paths
    assert {"rng_state_0.pth", "rng_state_1.pth", "trainer_state.json", "scheduler.pt"} <= paths
    assert not any(p.endswith(".metadata") or p.endswith("training_args.bin") for p in paths)
    return d / "out", remote


@pytest.mark.parametrize("point,rank", [("hf.sharded.mid_upload", 1), ("dcp.finish.after_manifest", 0)])
def test_a_rank_sigkilled_mid_save_lists_nothing_and_the_restart_resumes_to_identical_params(reference, tmp_path,
                                                                                            s3_url, point, rank):
    # at step 8's save, rank 1 dies mid-upload of its files, or rank 0 dies inside the
    # commit (manifest stored, index not updated); torchrun stops the other rank
    killed = torchrun(s3_url, tmp_path / "a", "--kill-step", "8", "--kill-rank", str(rank), "--failpoint", point,
                      agent=True)
    assert killed.returncode != 0 and "done" not in killed.stdout, killed.stdout
    root = killed.stderr[killed.stderr.index("Root Cause"):]
    assert f"rank      : {rank} " in root and "SIGKILL" in root, root
    with CheckpointStore(s3_url) as store:
        listed = store.index().checkpoints
        assert [(c.step, c.meta["ranks"]) for c in listed] == [(4, "2")]
        assert {o.rel.split("/")[0] for o in store.backend.list_objects() if o.rel.startswith("ckpt-")} \
            > {listed[0].id}  # the killed save stored objects: unlisted
        store.gc(min_age=0)
        assert {o.rel.split("/")[0] for o in store.backend.list_objects() if o.rel.startswith("ckpt-")} \
            == {listed[0].id}
        assert [v.ok for v in store.verify(all=True)] == [True]

    again = torchrun(s3_url, tmp_path / "b")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed checkpoint-4" in again.stdout
    ref_out, _ = reference
    for r in range(RANKS):  # every rank restored its shards of step 4, and ends where the uninterrupted run ended
        assert_identical(shards(tmp_path / "b" / f"restored-{r}.pt"), shards(tmp_path / "a" / f"saving-4-{r}.pt"))
        assert_identical(shards(tmp_path / "b" / f"final-{r}.pt"), shards(ref_out / f"final-{r}.pt"))
    with CheckpointStore(s3_url) as store:
        assert [c.step for c in store.index().checkpoints] == [8, 12]


def test_a_rank_whose_upload_fails_fails_the_save_on_every_rank_and_lists_nothing(reference, tmp_path, local_url):
    # rank 1's disk is full when it starts storing step 8's files: every rank raises (no rank waits forever), naming
    # rank 1 and the error, and only step 4 is listed
    failed = torchrun(local_url, tmp_path / "a", "--kill-step", "8", "--kill-rank", "1", "--failpoint",
                      "hf.sharded.before_upload:1:enospc", agent=True)  # its report names each rank
    assert failed.returncode != 0 and "done" not in failed.stdout
    for r in range(RANKS):
        assert f"[rank{r}]: OSError: [Errno 28]" in failed.stderr or \
            f"[rank{r}]: cloudckpt.errors.CloudCkptError: rank 1: [Errno 28]" in failed.stderr, failed.stderr[-3000:]
    with CheckpointStore(local_url) as store:
        assert [c.step for c in store.index().checkpoints] == [4]


DEADLINE = 25.0  # the callback's preemption_deadline (its default), counted from the notice


def test_sigterm_on_one_rank_makes_every_rank_save_the_same_step_and_exit_143_then_the_restart_resumes(tmp_path,
                                                                                                      s3_url):
    # the ranks are processes of the test's own (rank_procs), as torchrun starts them, so it reads each one's status
    d = tmp_path / "a"
    codes, outs, took = rank_procs.sigterm_one_rank("hf_fsdp_job.py", [s3_url, str(d), "--preempt", "--step-delay",
                                                                       "0.1"], d, when="step 5")
    for rank, code in enumerate(codes):
        assert code == 143, f"rank {rank} exited {codes}: {rank_procs.stderr_of(d, rank)}"
    saved = [[int(m) for m in re.findall(r"^preempted (\d+)$", out, re.M)] for out in outs]
    assert saved[0] == saved[1] and len(saved[0]) == 1, saved  # every rank saved the same step, once
    step = saved[0][0]
    assert 5 <= step < 12, step
    assert took < DEADLINE, f"the ranks exited {took:.1f}s after the signal"  # saved, committed and gone
    print(f"SIGTERM on rank 1: every rank saved step {step}; both exited 143 {took:.2f}s after the signal")
    with CheckpointStore(s3_url) as store:
        listed = store.index().checkpoints
    assert [(c.step, c.meta["ranks"]) for c in listed][-1] == (step, "2")  # the latest: the step both saved
    assert [c.step for c in listed] == sorted({4, step})

    again = torchrun(s3_url, tmp_path / "b")
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed checkpoint-{step}" in again.stdout
    for r in range(RANKS):  # the restart starts from the state every rank saved at the preemption
        assert_identical(shards(tmp_path / "b" / f"restored-{r}.pt"), shards(d / f"preempted-{r}.pt"))


@pytest.fixture
def pulled(reference, tmp_path) -> Path:
    """The reference's latest checkpoint, pulled (DCP's .metadata written back from the validated JSON)."""
    _, remote = reference
    with CheckpointStore(remote) as store:
        store.pull("latest", to=tmp_path / "ckpt")
    return tmp_path / "ckpt"


def test_a_pulled_checkpoint_loads_with_dcps_own_reader(pulled):
    from torch.distributed.checkpoint import FileSystemReader

    check_dcp_folders(pulled)
    for folder in ("pytorch_model_fsdp_0", "optimizer_0"):
        md = FileSystemReader(str(pulled / folder)).read_metadata()  # our .metadata, built from the JSON
        assert any(k.startswith("b1.lin.weight") or "b1.lin.weight" in k for k in md.state_dict_metadata), folder


def _rewrite(folder: Path, pick, data: bytes) -> None:
    """Replace the bytes of the first stored item ``pick`` selects with ``data`` (in a new file) and record its
    crc32c, as a hostile writer would."""
    import google_crc32c

    doc = json.loads((folder / METADATA_NAME).read_bytes())
    item = next(s for s in doc["storage"] if pick(doc["items"][s["fqn"]]))
    (folder / "__planted.distcp").write_bytes(data)
    item.update(file="__planted.distcp", start=0, length=len(data),
                crc32c=google_crc32c.Checksum(data).digest().hex(), record=None)
    (folder / METADATA_NAME).write_text(json.dumps(doc))


class Evil:
    def __reduce__(self):
        return (print, ("unpickled",))


def test_a_planted_pickle_in_a_non_tensor_item_is_refused_unrun(pulled, capsys):
    import io

    buf = io.BytesIO()
    torch.save({"lr": Evil()}, buf, pickle_module=pickle)
    opt = pulled / "optimizer_0"
    _rewrite(opt, lambda item: item["type"] == "bytes", buf.getvalue())
    with pytest.raises(IntegrityError, match="not plain data"):
        check_dcp_folders(pulled)
    assert "unpickled" not in capsys.readouterr().out


def test_a_tensor_item_that_is_not_a_bare_tensor_is_refused(pulled):
    import io

    buf = io.BytesIO()
    torch.save({"t": torch.zeros(4)}, buf)
    _rewrite(pulled / "pytorch_model_fsdp_0", lambda item: item["type"] == "tensor", buf.getvalue())
    with pytest.raises(IntegrityError, match="not a saved tensor|storage record"):
        check_dcp_folders(pulled)


def test_flipped_bytes_and_shards_without_json_metadata_are_refused(pulled):
    shard = pulled / "pytorch_model_fsdp_0" / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="crc32c"):
        check_dcp_folders(pulled)
    (pulled / "pytorch_model_fsdp_0" / METADATA_NAME).unlink()
    with pytest.raises(IntegrityError, match=f"without {METADATA_NAME}"):
        check_dcp_folders(pulled)


def test_a_listed_pickled_metadata_is_never_what_dcp_reads(pulled, tmp_path):
    # a checkpoint listing its own ``.metadata`` (a pickle): the pull removes it and writes ours from the JSON
    planted = pickle.dumps(Evil())
    (pulled / "optimizer_0" / ".metadata").write_bytes(planted)
    (pulled / ".cloudckpt.json").unlink()
    remote = str(tmp_path / "store2")
    with CheckpointStore(remote) as store:
        store.push(pulled, step=4, meta={"framework": "hf", "format": "torch-dcp-folders"})
        store.pull("latest", to=tmp_path / "again")
    assert (tmp_path / "again" / "optimizer_0" / ".metadata").read_bytes() != planted
    check_dcp_folders(tmp_path / "again")


@given(world=st.integers(1, 8), data=st.data())
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_every_file_of_a_checkpoint_is_stored_by_exactly_one_rank(tmp_path_factory, world, data):
    # what a Trainer under FSDP writes into checkpoint-N on `world` ranks: each rank's shards (one or more files per
    # DCP folder) and rng state, rank 0's .metadata per folder and the rest; the ranks' files partition it
    from cloudckpt.hf.callback import SKIPPED
    from cloudckpt.hf.sharded import owned

    folder = tmp_path_factory.mktemp("ckpt")
    subs = data.draw(st.lists(st.sampled_from(["pytorch_model_fsdp_0", "optimizer_0", "pytorch_model_fsdp_1"]),
                              unique=True))
    names = [f"{sub}/__{r}_{n}.distcp" for sub in subs for r in range(world)
             for n in range(data.draw(st.integers(1, 2)))]
    names += [f"rng_state_{r}.pth" for r in range(world)] if world > 1 else ["rng_state.pth"]
    names += data.draw(st.lists(st.sampled_from(["trainer_state.json", "scheduler.pt", "config.json",
                                                 "model.safetensors", "training_args.bin"]), unique=True))
    for name in names + [f"{sub}/.metadata" for sub in subs]:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"x")
    parts = [owned(folder, r, SKIPPED) for r in range(world)]
    assert sum(len(p) for p in parts) == len({k for p in parts for k in p})  # no file stored twice
    assert {k for p in parts for k in p} == {n for n in names if n != "training_args.bin"}
    for r, part in enumerate(parts):  # a rank stores its own shards and rng state only; rank 0 the rest
        assert all(f"__{r}_" in k or k == f"rng_state_{r}.pth" or r == 0 for k in part)


def test_a_listed_folder_named_metadata_is_an_integrity_error_and_leaves_nothing(pulled, tmp_path):
    (pulled / "optimizer_0" / ".metadata").unlink()
    (pulled / "optimizer_0" / ".metadata").mkdir()
    (pulled / "optimizer_0" / ".metadata" / "x").write_bytes(b"x")
    (pulled / ".cloudckpt.json").unlink()
    with CheckpointStore(str(tmp_path / "store3")) as store:
        store.push(pulled, step=4, meta={"framework": "hf", "format": "torch-dcp-folders"})
        with pytest.raises(IntegrityError, match="is a folder where DCP reads its metadata"):
            store.pull("latest", to=tmp_path / "again")
    assert not (tmp_path / "again").exists()
