"""The ranks of a ``torch.distributed`` job, as :class:`~cloudckpt.torch.CheckpointManager` sees them.

Under ``torchrun`` (``torch.distributed`` initialised, more than one process) every rank opens a manager; rank 0 is
the coordinator: it alone claims the run, writes a replicated state and commits. The ranks talk over a gloo group of
their own (:class:`Ranks`, created when the managers open: a collective), only from the training thread and only
inside the manager's collective calls, in the same order on every rank. What they exchange is small: a flag, a
notice's age, a checkpoint id or a commit's outcome, as JSON text in a byte tensor (nothing is unpickled).

A state holding a ``DTensor`` (FSDP2 ``fully_shard``, tensor parallel) is sharded: it is saved through
:mod:`cloudckpt.torch.dcp` (every rank uploads its own shards, the coordinator commits one checkpoint) and loaded
in place with DCP.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from .. import errors
from ..errors import CloudCkptError, IntegrityError, SaveFailure, StaleWriterError

if TYPE_CHECKING:
    from ..preemption import PreemptionWatch

log = logging.getLogger(__name__)


class Ranks:
    """This process's place in the job (``rank``, ``world``) and the manager's own gloo group.

    Every method is a collective: each rank calls it at the same point of its loop.
    """

    def __init__(self, timeout: float = 1800.0) -> None:
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        # our own group: CPU tensors whatever the default backend (NCCL), and no interleaving with the model's traffic
        self.group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout))

    @property
    def coordinator(self) -> bool:
        return self.rank == 0

    def max(self, value: float) -> float:
        """The largest ``value`` of all ranks (one all_reduce of 8 bytes)."""
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return float(t.item())

    def all_true(self, flag: bool) -> bool:
        """True only if ``flag`` is true on every rank."""
        return self.max(0.0 if flag else 1.0) == 0.0

    def share(self, value: Any = None) -> Any:
        """Rank 0's ``value`` (JSON data) on every rank; the others' argument is ignored."""
        if self.coordinator:
            data = torch.frombuffer(bytearray(json.dumps(value).encode()), dtype=torch.uint8)
            size = torch.tensor([data.numel()], dtype=torch.int64)
        else:
            size = torch.zeros(1, dtype=torch.int64)
        dist.broadcast(size, src=0, group=self.group)
        if not self.coordinator:
            data = torch.empty(int(size.item()), dtype=torch.uint8)
        dist.broadcast(data, src=0, group=self.group)
        return json.loads(bytes(data.numpy()).decode())

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value`` (JSON data), in rank order, on every rank."""
        data = torch.frombuffer(bytearray(json.dumps(value).encode()), dtype=torch.uint8)
        size = torch.tensor([data.numel()], dtype=torch.int64)
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world)]
        dist.all_gather(sizes, size, group=self.group)
        longest = max(int(s.item()) for s in sizes)
        padded = torch.zeros(longest, dtype=torch.uint8)
        padded[:data.numel()] = data
        out = [torch.empty(longest, dtype=torch.uint8) for _ in range(self.world)]
        dist.all_gather(out, padded, group=self.group)
        return [json.loads(bytes(t[:int(n.item())].numpy()).decode()) for t, n in zip(out, sizes, strict=True)]

    def close(self) -> None:
        try:
            dist.destroy_process_group(self.group)
        except Exception as exc:  # noqa: BLE001 - the default group may be gone already (the job is ending)
            log.debug("could not destroy the manager's process group: %s", exc)


def agreed_notice(ranks: Ranks, watch: PreemptionWatch) -> float | None:
    """The earliest preemption notice of any rank, as this process's ``time.monotonic()``, or None when no rank has
    one (a collective: one 8-byte all_reduce(MAX) of "seconds since my notice, or -1"). Every rank gets the same
    answer at the same call, so every rank acts at the same step."""
    local = watch.notice_time if watch.triggered else None
    age = ranks.max(-1.0 if local is None else time.monotonic() - local)
    return time.monotonic() - age if age >= 0 else None


def detect(distributed: bool | None) -> Ranks | None:
    """The job's :class:`Ranks` when ``torch.distributed`` is initialised with more than one process (``distributed``
    None: detect; True: required; False: act as a single process)."""
    running = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if distributed is True and not running:
        raise errors.ConfigurationError("distributed=True, but torch.distributed is not initialised with more than "
                                        "one process (call dist.init_process_group first, e.g. under torchrun)")
    return Ranks() if running and distributed is not False else None


def is_sharded(state: Any) -> bool:
    """True when a leaf of ``state`` is a ``DTensor`` (FSDP2, tensor parallel): the state is saved through DCP."""
    if not dist.is_available():
        return False
    from torch.distributed.tensor import DTensor

    if isinstance(state, DTensor):
        return True
    if isinstance(state, Mapping):
        return any(is_sharded(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return any(is_sharded(v) for v in state)
    return False


def failure_record(f: SaveFailure) -> dict[str, Any]:
    return {"epoch": f.epoch, "step": f.step, "label": f.label, "error": None if f.error is None else str(f.error),
            "type": None if f.error is None else type(f.error).__name__}


def failure_from(record: Mapping[str, Any]) -> SaveFailure:
    """A failure rank 0 reported, as another rank sees it (the error rebuilt as its cloudckpt type when it has one)."""
    err: BaseException | None = None
    if record.get("error") is not None:
        err = error_from(record)
    return SaveFailure(record.get("epoch"), record.get("step"), str(record.get("label")), err)


def error_record(exc: BaseException) -> dict[str, Any]:
    return {"type": type(exc).__name__, "error": str(exc)}


def error_from(record: Mapping[str, Any]) -> BaseException:
    """The typed error another rank reported (its cloudckpt class if it is one, else a CloudCkptError), naming that
    rank (``record["rank"]``, default 0)."""
    cls = getattr(errors, str(record.get("type")), None)
    message = f"rank {record.get('rank', 0)}: {record.get('error')}"
    if isinstance(cls, type) and issubclass(cls, CloudCkptError) and cls is not errors.CommitFailedError:
        try:
            return cls(message)
        except TypeError:
            pass
    return CloudCkptError(message)


def unwrap_dcp_error(exc: BaseException) -> BaseException:
    """The cloudckpt error inside DCP's ``CheckpointException`` (a StaleWriterError first), else ``exc``."""
    found = [e for e, _ in (getattr(exc, "failures", None) or {}).values() if isinstance(e, BaseException)]
    for e in found:
        if isinstance(e, StaleWriterError):
            return e
    for e in found:
        if isinstance(e, CloudCkptError):
            return e
    return exc


def read_failed(exc: BaseException | None) -> BaseException:
    return exc if exc is not None else IntegrityError("another rank could not read this checkpoint")


def open_store(remote: str | None, ranks: Ranks | None, budget: float, options: Mapping[str, Any]) -> Any:
    """The manager's store. One process: its own, claiming the run. Under ``torch.distributed``: the job's store
    (:func:`~cloudckpt.distributed_commit.job_store`, shared with the DCP plugin), claimed by rank 0 only."""
    from ..distributed_commit import job_store
    from ..store import CheckpointStore

    if ranks is None:
        store = CheckpointStore(remote, budget=budget, **options)
        store.claim()
        return store
    return job_store(remote, claim=ranks.coordinator, budget=budget, **options)
