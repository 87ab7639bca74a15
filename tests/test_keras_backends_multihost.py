"""Multi-host JAX: `keras.distribution` over ``jax.distributed``, two real processes on the CPU (JAX's gloo
collectives, coordinator on 127.0.0.1). Process 0 claims the run and commits; the other writes no index or
manifest (under ModelParallel it stores its own shards, see test_keras_jax_shards.py).

- DataParallel: every variable whole in each process; both killed, a restart on one process resumes.
- ModelParallel with the Dense kernels split across the two processes: each process stores its shards and process
  0 commits (collectives both processes enter), a SIGTERM to ONE process stops both at the same batch boundary
  with exit 143 after process 0's commit, and the checkpoint resumes on two processes (re-split) and on one.

Keras 3.15 + jax 0.10.2 on the CPU: ModelParallel training itself (without any checkpoint callback) aborts in gloo
at the last batch of the training data ("Received data size doesn't match expected size. Is there a distributed
collective mismatch"), so the model-parallel runs here stop before step 22 (the data has 23 batches).
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import signal
import socket
from pathlib import Path

import pytest

from cloudckpt.errors import ConfigurationError
from cloudckpt.keras.distributed import WorkerRole, role_from_processes
from cloudckpt.store import CheckpointStore

needs_jax = pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="jax is not installed")


def test_process_zero_is_the_writer():
    assert role_from_processes(0, 2).is_chief
    assert not role_from_processes(1, 2).is_chief
    assert role_from_processes(1, 2) == WorkerRole("worker", 1, has_chief=False, num_workers=2)
    assert role_from_processes(0, 1) == WorkerRole()
    with pytest.raises(ConfigurationError, match="not one of the job's 2 processes"):
        role_from_processes(2, 2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@needs_jax
def test_two_data_parallel_processes_killed_then_one_resumes_from_process_zeros_commit(tmp_path):
    from test_keras_backends import finish, start

    store = str(tmp_path / "store")
    common = ["--remote", store, "--weights-only", "--save-freq", "5", "--shuffle", "--epochs", "2"]
    port = free_port()
    procs = []
    for i in range(2):
        (tmp_path / f"p{i}").mkdir()
        procs.append(start(tmp_path / f"p{i}", "jax", *common, "--filepath", "ckpt/m.weights.h5",
                           "--jax-processes", f"127.0.0.1:{port},2,{i}", *(["--kill-at", "31"] if i == 0 else [])))
    first = finish(procs[0])  # SIGKILLs itself after step 31, once step 30's checkpoint is committed
    assert first.rc == -signal.SIGKILL, first.err
    procs[1].kill()  # the other process waits in a collective for its dead peer
    other = finish(procs[1])
    assert "is not the chief: restoring from" in other.err
    assert "committed" not in other.err and "claimed" not in other.err, "only process 0 writes the store"
    assert re.search(r"committed ckpt-e000002-s0000000030", first.err)
    split = int(re.search(r"^SPLIT (\d+)$", first.out, re.M).group(1))
    assert split == 0, "data parallel: every variable whole in each process"

    (tmp_path / "alone").mkdir()
    alone = finish(start(tmp_path / "alone", "jax", *common, "--filepath", "ckpt/m.weights.h5"))  # one process now
    assert alone.rc == 0, alone.err
    assert re.search(r"resumed from ckpt-e000002-s0000000030-\w+ .*: epoch 2, 7 batches into it", alone.err)
    assert alone.steps[0] == 31 and alone.steps[-1] == 46


def pair(tmp: Path, name: str, *args: str, kill0: int | None = None) -> list:
    """Start processes 0 and 1 of a model-parallel job in ``tmp/name/p0`` and ``p1``."""
    port, procs = free_port(), []
    from test_keras_backends import start

    for i in range(2):
        (tmp / name / f"p{i}").mkdir(parents=True)
        procs.append(start(tmp / name / f"p{i}", "jax", *args, "--model-parallel", "--jax-processes",
                           f"127.0.0.1:{port},2,{i}", *(["--kill-at", str(kill0)] if i == 0 and kill0 else [])))
    return procs


@needs_jax
def test_model_parallel_sigterm_to_one_process_then_resume_on_two_and_on_one(tmp_path):
    from test_keras_backends import finish, start
    from test_keras_jax_shards import shard_values

    common = ["--weights-only", "--save-freq", "5", "--shuffle", "--filepath", "ckpt/m.weights.h5"]
    preempted = pair(tmp_path, "pre", "--remote", str(tmp_path / "store"), *common)
    out = []
    for line in preempted[1].stdout:  # process 1 alone gets a real SIGTERM at step 7
        out.append(line)
        if line.strip() == "STEP 7":
            preempted[1].send_signal(signal.SIGTERM)
            break
    other = finish(preempted[1], "".join(out))
    first = finish(preempted[0])
    assert (first.rc, other.rc) == (143, 143), first.err + other.err
    assert re.search(r"^SPLIT [1-9]", first.out, re.M), "the Dense kernels are split across the processes"
    at = re.search(r"preemption \(another process's preemption notice\): checkpoint (\S+) at step (\d+) "
                   r"committed", first.err)
    assert at, first.err
    stop = int(at.group(2))
    assert first.steps[-1] == other.steps[-1] == stop >= 7, "both stopped at the same batch boundary"
    assert "committed ckpt-e000001-s0000000005" in first.err, "a save with split variables (shards) commits"
    assert "committed" not in other.err and "claimed" not in other.err, "only process 0 commits"
    values, paths = shard_values(CheckpointStore(str(tmp_path / "store")), 5, tmp_path / "pulled")
    kernel = next(v for k, v in values.items() if paths[k] == "sequential/dense/kernel")
    assert kernel.shape == (64, 32), "both processes' parts of the kernel, each stored by its own process"

    # resume on two processes (the whole arrays split again) until step 12, and on one process to the end
    shutil.copytree(tmp_path / "store", tmp_path / "store-one")
    (tmp_path / "one").mkdir()
    two = pair(tmp_path, "two", "--remote", str(tmp_path / "store"), *common, kill0=12)
    one = start(tmp_path / "one", "jax", "--remote", str(tmp_path / "store-one"), *common)
    r0 = finish(two[0])  # SIGKILLs itself after step 12, once step 10 is committed
    two[1].kill()
    r1 = finish(two[1])
    alone = finish(one)
    assert r0.rc == -signal.SIGKILL, r0.err
    for r in (r0, r1, alone):
        assert re.search(rf"resumed from {at.group(1)} .*: epoch 1, {stop} batches into it", r.err), r.err
    assert r0.steps[0] == r1.steps[0] == alone.steps[0] == stop + 1 and r0.steps[-1] == 12
    assert re.search(r"committed ckpt-e000001-s0000000010", r0.err), "the resumed pair trains and saves on"
    assert alone.rc == 0 and alone.steps[-1] == 3 * 23, alone.err


def test_a_notice_arriving_during_the_vote_counts_at_the_next_boundary_on_every_process(tmp_path):
    """The per-batch preemption vote is a collective: this process must act on what the vote decided, not on its
    flag read again after it. A SIGTERM landing while the vote runs (seen in a CI run: process 1 staged and gathered
    while process 0 trained on, both hung in gloo) must count at the next boundary, for every process alike."""
    from cloudckpt.keras import CloudCheckpoint
    from cloudckpt.preemption import PreemptionWatch

    votes: list[bool] = []

    class Vote:  # this process's side of the collective; the other process voted False at this boundary
        def any_process(self, flag: bool) -> bool:
            votes.append(flag)
            if len(votes) == 1:
                watch.trigger("SIGTERM")  # arrives while the collective runs
            return flag

    cb = CloudCheckpoint(str(tmp_path / "m.weights.h5"), remote=str(tmp_path / "store"))
    watch = PreemptionWatch(["sigterm"])  # not started: no handler installed
    cb._watch, cb._adapter = watch, Vote()
    assert cb._preemption_agreed() is False  # what the vote decided, which the other process also got
    assert cb._preemption_agreed() is True  # the next boundary: this process's flag is in the vote
    assert votes == [False, True]
