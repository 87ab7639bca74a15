"""CloudModelParallelStrategy: Lightning's ``ModelParallelStrategy`` (FSDP2 / tensor parallel) whose sharded
checkpoints are committed to a store through the DCP plugin (:mod:`cloudckpt.torch.dcp`) instead of a local folder.

Lightning's own strategy writes ``dcp.save(checkpoint_id=path)`` into a local directory and ``torch.save`` of the rest
of the checkpoint to ``path/meta.pt``, bypassing the CheckpointIO; its load unpickles ``meta.pt``. Here every rank
uploads its own shards and rank 0 commits ONE checkpoint (one index compare-and-swap) holding the model and optimizer
shards and the rest of Lightning's checkpoint dict (loops, callbacks, schedulers, hyperparameters) as one item of
plain data, read back with ``torch.load(weights_only=True)``: nothing from the store is unpickled as an object.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.checkpoint import save as dcp_save

from ..errors import CheckpointNotFoundError, ConfigurationError, IntegrityError
from ..metrics import finite_metrics
from ..store import CheckpointStore
from ..torch.dcp import CloudStorageReader, CloudStorageWriter, load
from ..torch.ranks import unwrap_dcp_error
from ..torch.state import copy_to_cpu
from .checkpoint_io import monitored, scores_of

log = logging.getLogger(__name__)

FRAMEWORK = "lightning-sharded"
#: ``ckpt_path`` values this strategy loads: ``cloudckpt:latest``, ``cloudckpt:best`` or ``cloudckpt:<id>``
PREFIX = "cloudckpt:"
REST_KEY = "cloudckpt_rest"  # the checkpoint dict without its model and optimizer states, as weights-only bytes


class CloudModelParallelStrategy(ModelParallelStrategy):
    """``ModelParallelStrategy`` whose checkpoints are committed to the run at ``remote`` from every rank.

    Lightning's ``ModelCheckpoint`` keeps deciding when to save; each save is one ``dcp.save`` with a
    :class:`~cloudckpt.torch.dcp.CloudStorageWriter` (a collective: every rank uploads its shards, rank 0 commits),
    recorded with the epoch, step, the file name Lightning chose (``meta["name"]``) and the score of the
    monitoring callback that wrote it. A rank that fails or dies mid-save: nothing is listed, the previous checkpoint
    stays the latest. Retention is the store's (``keep_last`` ... in ``writer_options``); Lightning's removal of a
    file dropped from its top-k touches nothing in the store. Resume with
    ``trainer.fit(model, ckpt_path=strategy.resume_path())`` (None when the run has no checkpoint yet), or pass
    ``ckpt_path="cloudckpt:<id>"``; DCP reshards, so the job may have another number of ranks.

    Only tensors and plain data may be in the checkpoint dict (``hyper_parameters`` must be plain values).

    Args:
        remote: the run's URL (``s3://``, ``gs://``, ``az://``, ``file://`` or a path). Default ``$CLOUDCKPT_REMOTE``.
        writer_options: keyword arguments for each :class:`~cloudckpt.torch.dcp.CloudStorageWriter` (retention,
            ``files_per_rank``, ``budget``, storage options). Without ``monitor`` or ``policy``, the first monitoring
            ModelCheckpoint's monitor and mode rank the checkpoints. Default None.
        reader_options: keyword arguments for the :class:`~cloudckpt.torch.dcp.CloudStorageReader`. Default None.
        **kwargs: ``ModelParallelStrategy``'s (``data_parallel_size``, ``tensor_parallel_size``, ...).
    """

    def __init__(self, remote: str | None = None, *, writer_options: Mapping[str, Any] | None = None,
                 reader_options: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        if kwargs.get("save_distributed_checkpoint", True) is not True:
            raise ConfigurationError("CloudModelParallelStrategy saves sharded checkpoints only "
                                     "(save_distributed_checkpoint=False gathers to rank 0: use CloudCheckpointIO)")
        super().__init__(**kwargs)
        self.remote = remote
        self.writer_options = dict(writer_options or {})
        self.reader_options = dict(reader_options or {})
        self.committed: list[Any] = []  # on rank 0: the entries this process committed, in order

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("CloudModelParallelStrategy.save_checkpoint(..., storage_options=...) is not supported: "
                            "pass the store's options as writer_options")
        path = Path(self.broadcast(str(filepath)))
        state: dict[str, Any] = {"state_dict": checkpoint.pop("state_dict")}
        state.update({f"optimizer_{i}": s for i, s in enumerate(checkpoint.pop("optimizer_states", []))})
        state[REST_KEY] = _plain_bytes(checkpoint)
        opts = dict(self.writer_options)
        monitor, mode = monitored(checkpoint)
        if monitor and "monitor" not in opts and "policy" not in opts:
            opts.update(monitor=monitor, mode=mode)
        meta = {**opts.pop("meta", {}), "framework": FRAMEWORK, "name": path.name}
        writer = CloudStorageWriter(self.remote, step=int(checkpoint.get("global_step", 0)),
                                    epoch=int(checkpoint.get("epoch", 0)),
                                    metrics=finite_metrics(scores_of(checkpoint, path)), meta=meta, **opts)
        try:
            dcp_save(state, storage_writer=writer)
        except BaseException as exc:  # DCP's CheckpointException (a BaseException), on every rank
            error = unwrap_dcp_error(exc)
            if error is exc:
                raise
            raise error from exc  # the typed error of the rank or commit that failed: nothing was listed
        if writer.committed is not None:
            self.committed.append(writer.committed)
            log.info("committed %s (step %s) as %s", path.name, writer.committed.step, writer.committed.id)

    def remove_checkpoint(self, filepath: Any) -> None:
        """Nothing to remove: nothing was written locally, and the store's retention prunes."""

    def resume_path(self, selector: str = "latest") -> str | None:
        """The ``ckpt_path`` resuming from this strategy's ``"latest"`` (or ``"best"``) checkpoint of the run, or
        None when the run has none yet."""
        if selector not in ("latest", "best"):
            raise ConfigurationError(f"selector must be 'latest' or 'best'. Received: {selector!r}")
        with CheckpointStore(self.remote, **self.reader_options.get("storage_options", {})) as store:
            try:
                ours = [c for c in store.index().checkpoints if c.meta.get("framework") == FRAMEWORK]
            except CheckpointNotFoundError:
                return None
            if not ours:
                return None
            if selector == "best":
                return f"{PREFIX}{store.get('best').id}"
            return f"{PREFIX}{ours[-1].id}"

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
            set_optimizer_state_dict,
        )

        where = str(self.broadcast(str(checkpoint_path)))  # rank 0's choice, on every rank
        if not where.startswith(PREFIX) or len(where) == len(PREFIX):
            raise ConfigurationError(f"CloudModelParallelStrategy loads {PREFIX}latest, {PREFIX}best or "
                                     f"{PREFIX}<checkpoint id> (see resume_path()). Received: {where!r}")
        assert self.model is not None and self.lightning_module is not None
        module = self.model
        state: dict[str, Any] = {"state_dict": get_model_state_dict(module)}
        state.update({f"optimizer_{i}": get_optimizer_state_dict(module, opt) for i, opt in enumerate(self.optimizers)})
        state[REST_KEY] = b""
        reader = CloudStorageReader(self.remote, where[len(PREFIX):], **self.reader_options)
        load(state, storage_reader=reader)
        module.load_state_dict(state["state_dict"], strict=self.lightning_module.strict_loading)
        for i, opt in enumerate(self.optimizers):
            set_optimizer_state_dict(module, opt, optim_state_dict=state[f"optimizer_{i}"],
                                     options=StateDictOptions(cpu_offload=True))
        rest = _from_plain_bytes(state[REST_KEY], reader.entry.id if reader.entry else where)
        log.info("restored %s (step %s)", where, rest.get("global_step"))
        return rest


def _plain_bytes(rest: dict[str, Any]) -> bytes:
    """``rest`` as the bytes of a ``torch.save`` of tensors and plain data (ConfigurationError naming a leaf that is
    neither); mappings such as Lightning's ``AttributeDict`` are saved as dicts."""
    buf = io.BytesIO()
    torch.save(copy_to_cpu(_as_dicts(rest), "checkpoint"), buf)
    return buf.getvalue()


def _as_dicts(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _as_dicts(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_as_dicts(v) for v in value]
    return value


def _from_plain_bytes(data: Any, where: str) -> dict[str, Any]:
    if not isinstance(data, bytes):
        raise IntegrityError(f"{where}: the Lightning state item is not bytes ({type(data).__name__})")
    try:
        rest = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # the restricted unpickler refuses objects; a torn archive fails to open
        raise IntegrityError(f"{where}: the Lightning state is not plain tensors and data ({type(exc).__name__})") \
            from None
    if not isinstance(rest, dict):
        raise IntegrityError(f"{where}: the Lightning state holds a {type(rest).__name__}, not a dict")
    return rest
