"""Measurement 1: the training stall per checkpoint (Keras, TensorFlow CPU).

The time the training thread spends inside the checkpoint callback's hooks (``on_epoch_end`` plus that epoch's
``on_train_batch_end`` calls), per save, for models of ~10 MB, ~100 MB and ~1 GB of weights:
``CloudCheckpoint(remote=s3://...)`` vs Keras ``ModelCheckpoint`` to local disk vs a ModelCheckpoint that pushes each
save inline (synchronous save-then-upload), and vs what exact resume takes with Keras alone: ``ModelCheckpoint`` +
``BackupAndRestore(save_freq="epoch")`` (both callbacks' time counted), since CloudCheckpoint saves the resume state
(model, optimizer and metrics variables) besides the user's file.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
import uuid
from collections import defaultdict

from .common import Ctx, Section, interleaved
from .model import build_model, digits, hidden_width, weights_mb

HOOKS = ("on_epoch_end", "on_train_batch_end")
KERAS = "Keras ModelCheckpoint (local)"
KERAS_BACKUP = "Keras ModelCheckpoint + BackupAndRestore (local)"
CLOUD = "CloudCheckpoint (s3)"
CLOUD_LOCAL = "CloudCheckpoint (local store)"  # control: the same callback with no server on the machine
INLINE = "ModelCheckpoint + inline push (s3)"


class HookTimer:
    """Wraps callbacks' hooks on the instances; adds up, per epoch, the seconds the training thread spent in them
    (all the callbacks together in ``per_epoch``, each callback's class separately in ``by_callback``)."""

    def __init__(self, *callbacks) -> None:
        self.per_epoch: dict[int, float] = defaultdict(float)
        self.by_callback: dict[str, dict[int, float]] = defaultdict(lambda: defaultdict(float))
        self.train_end = 0.0
        self._epoch = 0
        for cb in callbacks:
            for name in HOOKS + ("on_epoch_begin", "on_train_end"):
                self._wrap(cb, name)

    def _wrap(self, cb, name: str) -> None:
        orig = getattr(cb, name)
        kind = type(cb).__name__

        def timed(*args, **kwargs):
            if name == "on_epoch_begin":
                self._epoch = args[0] if args else kwargs.get("epoch", 0)
            t0 = time.perf_counter()
            try:
                return orig(*args, **kwargs)
            finally:
                dt = time.perf_counter() - t0
                if name == "on_train_end":
                    self.train_end += dt
                elif name in HOOKS:
                    self.per_epoch[self._epoch] += dt
                    self.by_callback[kind][self._epoch] += dt

        setattr(cb, name, timed)


def split_cloud_saves(cb) -> list[tuple[float, float]]:
    """Wrap CloudCheckpoint's ``_save_model`` and ``_stage`` on the instance; returns the list that fills with one
    (whole save, cloudckpt's own part) pair per save. The own part is ``_stage``: with the background capture (the
    default) Keras' saving walk into host copies and the hand-off to the writer thread; with ``async_save=False``
    the copy of what the user's file lacks of the training state, the hard-link snapshot of that file and the
    enqueue. The rest is Keras' save on the training thread (none with the background capture)."""
    saves: list[tuple[float, float]] = []
    stage_s: list[float] = []
    real_save, real_stage = cb._save_model, cb._stage

    def stage(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return real_stage(*args, **kwargs)
        finally:
            stage_s.append(time.perf_counter() - t0)

    def save(*args, **kwargs):
        before = len(stage_s)
        t0 = time.perf_counter()
        try:
            return real_save(*args, **kwargs)
        finally:
            saves.append((time.perf_counter() - t0, sum(stage_s[before:])))

    cb._stage, cb._save_model = stage, save
    return saves


def sync_upload_callback(filepath: str, url: str, **kwargs):
    """Keras ModelCheckpoint that pushes each save to the store before returning (what an inline uploader does)."""
    import keras

    from cloudckpt import CheckpointStore

    class SaveThenUpload(keras.callbacks.ModelCheckpoint):
        def __init__(self) -> None:
            super().__init__(filepath, **kwargs)
            self.store = CheckpointStore(url)

        def on_epoch_end(self, epoch, logs=None):
            super().on_epoch_end(epoch, logs)
            self.store.push(self.filepath, epoch=epoch + 1, keep_last=1)

        def on_train_end(self, logs=None):
            super().on_train_end(logs)
            self.store.close()

    return SaveThenUpload()


STATE_CALLS: list[tuple[str, float, str]] = []  # (function, seconds, thread) of resume-state capture/write calls


def _time_state_calls() -> None:
    """Wrap the resume-state functions once, so the stall can be split and the thread doing each part named."""
    from cloudckpt.keras import resume, state

    for owner, name, label in ((getattr(resume, "StatePlan", None), "capture", "capture"),
                               (resume, "capture", "capture"), (state, "write_state", "write_state")):
        real = getattr(owner, name, None)
        if real is None or getattr(real, "_bench_timed", False):
            continue

        def timed(*args, _real=real, _name=label, **kwargs):
            t0 = time.perf_counter()
            try:
                return _real(*args, **kwargs)
            finally:
                STATE_CALLS.append((_name, time.perf_counter() - t0, threading.current_thread().name))

        timed._bench_timed = True
        setattr(owner, name, timed)


def cloud_callback(filepath: str, url: str, **kwargs):
    from cloudckpt.keras import CloudCheckpoint

    _time_state_calls()
    return CloudCheckpoint(filepath, remote=url, keep_last=1, resume=False, **kwargs)


SETTLE_GAP = 0.25  # seconds between one save's upload (and write-back) being done and the next epoch


def settle(cb):
    """A callback run after ``cb`` that, before each epoch, waits (outside ``cb``'s timed hooks) until ``cb``'s
    uploads are done, writes dirty pages back (``os.sync``) and waits :data:`SETTLE_GAP` more (every variant): as in
    real training, where an epoch outlasts an upload and the page cache's write-back by far. Without it, back-to-back
    saves of these tiny epochs would measure the contention of one upload (and the S3 server's side of it, on the
    same 2 cores) with the next save, and the kernel throttling a writer behind the previous saves' dirty pages
    (100 MB saves took 80-490 ms in one fit without it)."""
    import keras

    class Settle(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            writer = getattr(cb, "writer", None)  # async_save: the background write of the last save point
            if writer is not None:
                writer.flush(600)
            uploader = getattr(cb, "uploader", None)
            if uploader is not None:
                uploader.flush(600)
            os.sync()  # every variant: the last save's dirty pages are written back before the next save,
            time.sleep(SETTLE_GAP)  # and the server's side of the upload is over

    return Settle()


def section(ctx: Ctx, mb: int) -> Section:
    import keras

    model = build_model(mb)
    real_mb = weights_mb(model)
    batch, steps = (8, 2) if mb >= 500 else (32, 4)
    x, y = digits()
    x, y = x[: batch * steps], y[: batch * steps]
    sec = Section(f"stall_{mb}MB", f"1. Training stall per checkpoint, {real_mb:.0f} MB of weights", "s",
                  target="<= 1.05x Keras ModelCheckpoint (local)")
    saves = ctx.sizes.stall_saves if mb < 500 else min(3, ctx.sizes.stall_saves)
    common = dict(save_weights_only=True, monitor="loss", save_freq="epoch")
    timers: dict[str, list[HookTimer]] = defaultdict(list)
    names = [KERAS, KERAS_BACKUP, CLOUD, INLINE, CLOUD_LOCAL]

    def fit(name: str) -> float:
        d = ctx.scratch / "train" / uuid.uuid4().hex[:8]
        d.mkdir(parents=True)
        path = str(d / "model.weights.h5")
        url = f"s3://{ctx.bucket('s3')}/run"
        if name == KERAS:
            cbs = [keras.callbacks.ModelCheckpoint(path, **common)]
        elif name == KERAS_BACKUP:  # what exact resume takes with Keras alone: both callbacks' stalls count
            cbs = [keras.callbacks.ModelCheckpoint(path, **common),
                   keras.callbacks.BackupAndRestore(backup_dir=str(d / "backup"), save_freq="epoch")]
        elif name == CLOUD:
            cbs = [cloud_callback(path, url, **common)]
        elif name == CLOUD_LOCAL:
            cbs = [cloud_callback(path, str(d / "store"), **common)]
        else:
            cbs = [sync_upload_callback(path, url, **common)]
        timer = HookTimer(*cbs)
        timers[name].append(timer)
        split = split_cloud_saves(cbs[0]) if name in (CLOUD, CLOUD_LOCAL) else []
        before = len(STATE_CALLS)
        model.fit(x, y, batch_size=batch, epochs=saves, verbose=0, callbacks=[*cbs, settle(cbs[0])], shuffle=False)
        timer.own_stalls = list(getattr(cbs[0], "stall_seconds", []))
        timer.saves = split
        timer.state_calls = STATE_CALLS[before:]
        return sum(timer.per_epoch.values()) / max(1, len(timer.per_epoch))

    model.fit(x, y, batch_size=batch, epochs=1, verbose=0)  # trace the train function outside the timings
    reps = 1 if mb >= 500 else max(1, ctx.sizes.reps - 1)
    interleaved(reps, {n: (lambda n=n: fit(n)) for n in names}, section=sec)
    for name in names:  # per-save samples replace the per-fit means that interleaved() recorded
        _per_save_details(sec.variant(name), timers[name])
    keras_med = sec.variant(KERAS).median
    ours = sec.variant(CLOUD).median
    sec.ratio = round(ours / keras_med, 3)
    sec.ratio_desc = "CloudCheckpoint stall / Keras local stall"
    sec.met = sec.ratio <= 1.05
    q1 = {n: sec.variant(n).lower_quartile for n in (KERAS, CLOUD)}
    own = sec.variant(CLOUD).extra.get("own_part_ms")
    sec.other_ratios = {
        f"CloudCheckpoint stall / {KERAS_BACKUP} stall (exact-resume baseline)":
            round(ours / sec.variant(KERAS_BACKUP).median, 3),
        "lower quartiles, CloudCheckpoint / Keras local (robust to the machine's slow saves)":
            round(q1[CLOUD] / q1[KERAS], 3),
    }
    sec.other_ratios[f"{CLOUD_LOCAL} / Keras local (no server on the machine)"] = \
        round(sec.variant(CLOUD_LOCAL).median / keras_med, 3)
    if own is not None:
        sec.other_ratios["cloudckpt's own part / Keras local stall"] = round(own / 1000 / keras_med, 4)
    sec.params = {"weights_MB": round(real_mb, 1), "hidden_width": hidden_width(mb), "batch": batch,
                  "steps_per_epoch": steps, "saves_per_fit": saves, "fits_per_variant": reps,
                  "save": "weights only (.weights.h5), save_freq='epoch'"}
    sec.notes.append("Each epoch starts once the previous checkpoint's upload is done (an epoch outlasts an upload "
                     "in real training); the wait is not counted. For CloudCheckpoint, keras_save_ms is Keras' own "
                     "save on the training thread inside its _save_model (none with the background capture, the "
                     "default) and own_part_ms cloudckpt's part (_stage: the host copy of the state and the hand-off "
                     "to the writer thread; with async_save=False the copy of what Keras' file lacks, hard link, "
                     "enqueue), capture_ms the synchronous path's copy alone; "
                     "state_write_threads names the thread that wrote the state to disk. For ModelCheckpoint + "
                     "BackupAndRestore, backup_ms is BackupAndRestore's share of the stall. train_end_s is "
                     "on_train_end (CloudCheckpoint: the final flush).")
    return sec


def _per_save_details(v, timers: list[HookTimer]) -> None:
    """Per-save samples, and the split of the stall into its parts, for one variant of a stall section."""
    v.samples = [round(s, 4) for t in timers for s in t.per_epoch.values()]
    v.extra["stall_ms"] = round(statistics.median(v.samples) * 1000, 1)
    v.extra["train_end_s"] = round(statistics.median(t.train_end for t in timers), 2)
    backup = [s for t in timers for s in t.by_callback.get("BackupAndRestore", {}).values()]
    if backup:
        v.extra["backup_ms"] = round(statistics.median(backup) * 1000, 1)
    own = [s for t in timers for s in getattr(t, "own_stalls", [])]
    if own:  # CloudCheckpoint's own record of the time spent in its save path, as a cross-check
        v.extra["own_stall_ms"] = round(statistics.median(own) * 1000, 1)
    split = [p for t in timers for p in getattr(t, "saves", [])]
    if split:
        v.extra["keras_save_ms"] = round(statistics.median(whole - part for whole, part in split) * 1000, 1)
        v.extra["own_part_ms"] = round(statistics.median(part for _, part in split) * 1000, 1)
    calls = [c for t in timers for c in getattr(t, "state_calls", [])]
    main = threading.main_thread().name
    for fn, key in (("capture", "capture_ms"), ("write_state", "state_write_ms")):
        on_main = [dt for f, dt, th in calls if f == fn and th == main]
        if on_main:  # part of the stall: done on the training thread
            v.extra[key] = round(statistics.median(on_main) * 1000, 1)
    if calls:
        v.extra["state_write_threads"] = sorted({th for f, _, th in calls if f == "write_state"})


# --- target 1: the training-thread stall of the background capture against Keras' own local save --------------------

FORMATS = ((".weights.h5", False), (".weights.h5", True), (".keras", False), (".keras", True))
SCORE = "bench_score"  # a monitored value that improves at every epoch: save_best_only then saves every epoch


def improving_score():
    """A callback (put before the checkpoint callbacks) that logs :data:`SCORE`, lower at every epoch."""
    import keras

    class Score(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if logs is not None:
                logs[SCORE] = 1.0 / (epoch + 1)

    return Score()


def add_target(sec: Section, tid: str, target: str, measured: str, value: float | None, limit: float) -> None:
    """One verdict, computed here from ``value`` (``met`` iff ``value <= limit``), in the shape every group uses:
    through ``Section.add_target`` where the harness has it, else in ``sec.params["targets"]``."""
    if hasattr(sec, "add_target"):
        sec.add_target(tid, target, measured, value=value, limit=limit)
        return
    met = value is not None and value == value and value <= limit
    sec.params.setdefault("targets", []).append(
        {"id": tid, "target": target, "measured": measured, "met": bool(met), "section": sec.id, "value": value,
         "op": "<=", "limit": limit})


def _spread(samples: list[float]) -> str:
    q = statistics.quantiles(samples, n=4, method="inclusive") if len(samples) > 1 else [samples[0]] * 3
    return f"{statistics.median(samples) * 1000:.0f} ms (IQR {q[0] * 1000:.0f}-{q[2] * 1000:.0f}, n={len(samples)})"


def formats_section(ctx: Ctx, mb: int) -> Section:
    """Target 1: per save, the training thread's time in the checkpoint callback's hooks, CloudCheckpoint (async
    capture, the default) against Keras' ModelCheckpoint writing the same file locally, for ``.weights.h5`` and
    ``.keras``, ``save_best_only`` False and True (a score that improves every epoch: every save point saves),
    interleaved fit by fit. The first save of each fit (first-touch allocation of the copy) is left out of neither."""
    import keras

    model = build_model(mb)
    real_mb = weights_mb(model)
    batch, steps = (8, 2) if mb >= 500 else (32, 4)
    x, y = digits()
    x, y = x[: batch * steps], y[: batch * steps]
    sec = Section(f"stall_async_{mb}MB", f"1. Training stall per checkpoint, background capture, {real_mb:.0f} MB",
                  "s", target="<= 0.5x Keras ModelCheckpoint (local), every format and save_best_only")
    saves = max(2, ctx.sizes.stall_saves if mb < 500 else min(3, ctx.sizes.stall_saves))
    model.fit(x, y, batch_size=batch, epochs=1, verbose=0)  # trace the train function outside the timings
    per_save: dict[str, list[float]] = defaultdict(list)

    def label(who: str, suffix: str, best: bool) -> str:
        return f"{who} {suffix} save_best_only={best}"

    def fit(who: str, suffix: str, best: bool) -> float:
        d = ctx.scratch / "async" / uuid.uuid4().hex[:8]
        d.mkdir(parents=True)
        path = str(d / f"model{suffix}")
        kw = dict(save_weights_only=suffix == ".weights.h5", monitor=SCORE, mode="min", save_best_only=best)
        cb = (keras.callbacks.ModelCheckpoint(path, **kw) if who == "keras"
              else cloud_callback(path, str(d / "store"), **kw))
        timer = HookTimer(cb)
        model.fit(x, y, batch_size=batch, epochs=saves, verbose=0, shuffle=False,
                  callbacks=[improving_score(), cb, settle(cb)])
        samples = list(timer.per_epoch.values())
        per_save[label(who, suffix, best)].extend(samples)
        return statistics.median(samples)

    runs = {}
    for suffix, best in FORMATS:
        for who in ("keras", "cloud"):
            runs[label(who, suffix, best)] = lambda w=who, s=suffix, b=best: fit(w, s, b)
    reps = 1 if mb >= 500 else max(1, ctx.sizes.reps - 1)
    interleaved(reps, runs, section=sec)
    for name, samples in per_save.items():
        sec.variant(name).samples = [round(v, 4) for v in samples]
        sec.variant(name).extra["stall"] = _spread(samples)
    worst = 0.0
    for suffix, best in FORMATS:
        k, c = sec.variant(label("keras", suffix, best)), sec.variant(label("cloud", suffix, best))
        r = round(c.median / k.median, 3) if k.median else None
        worst = max(worst, r if r is not None else float("inf"))
        sec.other_ratios[f"CloudCheckpoint / Keras, {suffix}, save_best_only={best}"] = r
        add_target(sec, "1", f"<= 0.5x Keras ModelCheckpoint ({real_mb:.0f} MB, {suffix}, save_best_only={best})",
                   f"CloudCheckpoint {c.extra['stall']} vs Keras {k.extra['stall']}: {r}x", r, 0.5)
    sec.ratio, sec.ratio_desc = worst, "worst CloudCheckpoint / Keras stall ratio over the four formats"
    sec.met = worst <= 0.5
    sec.params = {**sec.params, "weights_MB": round(real_mb, 1), "batch": batch, "steps_per_epoch": steps,
                  "saves_per_fit": saves, "fits_per_variant": reps, "monitor": f"{SCORE} (improves every epoch)"}
    sec.notes.append("Stall = the training thread's time in the callback's on_epoch_end/on_train_batch_end per save. "
                     "CloudCheckpoint's: Keras' saving walk into host copies + the resume state; the file is "
                     "written by its writer thread. Before each epoch the previous save's write and upload are "
                     "waited for (not counted), and dirty pages written back, for every variant.")
    return sec
