"""A small deterministic Keras training job on scikit-learn's digits, run as a subprocess by the Keras tests.

It prints ``STEP <global step>`` after every trained batch (flushed, so a parent can kill at a chosen point), can
SIGKILL itself right after a chosen step, and writes the final weights to ``--out``. The Keras backend is the one
``KERAS_BACKEND`` names (set by the parent before this process imports keras); :func:`deterministic` turns on that
backend's deterministic settings.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
if os.environ.get("KERAS_BACKEND") in ("jax", "torch"):
    # TensorFlow stays out of JAX and PyTorch jobs, as on a machine without it: keras.utils.set_random_seed would
    # import it (~10 s of CPU) only to seed it, and nothing here uses it.
    sys.modules.setdefault("tensorflow", None)

import keras  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

from cloudckpt.keras import CloudCheckpoint  # noqa: E402


def data():
    x, y = load_digits(return_X_y=True)
    return (x / 16.0).astype("float32"), y.astype("int64")


def deterministic(seed):
    """Seed everything and make the current backend's kernels deterministic (JAX on the CPU already is)."""
    keras.utils.set_random_seed(seed)
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()
    elif backend == "torch":
        import torch

        torch.use_deterministic_algorithms(True)


def build_model(hidden=32):
    model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(hidden, activation="relu"),
                              keras.layers.Dropout(0.2), keras.layers.Dense(10)])
    model.compile(optimizer=keras.optimizers.Adam(1e-2),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    return model


class Steps(keras.callbacks.Callback):
    """Prints each trained global step; SIGKILLs or SIGTERMs this process after a chosen one."""

    def __init__(self, ckpt, kill_at, signal_name, wait_commit):
        super().__init__()
        self.ckpt, self.kill_at, self.signal_name, self.wait_commit = ckpt, kill_at, signal_name, wait_commit
        self.last = None

    def on_train_batch_begin(self, batch, logs=None):
        self.last = int(self.model.optimizer.iterations.numpy())

    def on_epoch_end(self, epoch, logs=None):
        print("EPOCH", epoch + 1, json.dumps({k: float(v) for k, v in sorted(logs.items())}), flush=True)

    def on_train_batch_end(self, batch, logs=None):
        step = int(self.model.optimizer.iterations.numpy())
        if step == self.last:
            return  # a skipped batch (resume)
        self.last = step
        print(f"STEP {step}", flush=True)
        if self.kill_at is not None and step == self.kill_at:
            if self.wait_commit and self.ckpt.uploader is not None:  # None: not the process that writes
                self.ckpt.flush(60)
            os.kill(os.getpid(), getattr(signal, self.signal_name))


class Ender(keras.callbacks.Callback):
    """Listed after the checkpoint callback: reports ``ckpt.flush()`` at each epoch end (``FLUSH <epoch> <ok>
    <failures>``) and ends training right after a chosen epoch's save — by an exception, ``sys.exit(3)`` or SIGINT
    (a ``KeyboardInterrupt``, as Ctrl-C)."""

    def __init__(self, ckpt, after_epoch, how, flush):
        super().__init__()
        self.ckpt, self.after_epoch, self.how, self.flush = ckpt, after_epoch, how, flush

    def on_epoch_end(self, epoch, logs=None):
        if self.flush:
            ok = self.ckpt.flush(120)
            print("FLUSH", epoch + 1, ok, json.dumps([str(f) for f in getattr(self.ckpt, "failures", [])]), flush=True)
        if self.after_epoch is None or epoch + 1 != self.after_epoch:
            return
        print("ENDING", self.how, flush=True)
        if self.how == "raise":
            raise RuntimeError(f"a callback failed after epoch {epoch + 1}")
        if self.how == "exit":
            sys.exit(3)
        if self.how == "sigint":
            import time

            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(60)  # interrupted at once: KeyboardInterrupt is raised here, in the main thread
            raise AssertionError("SIGINT did not interrupt")


def whole_variables(model):
    """Every model and optimizer variable's whole value, keyed as the resume state's layout (a collective on a
    multi-process job: every process calls it)."""
    from cloudckpt.keras.distributed import jax_gather, spans_processes

    named = ([(f"model_{i}", v) for i, v in enumerate(model.variables)]
             + [(f"optimizer_{i}", v) for i, v in enumerate(model.optimizer.variables)])
    split = [v.value for _, v in named if spans_processes(v.value)]
    wholes = iter(jax_gather(split)) if split else iter(())
    return {k: np.asarray(next(wholes) if spans_processes(v.value) else v.numpy()) for k, v in named}


class Dump(keras.callbacks.Callback):
    """Listed after the checkpoint callback: writes every model and optimizer variable's whole value to ``path``
    (``DUMPED`` on stdout) after step ``at``, or at fit's start (after the resume) and then exits."""

    def __init__(self, path, at, restored, process):
        super().__init__()
        self.path, self.at, self.restored, self.process = path, at, restored, process

    def _dump(self):
        values = whole_variables(self.model)
        if self.process == 0:
            np.savez(self.path, **values)
        print("DUMPED", flush=True)

    def on_train_begin(self, logs=None):
        if self.restored:
            self._dump()
            sys.stdout.flush()
            os._exit(0)

    def on_train_batch_end(self, batch, logs=None):
        if self.at is not None and int(self.model.optimizer.iterations.numpy()) == self.at:
            self._dump()


class StopAt(keras.callbacks.Callback):
    """Listed after the checkpoint callback: after step ``at``, waits for the checkpoints to commit, prints
    ``STALLS <json list of the checkpoint's stall seconds>`` and exits 0. With OrbaxCheckpoint (``--orbax``) it
    waits for Orbax's background saves (every process) and prints ``ORBAX_WAIT <seconds>`` first."""

    def __init__(self, ckpt, at):
        super().__init__()
        self.ckpt, self.at = ckpt, at

    def on_train_batch_end(self, batch, logs=None):
        if int(self.model.optimizer.iterations.numpy()) == self.at:
            if hasattr(self.ckpt, "wait_seconds"):  # orbax_checkpoint()'s (older Keras has no OrbaxCheckpoint)
                import time

                t0 = time.perf_counter()
                self.ckpt.wait_until_finished()
                print("ORBAX_WAIT", time.perf_counter() - t0, flush=True)
                print("ORBAX_WAITS_IN_SAVES", json.dumps(self.ckpt.wait_seconds), flush=True)
            elif self.ckpt.uploader is not None:
                self.ckpt.flush(120)
            print("STALLS", json.dumps(self.ckpt.stall_seconds), flush=True)
            os._exit(0)


def orbax_checkpoint(directory, save_freq):
    """Keras' own ``keras.callbacks.OrbaxCheckpoint`` (needs orbax-checkpoint) in place of CloudCheckpoint, every
    checkpoint kept, the whole state (weights and optimizer, as CloudCheckpoint's resume state), saved in the
    background (its default). ``stall_seconds``: each save's time on the training thread, timed as CloudCheckpoint's
    (the state tree, and Orbax's save call: it waits for the previous save, copies the arrays to the host and starts
    the background write); ``wait_seconds``: the part of each spent waiting for the previous save (Orbax's own
    ``wait_for_prev_duration_secs`` event)."""
    import time

    import jax

    class Timed(keras.callbacks.OrbaxCheckpoint):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.stall_seconds, self.wait_seconds, self._waits = [], [], None
            jax.monitoring.register_event_duration_secs_listener(self._event)

        def _event(self, event, duration, **kw):
            if self._waits is not None and event == "/jax/checkpoint/write/wait_for_prev_duration_secs":
                self._waits.append(duration)

        def _save_checkpoint(self, step, logs=None):
            t0, self._waits = time.perf_counter(), []
            super()._save_checkpoint(step, logs)
            self.stall_seconds.append(time.perf_counter() - t0)
            self.wait_seconds.append(sum(self._waits))
            self._waits = None

    logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax's INFO lines, on by this job's basicConfig only
    return Timed(directory, save_freq=save_freq, max_to_keep=None, save_weights_only=False)


def slow_uploads(seconds):
    """Every push takes ``seconds`` longer (a slow link), so a process that ends right after a save has uploads in
    flight."""
    import time

    from cloudckpt.store import CheckpointStore

    push = CheckpointStore.push

    def slow(self, source, **kw):
        time.sleep(seconds)
        return push(self, source, **kw)

    CheckpointStore.push = slow


def hang_uploads_after(step):
    """A store whose uploads stop answering (a dead network) for checkpoints past ``step``."""
    import threading

    from cloudckpt.store import CheckpointStore

    push = CheckpointStore.push

    def hanging(self, source, **kw):
        if kw.get("step", 0) > step:
            threading.Event().wait()
        return push(self, source, **kw)

    CheckpointStore.push = hanging


def distribute(spec, model_parallel, kernel_split="cols"):
    """Join a jax.distributed job over JAX's CPU collectives (gloo) and train under keras.distribution: data
    parallel, or with every Dense kernel sharded across the processes (by columns, or by rows)."""
    import jax

    address, n, i = spec.split(",")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    keras.distribution.initialize(job_addresses=address, num_processes=int(n), process_id=int(i))
    devices = jax.devices()
    if model_parallel:
        mesh = keras.distribution.DeviceMesh((1, len(devices)), ("batch", "model"), devices=devices)
        layouts = keras.distribution.LayoutMap(mesh)
        layouts[".*dense.*kernel"] = (None, "model") if kernel_split == "cols" else ("model", None)
        distribution = keras.distribution.ModelParallel(layout_map=layouts, batch_dim_name="batch")
    else:
        distribution = keras.distribution.DataParallel(devices=devices)
    distribution.auto_shard_dataset = False  # arrays: main() hands each process its part
    keras.distribution.set_distribution(distribution)
    return int(n), int(i)


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--remote", required=True)
    p.add_argument("--filepath", required=True)
    p.add_argument("--out")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--save-freq", default="epoch")
    p.add_argument("--shuffle", action="store_true")
    p.add_argument("--weights-only", action="store_true")
    p.add_argument("--best-only", action="store_true")
    p.add_argument("--kill-at", type=int)
    p.add_argument("--signal", default="SIGKILL")
    p.add_argument("--no-wait-commit", action="store_true")
    p.add_argument("--no-checkpoint", action="store_true")
    p.add_argument("--preemption", default="sigterm")
    p.add_argument("--endpoints", default=None, help="JSON {cloud: url}")
    p.add_argument("--deadline", type=float, default=25.0)
    p.add_argument("--hang-uploads-after", type=int, help="pushes of checkpoints past this step never return")
    p.add_argument("--jax-processes", help="COORDINATOR_HOST:PORT,N,I: process I of N of a jax.distributed job")
    p.add_argument("--model-parallel", action="store_true", help="shard the Dense kernels across the processes")
    p.add_argument("--kernel-split", choices=("cols", "rows"), default="cols", help="how --model-parallel splits")
    p.add_argument("--dump-at", type=int, help="after this step's save, write every model and optimizer variable's "
                   "whole value to --dump (process 0)")
    p.add_argument("--dump-restored", action="store_true", help="right after the resume (fit's start), write every "
                   "model and optimizer variable's whole value to --dump (process 0) and exit")
    p.add_argument("--dump")
    p.add_argument("--hidden", type=int, default=32, help="units of the hidden Dense layer")
    p.add_argument("--stop-at", type=int, help="after this step, print STALLS <the checkpoint's stall seconds> and "
                   "exit 0 (every process)")
    p.add_argument("--store-budget", type=float, default=300.0)
    p.add_argument("--keep-last", type=int, default=2)
    p.add_argument("--on-upload-error", default="retry")
    p.add_argument("--verbose", type=int, default=0)
    p.add_argument("--flush-each-epoch", action="store_true", help="print FLUSH <epoch> <ok> <failures>")
    p.add_argument("--end-after-epoch", type=int, help="end training right after this epoch's save (--end-how)")
    p.add_argument("--end-how", choices=("raise", "exit", "sigint"), default="raise")
    p.add_argument("--slow-uploads", type=float, help="each push takes this many seconds longer")
    p.add_argument("--orbax", help="save with keras.callbacks.OrbaxCheckpoint into this folder (shared by the "
                   "processes) instead of CloudCheckpoint (--remote unused)")
    args = p.parse_args(argv)
    n_proc = process = 0
    if args.jax_processes:
        n_proc, process = distribute(args.jax_processes, args.model_parallel, args.kernel_split)
    if args.hang_uploads_after is not None:
        hang_uploads_after(args.hang_uploads_after)
    if args.slow_uploads:
        slow_uploads(args.slow_uploads)
    logging.basicConfig(level=logging.INFO, format="%(name)s %(levelname)s %(message)s", stream=sys.stderr)
    deterministic(7)
    x, y = data()
    shards = n_proc if n_proc and not args.model_parallel else 1  # data parallel: each process feeds its part
    x, y = x[process::shards][:len(x) // shards], y[process::shards][:len(x) // shards]
    model = build_model(args.hidden)
    if n_proc:  # variables whose value spans other processes' devices (model parallel: the Dense kernels)
        print("SPLIT", sum(not v.value.is_fully_addressable and not v.value.is_fully_replicated
                           for v in model.variables), flush=True)
    save_freq = args.save_freq if args.save_freq == "epoch" else int(args.save_freq)
    if args.orbax:
        ckpt = orbax_checkpoint(args.orbax, save_freq)
    else:
        ckpt = CloudCheckpoint(
            args.filepath, monitor="val_loss", save_best_only=args.best_only, save_weights_only=args.weights_only,
            save_freq=save_freq, remote=args.remote, preemption=args.preemption, preemption_deadline=args.deadline,
            preemption_endpoints=json.loads(args.endpoints) if args.endpoints else None,
            store_budget=args.store_budget, keep_last=args.keep_last, verbose=args.verbose,
            **({"on_upload_error": args.on_upload_error} if args.on_upload_error != "retry" else {}))
    # Steps first: a step is reported before the checkpoint callback may stop the process at it
    callbacks = ([Steps(ckpt, args.kill_at, args.signal, not args.no_wait_commit)]
                 + ([] if args.no_checkpoint else [ckpt]))
    if args.dump:
        callbacks.append(Dump(args.dump, args.dump_at, args.dump_restored, process))
    if args.stop_at:
        callbacks.append(StopAt(ckpt, args.stop_at))
    if args.end_after_epoch is not None or args.flush_each_epoch:
        callbacks.append(Ender(ckpt, args.end_after_epoch, args.end_how, args.flush_each_epoch))
    model.fit(x, y, batch_size=64 // shards, epochs=args.epochs, validation_split=0.2, shuffle=args.shuffle, verbose=0,
              callbacks=callbacks)
    if not args.no_checkpoint and not args.orbax:
        print(f"RESUMED_FROM {ckpt.resumed_from} SKIPPED {ckpt.batches_skipped}", flush=True)
    if args.out:
        weights = model.weights
        if n_proc:  # the whole value of each weight split across the processes (a collective: every process)
            from cloudckpt.keras.distributed import jax_gather, spans_processes

            split = [v.value for v in weights if spans_processes(v.value)]
            wholes = iter(jax_gather(split))
            weights = [next(wholes) if spans_processes(v.value) else v for v in weights]
        weights = [np.asarray(w) for w in weights]
        if process == 0:
            np.savez(args.out, *weights)
    print("DONE", flush=True)


if __name__ == "__main__":
    main()
