"""What CloudCheckpoint needs from each Keras 3 backend's trainer, behind one small adapter per backend.

The three trainers (Keras 3.15: ``keras/src/backend/{tensorflow,jax,torch}/trainer.py``) call the model's
``train_function`` differently, and a mid-epoch resume replaces that function for the first ``k`` steps of the
resumed epoch with one that takes each batch from the epoch's data without training on it:

- TensorFlow: ``logs = train_function(iterator)``; the function draws ``steps_per_execution`` batches itself.
- JAX: ``logs, state = train_function(state, iterator)``; same drawing, and the model's variables travel in
  ``state`` (a tuple of trainable, non-trainable, optimizer and metric values), not in the variables.
- PyTorch: ``logs = train_function(data)``; the epoch iterator has already drawn ``data``, a list of batches
  (``steps_per_execution`` must be 1 there).

Everything else CloudCheckpoint does reads the model through the callback's ``model`` property, which on JAX puts
the trainer's state back into the variables first (`Model.jax_state_sync`), so it is the same on every backend.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np

from ..errors import ConfigurationError, IntegrityError
from .distributed import WorkerRole, current_role, jax_any, jax_gather, jax_role, spans_processes
from .shards import ShardedSaves, any_split

log = logging.getLogger(__name__)


class SkipBatches:
    """Stands in for ``model.train_function`` for the first ``k`` steps of a resumed epoch: takes each batch without
    training on it, then puts the real function back. Subclasses adapt the call to one backend's trainer.

    Args:
        model: the Keras model.
        k: batches to skip.
        logs: the batch logs to report for skipped steps (those the interrupted run reported at its save).
        on_last: called with the last skipped batch when the skipping ends (restores metric accumulators).
    """

    def __init__(self, model: Any, k: int, logs: Mapping[str, float], on_last: Callable[[Any], Any]) -> None:
        self.model = model
        self.original = model.train_function
        self.remaining = k
        self.logs = dict(logs)
        self.on_last = on_last
        self.skipped = 0
        model.train_function = self

    def __call__(self, *args: Any) -> Any:
        if self.remaining <= 0:
            self.uninstall()
            return self.original(*args)
        return self._skip(*args)

    def _skip(self, *args: Any) -> Any:
        raise NotImplementedError

    def _draw(self, iterator: Any) -> Any:
        """Take the batches of one call from ``iterator`` (as many as the trainer's function would); return the last."""
        per_call = max(1, int(getattr(self.model, "steps_per_execution", 1) or 1))
        data = None
        for _ in range(min(per_call, self.remaining)):
            data = next(iterator)
            self._count(1)
        return data

    def _count(self, n: int) -> None:
        self.remaining -= n
        self.skipped += n

    def _finish_if_done(self, data: Any) -> bool:
        if self.remaining > 0:
            return False
        self.uninstall()
        self.on_last(data)
        return True

    def uninstall(self) -> None:
        """Put the trainer's own function back (idempotent)."""
        if self.model.train_function is self:
            self.model.train_function = self.original


class TensorFlowSkipBatches(SkipBatches):
    """``logs = train_function(iterator)``."""

    def _skip(self, iterator: Any) -> Mapping[str, float]:
        self._finish_if_done(self._draw(iterator))
        return self.logs


class JaxSkipBatches(SkipBatches):
    """``logs, state = train_function(state, iterator)``: the state goes back unchanged, except the metric values
    once they are restored (the trainer keeps using the returned state, not the variables)."""

    def _skip(self, state: tuple, iterator: Any) -> tuple[Mapping[str, float], tuple]:
        if self._finish_if_done(self._draw(iterator)) and len(state) == 4:
            state = (*state[:3], [v.value for v in self.model.metrics_variables])
        return self.logs, state


class TorchSkipBatches(SkipBatches):
    """``logs = train_function(data)`` with ``data`` the list of batches the epoch iterator has drawn."""

    def _skip(self, data: list) -> Mapping[str, float]:
        self._count(len(data))
        self._finish_if_done(data[-1] if data else None)
        return self.logs


class HostRandomness:
    """The process-global random generators a training step or the data order may draw from: Python's ``random``,
    NumPy's global generator (Keras' array adapter draws each epoch's shuffle from it on JAX) and, on PyTorch, torch's
    CPU generator (its ``RandomSampler`` draws each epoch's seed from it, and an unseeded ``Dropout`` draws its masks
    from it at every step). `keras.utils.set_random_seed` seeds them once per process, so a restarted process must be
    put back where they stood: at the resumed epoch's start while that epoch draws its data order, then at the save
    point once the finished batches are skipped. TensorFlow's ``tf.data`` shuffle is seeded per dataset.

    States are arrays keyed ``<prefix><generator>``, stored beside the variables in ``variables.npz``.
    """

    def __init__(self, torch_generator: bool = False) -> None:
        self.torch_generator = torch_generator

    def capture(self, prefix: str = "rng_") -> dict[str, np.ndarray]:
        """The generators' states now, as arrays."""
        version, internal, gauss = random.getstate()
        _kind, keys, pos, has_gauss, cached = np.random.get_state()
        out: dict[str, np.ndarray] = {"python": np.array([version, *internal], dtype=np.int64),
               "python_gauss": np.array([] if gauss is None else [gauss], dtype=np.float64),
               "numpy_keys": np.array(keys, dtype=np.uint32),
               "numpy_pos": np.array([pos, has_gauss], dtype=np.int64),
               "numpy_gauss": np.array([cached], dtype=np.float64)}
        if self.torch_generator:
            import torch

            out["torch"] = torch.get_rng_state().numpy().copy()
        return {prefix + name: value for name, value in out.items()}

    def restore(self, arrays: Mapping[str, np.ndarray], prefix: str = "rng_") -> bool:
        """Set the generators from :meth:`capture`'s arrays; False (nothing set) when they are not there (a
        checkpoint written before cloudckpt saved them)."""
        try:
            py, gauss = arrays[prefix + "python"], arrays[prefix + "python_gauss"]
            pos, has_gauss = (int(v) for v in arrays[prefix + "numpy_pos"])
            np_state = ("MT19937", np.asarray(arrays[prefix + "numpy_keys"], dtype=np.uint32), pos, has_gauss,
                        float(arrays[prefix + "numpy_gauss"][0]))
            torch_state = arrays[prefix + "torch"] if self.torch_generator else None
        except KeyError as exc:
            log.info("the checkpoint holds no state of %s: random draws after the resume may differ", exc)
            return False
        except (ValueError, TypeError, IndexError) as exc:
            raise IntegrityError(f"the checkpoint's random generator state {prefix}* is malformed: "
                                 f"{str(exc)[:200]}") from None
        try:
            random.setstate((int(py[0]), tuple(int(v) for v in py[1:]), float(gauss[0]) if gauss.size else None))
            np.random.set_state(np_state)
            if torch_state is not None:
                import torch

                torch.set_rng_state(torch.from_numpy(np.array(torch_state, dtype=np.uint8)))
        except (ValueError, TypeError, IndexError, OverflowError, RuntimeError) as exc:
            raise IntegrityError(f"the checkpoint's random generator state {prefix}* is malformed: "
                                 f"{str(exc)[:200]}") from None
        return True


@dataclass(frozen=True)
class TrainerAdapter:
    """What differs between the backends' trainers, for one backend.

    Attributes:
        backend: the Keras backend name.
        skipper: the :class:`SkipBatches` for its ``train_function``.
        randomness: the host generators to save and restore with the position.
        multi_process: how a multi-process job says which process this is: ``"tf"`` (the strategy's cluster
            resolver or ``TF_CONFIG``) or ``"jax"`` (``jax.distributed``).
    """

    backend: str
    skipper: type[SkipBatches]
    randomness: HostRandomness
    multi_process: str = "tf"

    def role(self, model: Any) -> WorkerRole:
        """This process's role in the training job."""
        if self.multi_process == "jax":
            return jax_role()
        return current_role(getattr(model, "distribute_strategy", None))

    def to_host(self, variable: Any) -> np.ndarray:
        """A host copy of ``variable``'s whole value (``v.numpy()`` copies on every backend). On JAX, a value split
        across processes is gathered: a collective every process must enter, in the same order."""
        if self.multi_process == "jax" and spans_processes(variable.value):
            return jax_gather([variable.value])[0]
        return np.asarray(variable.numpy())

    def sharded_saves(self, model: Any, store: Any) -> ShardedSaves | None:
        """How ``model`` is saved when some of its (or its optimizer's) variables are split across the processes
        of a JAX job: shard by shard from every process (:mod:`~cloudckpt.keras.shards`); None otherwise (a single
        process, another backend, nothing split: Keras' own file)."""
        if self.multi_process != "jax":
            return None
        import jax

        if jax.process_count() == 1 or not any_split(model):
            return None
        log.info("variables split across the %d processes: each process stores its shards", jax.process_count())
        return ShardedSaves(store, jax.process_index(), jax.process_count())

    def any_process(self, flag: bool) -> bool:
        """True on every process when ``flag`` is True on any process of the job: on JAX a collective every
        process enters at the same point (:func:`~cloudckpt.keras.distributed.jax_any`). TensorFlow's
        multi-worker strategy is not covered: ``flag`` as it is."""
        return jax_any(flag) if self.multi_process == "jax" else flag

    def skip_batches(self, model: Any, k: int, logs: Mapping[str, float],
                     on_last: Callable[[Any], Any]) -> SkipBatches:
        """Install this backend's :class:`SkipBatches` on ``model`` (see there for the arguments)."""
        log.debug("skipping %d batches with the %s trainer's adapter", k, self.backend)
        return self.skipper(model, k, logs, on_last)


_ADAPTERS = {
    "tensorflow": TrainerAdapter("tensorflow", TensorFlowSkipBatches, HostRandomness()),
    "jax": TrainerAdapter("jax", JaxSkipBatches, HostRandomness(), multi_process="jax"),
    "torch": TrainerAdapter("torch", TorchSkipBatches, HostRandomness(torch_generator=True)),
}

SUPPORTED_BACKENDS = tuple(_ADAPTERS)


def for_backend(backend: str | None = None) -> TrainerAdapter:
    """The adapter of ``backend`` (default: the one Keras runs on).

    Raises:
        ConfigurationError: a backend that has no trainer (``numpy``, ``openvino``) or that Keras added later.
    """
    name = backend or keras.backend.backend()
    if name not in _ADAPTERS:
        raise ConfigurationError(f"CloudCheckpoint does not support the Keras backend {name!r} "
                                 f"(supported: {', '.join(SUPPORTED_BACKENDS)})")
    return _ADAPTERS[name]
