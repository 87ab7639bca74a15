"""Multi-host JAX: `keras.distribution` over ``jax.distributed``, two real processes on the CPU (JAX's gloo
collectives, coordinator on 127.0.0.1). Process 0 claims the run and commits; the other never writes the store; every
variable is whole in each process, so a restart on another number of processes resumes from the same checkpoint.
(Variables split across processes by ModelParallel are not supported: see cloudckpt/keras/distributed.py.)"""

from __future__ import annotations

import importlib.util
import re
import signal
import socket
import sys
from pathlib import Path

import pytest

from cloudckpt.errors import ConfigurationError
from cloudckpt.keras.distributed import WorkerRole, role_from_processes

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

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
