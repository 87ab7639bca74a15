"""Multi-worker training: only the chief writes the store; every worker restores the same checkpoint.

The chief rule is a pure function of TF_CONFIG / the strategy's cluster resolver (unit tests below). The
integration test runs two real worker processes of a `tf.distribute.MultiWorkerMirroredStrategy` on 127.0.0.1
(``tests/support/mwms_job.py``, which carries a shim for keras-team/keras#20585 — Keras 3.15's ``fit`` fails under
multi-worker MWMS without it), SIGKILLs both mid-run, restarts both, and checks who wrote what.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import types
from pathlib import Path

import pytest

from cloudckpt.errors import ConfigurationError
from cloudckpt.keras.distributed import WorkerRole, current_role, role_from_tf_config

JOB = str(Path(__file__).parent / "support" / "mwms_job.py")


def cfg(cluster, task_type, index):
    return json.dumps({"cluster": cluster, "task": {"type": task_type, "index": index}})


TWO = {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}
WITH_CHIEF = {"chief": ["127.0.0.1:0"], "worker": ["127.0.0.1:1", "127.0.0.1:2"], "evaluator": ["127.0.0.1:3"]}


@pytest.mark.parametrize("tf_config, chief", [
    (None, True),                                   # no cluster: a single process writes
    ("", True),
    (json.dumps({"cluster": TWO}), True),           # a cluster but no task: not multi-worker for us
    (cfg(TWO, "worker", 0), True),                  # no chief task: worker 0 is the chief
    (cfg(TWO, "worker", 1), False),
    (cfg(WITH_CHIEF, "chief", 0), True),
    (cfg(WITH_CHIEF, "worker", 0), False),          # a chief exists: worker 0 is an ordinary worker
    (cfg(WITH_CHIEF, "worker", 1), False),
    (cfg(WITH_CHIEF, "evaluator", 0), False),       # TensorFlow calls the evaluator a chief; it never writes here
    ({"cluster": TWO, "task": {"type": "worker", "index": 1}}, False),  # already parsed
])
def test_chief_rule_from_tf_config(tf_config, chief):
    assert role_from_tf_config(tf_config).is_chief is chief


def test_role_records_the_cluster():
    assert role_from_tf_config(cfg(WITH_CHIEF, "worker", 1)) == WorkerRole("worker", 1, has_chief=True, num_workers=3)


@pytest.mark.parametrize("tf_config", [
    "{not json", "[1, 2]", cfg(TWO, "worker", 2), cfg(TWO, "chief", 0), cfg(TWO, "worker", -1),
    cfg(TWO, "worker", "0"), json.dumps({"cluster": TWO, "task": "worker"}),
])
def test_bad_tf_config_is_a_configuration_error(tf_config):
    with pytest.raises(ConfigurationError):
        role_from_tf_config(tf_config)


def test_the_strategy_resolver_wins_over_tf_config():
    tf = pytest.importorskip("tensorflow")
    resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(tf.train.ClusterSpec(TWO), task_type="worker",
                                                                    task_id=1)
    strategy = types.SimpleNamespace(cluster_resolver=resolver)  # what MultiWorkerMirroredStrategy exposes
    assert current_role(strategy, {"TF_CONFIG": cfg(TWO, "worker", 0)}) == WorkerRole("worker", 1, num_workers=2)
    assert not current_role(strategy, {}).is_chief
    # the default strategy has no resolver: TF_CONFIG decides
    assert not current_role(tf.distribute.get_strategy(), {"TF_CONFIG": cfg(TWO, "worker", 1)}).is_chief
    assert current_role(tf.distribute.get_strategy(), {}).is_chief


# --- two real workers ---------------------------------------------------------------------------------------------

def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class Cluster:
    """Two worker processes of one MultiWorkerMirroredStrategy, each with its own checkpoint folder."""

    def __init__(self, tmp: Path, tag: str, remote: str, *args: str):
        ports = ",".join(map(str, free_ports(2)))
        self.procs, self.out = [], [[], []]
        for i in range(2):
            err = open(tmp / f"{tag}-w{i}.stderr", "w+")
            proc = subprocess.Popen([sys.executable, JOB, "--index", str(i), "--ports", ports, "--remote", remote,
                                     "--dir", str(tmp / f"{tag}-w{i}" if tag == "ref" else tmp / f"w{i}"), *args],
                                    stdout=subprocess.PIPE, stderr=err, text=True,
                                    env={**os.environ, "PYTHONUNBUFFERED": "1"}, cwd=tmp)
            proc.err_file = err
            self.procs.append(proc)
        self.readers = [threading.Thread(target=self._read, args=(i,), daemon=True) for i in range(2)]
        for t in self.readers:
            t.start()

    def _read(self, i: int) -> None:
        for line in self.procs[i].stdout:
            self.out[i].append(line)

    def wait_for(self, text: str, timeout: float = 240) -> None:
        """Until both workers printed ``text`` (or one of them ended)."""
        for i, proc in enumerate(self.procs):
            while not any(line.startswith(text) for line in self.out[i]) and proc.poll() is None:
                try:
                    proc.wait(timeout=0.2)
                except subprocess.TimeoutExpired:
                    timeout -= 0.2
                    assert timeout > 0, f"worker {i} never printed {text!r}: {self.stderr(i)[-3000:]}"
            assert any(line.startswith(text) for line in self.out[i]), f"worker {i}: {self.stderr(i)[-3000:]}"

    def kill(self) -> None:
        for proc in self.procs:
            proc.kill()  # SIGKILL
        self.finish()

    def finish(self, timeout: float = 240) -> list[dict]:
        results = []
        for i, proc in enumerate(self.procs):
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            self.readers[i].join(timeout=10)
            found = [json.loads(line[len("RESULT "):]) for line in self.out[i] if line.startswith("RESULT ")]
            results.append({"rc": proc.returncode, **(found[0] if found else {})})
        return results

    def stderr(self, i: int) -> str:
        f = self.procs[i].err_file
        f.flush()
        f.seek(0)
        text = f.read()
        return "\n".join(line for line in text.splitlines() if not re.match(r"^[IWE]0000 ", line))


def test_two_workers_killed_and_restarted_resume_together_and_only_the_chief_writes(tmp_path, local_url):
    from cloudckpt.store import CheckpointStore

    # Run 1: both workers train, the chief commits epochs 1 and 2, both are SIGKILLed while training is stuck after 2.
    first = Cluster(tmp_path, "run1", local_url, "--epochs", "4", "--hang-after-epoch", "2")
    first.wait_for("HANG 2")  # the chief prints it only after its commit of epoch 2
    first.kill()
    with CheckpointStore(local_url) as store:
        before = store.index()
    assert [c.epoch for c in before.checkpoints] == [1, 2]
    killed_chief_pid = first.procs[0].pid

    # Run 2: the same command on both workers, restarted: they resume from epoch 2 and finish epochs 3-4.
    second = Cluster(tmp_path, "run2", local_url, "--epochs", "4")
    results = second.finish()
    for i, r in enumerate(results):
        assert r["rc"] == 0, f"worker {i}: {second.stderr(i)[-3000:]}"
    chief, worker = results
    assert (chief["is_chief"], worker["is_chief"]) == (True, False)
    assert chief["resumed_from"] == worker["resumed_from"] == before.latest
    assert chief["epochs_run"] == worker["epochs_run"] == 2
    assert chief["weights_sha256"] == worker["weights_sha256"]  # a worker that restored nothing would diverge
    assert chief["local_file"] and worker["local_file"]  # Keras wrote each worker's own file
    assert (tmp_path / "w1" / "model.weights.h5").exists()

    with CheckpointStore(local_url) as store:
        after = store.index()
    assert [c.epoch for c in after.checkpoints][-2:] == [3, 4]
    writer_pids = {int(c.writer.split(":")[1]) for c in after.checkpoints}
    assert writer_pids == {killed_chief_pid, second.procs[0].pid}  # never a non-chief worker's
    assert after.writer.id == chief["writer_id"] != worker["writer_id"]
    assert after.writer.generation == 2  # claimed once per chief incarnation, never by the other worker

    # An uninterrupted two-worker run ends with the same weights, bit for bit.
    ref = Cluster(tmp_path, "ref", str(tmp_path / "ref-store"), "--epochs", "4").finish()
    assert ref[0]["rc"] == ref[1]["rc"] == 0
    assert ref[0]["weights_sha256"] == chief["weights_sha256"]
