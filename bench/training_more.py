"""Measurements 2 and 6: epoch-time overhead of checkpointing every epoch, and SIGTERM to committed checkpoint."""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

from .common import Ctx, Section, interleaved, log
from .training import build_model, weights_mb

HERE = Path(__file__).resolve().parent


class EpochClock:
    """A callback (put last) that stamps the end of each epoch, after the checkpoint callbacks ran."""

    def __new__(cls):
        import keras

        class _Clock(keras.callbacks.Callback):
            def __init__(self) -> None:
                super().__init__()
                self.stamps: list[float] = []

            def on_train_begin(self, logs=None):
                self.stamps = [time.perf_counter()]
                self.cpu = [time.process_time()]

            def on_epoch_end(self, epoch, logs=None):
                self.stamps.append(time.perf_counter())
                self.cpu.append(time.process_time())  # this process, all threads (training + uploader)

        return _Clock()


VARIANTS = {"no checkpoint": "none", "Keras ModelCheckpoint (local)": "keras", "CloudCheckpoint (s3)": "cloud"}


def epoch_overhead(ctx: Ctx) -> Section:
    """Each fit runs in a fresh process (bench/overhead_child.py) with TensorFlow on one thread: training keeps one
    core, the other is left to what runs beside it (the uploader, the S3 server), as on a training machine whose
    accelerator trains while its CPU cores idle. With TensorFlow on both of this machine's cores, epochs are bimodal
    (~2.8 s or ~5.2 s, no checkpoint at all), far beyond the 2 % to resolve."""
    t_start = time.monotonic()
    mb = 10 if not ctx.quick else 2
    sec = Section("epoch_overhead", "2. Epoch time, checkpoint every epoch vs none", "s",
                  target="<= 2% over no checkpoint")
    epochs = ctx.sizes.overhead_epochs
    threads = 1
    per_epoch: dict[str, list[float]] = {}

    def fit(name: str) -> float:
        d = ctx.scratch / "overhead" / uuid.uuid4().hex[:8]
        d.mkdir(parents=True)
        argv = [sys.executable, str(HERE / "overhead_child.py"), VARIANTS[name], str(d), str(mb), str(epochs),
                str(threads)]
        if VARIANTS[name] == "cloud":
            argv.append(f"s3://{ctx.bucket('s3')}/run")
        out = subprocess.run(argv, capture_output=True, text=True, timeout=1200, env=os.environ)
        if out.returncode != 0:
            raise RuntimeError(f"overhead child {name!r} exited {out.returncode}: {out.stderr[-2000:]}")
        doc = json.loads(out.stdout.strip().splitlines()[-1])
        steps, cpu = doc["wall"][1:], doc["cpu"][1:]  # epoch 1 traces the graph
        per_epoch.setdefault(name, []).extend(steps)
        v = sec.variant(name)
        v.extra.setdefault("cpu_s", []).extend(round(c, 3) for c in cpu)
        v.extra.setdefault("fit_s", []).append(round(sum(doc["wall"]), 2))
        v.extra.setdefault("fit_mean_s", []).append(round(sum(steps) / len(steps), 4))
        sec.params["samples_per_epoch"] = doc["samples"]
        return sum(steps) / len(steps)

    names = list(VARIANTS)
    interleaved(ctx.sizes.overhead_reps, {n: (lambda n=n: fit(n)) for n in names}, section=sec)
    for n in names:
        sec.variant(n).samples = [round(s, 4) for s in per_epoch[n]]
    base = sec.variant("no checkpoint").median
    cpu_base = statistics.median(sec.variant("no checkpoint").extra["cpu_s"])
    fits = {n: sec.variant(n).extra["fit_mean_s"] for n in names}
    for n in names[1:]:
        v = sec.variant(n)
        v.extra["overhead_pct"] = round((v.median / base - 1) * 100, 2)
        # paired: each repetition's fit against the no-checkpoint fit of the same repetition (same machine load)
        v.extra["paired_pct"] = [round((a / b - 1) * 100, 2) for a, b in zip(fits[n], fits[names[0]])]
        v.extra["paired_median_pct"] = round(statistics.median(v.extra["paired_pct"]), 2)
        v.extra["cpu_overhead_pct"] = round((statistics.median(v.extra["cpu_s"]) / cpu_base - 1) * 100, 2)
    sec.ratio = sec.variant("CloudCheckpoint (s3)").extra["overhead_pct"]
    sec.ratio_desc = "CloudCheckpoint epoch-time overhead, %"
    sec.met = sec.ratio <= 2.0
    sec.params.update({"model_MB": round(weights_mb(build_model(mb)), 1), "batch": 32, "epochs_per_fit": epochs,
                       "tf_threads": threads, "fits_per_variant": ctx.sizes.overhead_reps,
                       "measured": "epochs 2..N of each fit (epoch 1 traces the graph), each fit a fresh process"})
    sec.notes.append("TensorFlow runs on one thread (intra- and inter-op) so that training keeps one core and the "
                     "other serves what runs beside it, the S3 server included; with both cores, epochs without any "
                     "checkpoint are bimodal (~2.8 s or ~5.2 s) on this machine. cpu_s is the training process's "
                     "CPU time per epoch (all threads: training, Keras' save, the uploader's hashing and HTTP).")
    sec.seconds = round(time.monotonic() - t_start, 1)
    return sec


def sigterm(ctx: Ctx) -> Section:
    from cloudckpt import CheckpointStore

    t_start = time.monotonic()
    mb = ctx.sizes.sigterm_mb
    sec = Section("sigterm", f"6. SIGTERM to committed checkpoint, ~{mb} MB model", "s", target="<= 10 s")
    reps = 1 if ctx.quick else 2
    for r in range(reps):
        url = f"s3://{ctx.bucket('s3')}/run"
        workdir = ctx.scratch / "sigterm" / str(r)
        workdir.mkdir(parents=True)
        proc = subprocess.Popen([sys.executable, str(HERE / "sigterm_child.py"), url, str(workdir), str(mb)],
                                stdout=subprocess.PIPE, stderr=open(workdir / "stderr.log", "wb"), text=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        step = None
        for line in proc.stdout:  # the child says when it is mid-epoch, after its first checkpoint committed
            if line.startswith("READY"):
                step = int(line.split()[1])
                break
        if step is None:
            proc.wait()
            err = (workdir / "stderr.log").read_text()[-3000:]
            raise RuntimeError(f"sigterm child exited {proc.returncode} before it was ready: {err}")
        t0 = time.perf_counter()
        proc.send_signal(signal.SIGTERM)
        store = CheckpointStore(url)
        committed: list[float] = []

        def watch() -> None:
            while proc.poll() is None or not committed:
                try:
                    if any((c.step or 0) > step for c in store.list()):
                        committed.append(time.perf_counter() - t0)
                        return
                except Exception:
                    pass
                if proc.poll() is not None and time.perf_counter() - t0 > 5 + (proc_exit[0] if proc_exit else 0):
                    return
                time.sleep(0.02)

        proc_exit: list[float] = []
        th = threading.Thread(target=watch, daemon=True)
        th.start()
        code = proc.wait(timeout=300)
        proc_exit.append(time.perf_counter() - t0)
        th.join(timeout=15)
        latest = store.latest()
        store.close()
        v = sec.variant("CloudCheckpoint (s3)")
        v.samples.append(round(committed[0], 3) if committed else float("nan"))
        v.extra.setdefault("exit_s", []).append(round(proc_exit[0], 2))
        v.extra.setdefault("exit_code", []).append(code)
        v.extra.setdefault("step_at_signal", []).append(step)
        v.extra.setdefault("committed_step", []).append(latest.step)
        log.info("  sigterm rep %d: committed after %s s, exit %s after %.2f s (step %s -> %s)", r + 1,
                 committed[0] if committed else None, code, proc_exit[0], step, latest.step)
    v = sec.variant("CloudCheckpoint (s3)")
    sec.ratio = v.median
    sec.ratio_desc = "seconds from SIGTERM to the checkpoint listed in the index"
    sec.met = v.median is not None and v.median <= 10
    sec.params = {"model_MB": mb, "how": "SIGTERM sent mid-epoch; the index is polled every 20 ms from this process"}
    sec.seconds = round(time.monotonic() - t_start, 1)
    return sec
