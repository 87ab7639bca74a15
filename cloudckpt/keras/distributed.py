"""Who writes the store in multi-worker training: the chief rule, decided from the strategy or ``TF_CONFIG``.

Under `tf.distribute.MultiWorkerMirroredStrategy` every worker runs the same script with the same callbacks. Only
one of them may claim the run, upload checkpoints and write the index — the chief: the task of type ``"chief"``
when the cluster has one, else worker 0 (TensorFlow's own rule, ``multi_worker_util.is_chief``). Unlike TensorFlow's
rule, an ``"evaluator"`` (or ``"ps"``) task is never the writer here: it does not train the run's state.

Every worker restores the same checkpoint on resume, with no extra coordination: each worker resolves the store's
``latest`` at the start of ``fit``, before its first training step. The chief commits nothing new before the first
save point, and no save point can be reached before every worker has joined the first step's gradient all-reduce —
which each worker does only after it has resolved ``latest``. So all workers read the same ``latest`` (S3, GCS and
the local store give read-after-write consistency), provided the previous incarnation's processes are gone (a
surviving old chief is fenced out of the index by the new chief's claim, see :mod:`cloudckpt.commit`).

Keras 3's `ModelCheckpoint` (unlike tf.keras 2) writes every worker's file to ``filepath`` itself, with no per-worker
temporary directory; non-chief workers keep doing exactly that, so on a shared file system give each worker its own
checkpoint folder. Every worker also reads the resume state at each save point and drops it: Keras' metric variables
are sync-on-read, so reading them is a collective all-reduce that every worker must join in the same order.

Not covered under MultiWorkerMirroredStrategy: preemption checkpoints and mid-epoch resume (integer ``save_freq``)
are untested there. A preemption notice reaches each worker at its own batch, and the chief's preemption checkpoint
reads the state (a collective) at a point the other workers don't, so training stalls until TensorFlow's collective
timeout fails it; a restart then resumes from the latest committed checkpoint.

JAX (`keras.distribution` over ``jax.distributed``, the multi-host path Keras documents): every process runs the
same script; process 0 claims the run and commits (:func:`jax_role`). Everything that needs the other processes is
a collective that every process enters at the same point of the same callback hook, in the same order, or the
processes deadlock (gloo on the CPU fails with a collective mismatch or a timeout instead):

- Nothing split (``DataParallel``, or a layout that keeps every variable whole on each process): process 0 saves
  Keras' own file and uploads it; the others save their local files as Keras does and never write the store.
- Variables split across processes (``ModelParallel`` with a layout that shards a kernel over devices of different
  processes; Keras 3.15's own save can't read such a value: ``RuntimeError: Fetching value for `jax.Array` that
  spans non-addressable ... devices is not possible``): nothing is gathered and no Keras file is written. At each
  save point every process stores the shards it holds and process 0 commits one checkpoint listing every
  process's object (:mod:`cloudckpt.keras.shards`, switched on by
  :meth:`~cloudckpt.keras.trainers.TrainerAdapter.sharded_saves` when a model or optimizer variable is split);
  a restart under any number of processes and layout reads only the shards its devices need and assigns them in
  the variables' current layout (:mod:`cloudckpt.keras.shard_restore`). No host ever holds the whole model. The
  save runs on the training thread (three small collectives: the checkpoint id, what each process stored, process
  0's outcome), so every process waits for its own upload and process 0's commit. Only the training metrics'
  accumulators (replicated scalars) are still read whole (:func:`jax_gather` if one were split).
- Preemption: a notice (SIGTERM, a cloud's metadata) reaches one process, or each at its own batch. At every batch
  boundary (and epoch end) the processes agree whether any of them has one (:func:`jax_any`, an all-gather of one
  flag), so all of them checkpoint at the same batch and stop; process 0 commits. Measured ~8 ms per batch for two
  processes over gloo on one loaded 2-core machine; nothing when ``preemption=None`` or on one process.

Tested with two processes on the CPU (gloo): data parallel killed and resumed on one process; model parallel
preempted by a SIGTERM to one process (both stop at the same batch, exit 143), resumed on two processes and on one;
model parallel saved on two processes and restored bit-identical on two with another layout and on one, a SIGKILL of
one process mid-upload listing nothing (``tests/test_keras_jax_shards.py``). Not shown: that a two-process resume
trains on bit-identical to an uninterrupted run (one comparison at step 15 differed in the last bits of a kernel;
whether two uninterrupted model-parallel runs agree bit for bit on gloo was not checked).
Keras 3.15's ModelParallel fit itself (no callback) aborts in gloo at the last batch of the training data on the
CPU ("Received data size doesn't match expected size"), so that test stops before it.

Known upstream limit (Keras 3.15, TensorFlow 2.21): ``model.fit`` under a two-worker MultiWorkerMirroredStrategy
fails before the first step with ``ValueError: Attempt to convert a value (PerReplica:{...}) with an unsupported
type (<class '...PerReplica'>) to a Tensor.`` (keras-team/keras#20585, tensorflow/tensorflow#72388); once past
that, scalar logs fail in the step with ``Invalid reduction dimension 0 for input with 0 dimensions``. Both are in
Keras' TensorFlow trainer, not in cloudckpt; ``tests/support/mwms_job.py`` carries the two-function shim the
multi-worker test runs under.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ConfigurationError

log = logging.getLogger(__name__)

_WRITER_TYPES = ("chief", "worker")


@dataclass(frozen=True)
class WorkerRole:
    """This process's place in a (possibly multi-worker) training cluster.

    Attributes:
        task_type: ``"chief"``, ``"worker"``, ``"evaluator"``, ``"ps"``, or None outside a cluster.
        task_id: the task's index within its type. 0 outside a cluster.
        has_chief: whether the cluster names a ``"chief"`` task.
        num_workers: training tasks in the cluster (chief + workers); 1 outside a cluster.
    """

    task_type: str | None = None
    task_id: int = 0
    has_chief: bool = False
    num_workers: int = 1

    @property
    def is_chief(self) -> bool:
        """True for the one task that claims the run, uploads and writes the index."""
        if self.task_type is None:
            return True
        if self.task_type == "chief":
            return True
        return self.task_type == "worker" and self.task_id == 0 and not self.has_chief


def role_from_cluster(cluster: Mapping[str, Any] | None, task_type: str | None, task_id: int | None) -> WorkerRole:
    """The role of task ``(task_type, task_id)`` in ``cluster`` (``{"worker": ["host:port", ...], ...}``).

    Raises:
        ConfigurationError: a task that the cluster does not list.
    """
    cluster = dict(cluster or {})
    if not cluster or task_type is None:
        return WorkerRole()
    tasks = cluster.get(task_type)
    index = 0 if task_id is None else task_id
    if not isinstance(index, int) or isinstance(index, bool):
        raise ConfigurationError(f"the task index must be an integer. Received: task_id={task_id!r}")
    n = len(tasks) if isinstance(tasks, (list, tuple, dict)) else 0
    if isinstance(tasks, dict):  # a sparse cluster spec: {index: address}
        listed = index in tasks or str(index) in tasks
    else:
        listed = 0 <= index < n
    if not listed:
        raise ConfigurationError(f"task {task_type}:{index} is not in the cluster {sorted(cluster)} "
                                 f"({n} {task_type} task(s))")
    workers = sum(len(cluster.get(t) or ()) for t in _WRITER_TYPES)
    return WorkerRole(task_type=task_type, task_id=index, has_chief=bool(cluster.get("chief")),
                      num_workers=max(workers, 1))


def role_from_tf_config(tf_config: str | Mapping[str, Any] | None) -> WorkerRole:
    """The role a ``TF_CONFIG`` value (JSON text or its parsed dict) gives this process. None or empty: single process.

    Example:
        >>> role_from_tf_config('{"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 1}}')
        WorkerRole(task_type='worker', task_id=1, has_chief=False, num_workers=2)
        >>> _.is_chief
        False

    Raises:
        ConfigurationError: text that is not a JSON object, or a task the cluster does not list.
    """
    if tf_config is None or (isinstance(tf_config, str) and not tf_config.strip()):
        return WorkerRole()
    if isinstance(tf_config, str):
        try:
            tf_config = json.loads(tf_config)
        except ValueError as exc:
            raise ConfigurationError(f"TF_CONFIG is not valid JSON: {exc}. Received: {str(tf_config)[:200]!r}") from exc
    if not isinstance(tf_config, Mapping):
        raise ConfigurationError(f"TF_CONFIG must be a JSON object. Received: {tf_config!r}")
    task = tf_config.get("task") or {}
    if not isinstance(task, Mapping):
        raise ConfigurationError(f"TF_CONFIG's task must be an object. Received: task={task!r}")
    return role_from_cluster(tf_config.get("cluster"), task.get("type"), task.get("index"))


def role_from_processes(index: int, count: int) -> WorkerRole:
    """The role of process ``index`` of ``count`` in a multi-controller job (JAX's ``jax.distributed``, which Keras'
    `keras.distribution.initialize` starts): process 0 writes, as JAX's own checkpointing (Orbax) has it.

    Example:
        >>> role_from_processes(1, 2).is_chief
        False

    Raises:
        ConfigurationError: an index outside ``range(count)``.
    """
    if count <= 1:
        return WorkerRole()
    if not 0 <= index < count:
        raise ConfigurationError(f"process {index} is not one of the job's {count} processes")
    return WorkerRole(task_type="worker", task_id=index, has_chief=False, num_workers=count)


def jax_role() -> WorkerRole:
    """This process's role in a JAX job: from ``jax.process_index()`` / ``jax.process_count()`` (one process unless
    ``jax.distributed`` was initialized)."""
    import jax

    role = role_from_processes(jax.process_index(), jax.process_count())
    log.debug("JAX process role %s (chief: %s)", role, role.is_chief)
    return role


def current_role(strategy: Any = None, environ: Mapping[str, str] | None = None) -> WorkerRole:
    """This process's role: from ``strategy.cluster_resolver`` when the strategy has one (MultiWorkerMirroredStrategy
    does, whatever resolver it was built with), else from ``TF_CONFIG`` in ``environ`` (default ``os.environ``).
    """
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is not None and getattr(resolver, "task_type", None) is not None:
        spec = resolver.cluster_spec()
        cluster = spec.as_dict() if hasattr(spec, "as_dict") else dict(spec)
        role = role_from_cluster(cluster, resolver.task_type, resolver.task_id)
    else:
        role = role_from_tf_config((os.environ if environ is None else environ).get("TF_CONFIG"))
    log.debug("worker role %s (chief: %s)", role, role.is_chief)
    return role


def jax_any(flag: bool) -> bool:
    """True on every process of a JAX job when ``flag`` is True on any of them: a collective (an all-gather of one
    flag) that every process must enter at the same point; no collective in a single-process job."""
    import jax

    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.asarray(int(bool(flag)), dtype=np.int32))))


def spans_processes(value: Any) -> bool:
    """Whether ``value`` is a `jax.Array` split across devices of more than one process (no process holds it
    whole). A value replicated on every device is readable anywhere."""
    return (not getattr(value, "is_fully_addressable", True)) and not getattr(value, "is_fully_replicated", True)


def jax_gather(values: list[Any]) -> list[np.ndarray]:
    """The whole value of each `jax.Array` in ``values`` on this host: a collective (one all-gather per array)
    that every process must enter with the same list, in the same order."""
    if not values:
        return []
    from jax.experimental import multihost_utils

    return [np.asarray(a) for a in multihost_utils.process_allgather(list(values), tiled=True)]
