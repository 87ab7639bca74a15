"""Measurement 9: the training-thread stall per checkpoint of the PyTorch-family adapters, each against its
framework's own local save of the same state (PyTorch, Lightning, Hugging Face Trainer; CPU).

Per framework, side by side in one run, with interleaved repetitions:

- PyTorch: ``torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, file)`` vs
  ``cloudckpt.torch.CheckpointManager.save(step, <the same dict>)`` to a local store. Both timed calls include
  building the state dicts; one training step runs between saves (not timed).
- Lightning: ``trainer.save_checkpoint(path)`` from a callback at every batch end, inside ``fit``, with Lightning's
  default ``TorchCheckpointIO`` vs with ``CloudCheckpointIO`` (local store) as the plugin: the same checkpoint dict
  (``dump_checkpoint``: model, optimizer, loops, callbacks) either way.
- Hugging Face: the Trainer's own checkpoint save at every step (``Trainer._save_checkpoint``: model.safetensors,
  optimizer.pt, scheduler.pt, rng_state.pth, trainer_state.json, rotation by ``save_total_limit=2``) without a
  callback vs with ``CloudCheckpointCallback`` (local store); the stall with it is ``_save_checkpoint`` plus the
  callback's ``on_save``, and the callback's own part is that ``on_save``.

The model is the digits MLP of :mod:`bench.model` (64 -> h -> h -> 10) trained with Adam(W), sized so that the
weights and Adam's two moments together take about the section's MB. After each save, outside the timing, the harness
waits until cloudckpt's background commit is done (``commit_ms``: from the save's return to the commit), writes dirty
pages back (``os.sync``) and waits :data:`bench.stall.SETTLE_GAP` — every variant alike, as in :mod:`bench.stall`.
In Lightning and Hugging Face fits the first save of each fit is reported apart (``first_save_ms``), not as a sample:
there the caches are cold and CloudCheckpointIO opens the store (claims the run).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import statistics
import time
import uuid
import warnings
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from .common import Ctx, Section, guarded, interleaved, log
from .model import hidden_width, tensor_mb, torch_digits, torch_mlp
from .stall import SETTLE_GAP

TARGET = "<= 1.05x the framework's own local save"
BATCH = 32
TORCH_OWN = "torch.save of the state dicts (local file)"
TORCH_OURS = "cloudckpt CheckpointManager.save (local store)"
LIGHTNING_OWN = "Lightning trainer.save_checkpoint, TorchCheckpointIO (local file)"
LIGHTNING_OURS = "cloudckpt trainer.save_checkpoint, CloudCheckpointIO (local store)"
HF_OWN = "HF Trainer checkpoint save, no callback (local folder)"
HF_OURS = "cloudckpt HF Trainer save + CloudCheckpointCallback.on_save (local store)"
#: PyTorch's intra-op threads here. With its default (one per core), each tensor copy to new CPU memory is a parallel
#: region: on this shared 2-core machine under load it waited ~1 ms per tensor for the second thread to be scheduled
#: (a 2 MB state: 20-37 ms instead of 1-5 ms), which measures the scheduler, not the copy. torch.save is one thread.
THREADS = 1
NEEDS = {"torch": ("torch",), "lightning": ("torch", "lightning"), "hf": ("torch", "transformers")}


def missing(framework: str) -> str | None:
    """None when ``framework``'s section can run, else why not."""
    for mod in NEEDS[framework]:
        if importlib.util.find_spec(mod) is None:
            return f"{mod} is not installed (pip install '.[{framework}]')"
    if importlib.util.find_spec(f"cloudckpt.{framework}") is None:
        return f"cloudckpt.{framework} is not in this checkout"
    return None


def run(ctx: Ctx) -> list[Section]:
    """Every framework's section per size, PyTorch on one intra-op thread (see :data:`THREADS`)."""
    sections = (("torch", "PyTorch loop", torch_section), ("lightning", "Lightning", lightning_section),
                ("hf", "Hugging Face Trainer", hf_section))
    threads = None
    if missing("torch") is None:
        import torch

        threads = torch.get_num_threads()
        torch.set_num_threads(THREADS)
    out = []
    try:
        for mb in ctx.sizes.framework_mb:
            for fw, name, fn in sections:
                sid, title = f"fw_{fw}_{mb}MB", f"9. {name}: training-thread stall per checkpoint, ~{mb} MB of state"
                why = missing(fw)
                if why:
                    out.append(Section(sid, title, "s", skipped=why))
                    continue
                log.info("%s, %d MB of state", name, mb)
                out.append(guarded(sid, title, lambda fn=fn, mb=mb: fn(ctx, mb)))
    finally:
        if threads is not None:
            torch.set_num_threads(threads)
    return out


# --- shared pieces ---------------------------------------------------------------------------------------------------

def settle(wait: Callable[[], object] | None = None) -> float | None:
    """Outside the timings, after a save: wait for its commit (returns the seconds that took), write dirty pages
    back and wait :data:`SETTLE_GAP` — so that one save's background work never overlaps the next save."""
    t0 = time.perf_counter()
    if wait is not None:
        wait()
    took = time.perf_counter() - t0 if wait is not None else None
    os.sync()
    time.sleep(SETTLE_GAP)
    return took


def timer(fn: Callable, into: list[float]) -> Callable:
    """``fn`` wrapped so that each call appends its seconds to ``into``."""
    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            into.append(time.perf_counter() - t0)

    return timed


def ms(values: list[float]) -> float:
    return round(statistics.median(values) * 1000, 1)


def finish(sec: Section, own: str, ours: str, *, own_part: list[float] | None = None) -> Section:
    """Ratio (cloudckpt's stall / the framework's own save, medians), the lower-quartile ratio beside it, and the
    share of cloudckpt's own part."""
    for v in sec.variants:
        v.extra["stall_ms"] = ms(v.samples)
    base, mine = sec.variant(own).median, sec.variant(ours).median
    assert base and mine
    sec.ratio = round(mine / base, 3)
    sec.ratio_desc = "cloudckpt stall / the framework's own save"
    sec.met = sec.ratio <= 1.05
    if min(len(sec.variant(n).samples) for n in (own, ours)) >= 2:
        q1 = {n: sec.variant(n).lower_quartile for n in (own, ours)}
        sec.other_ratios["lower quartiles, cloudckpt / the framework's own save"] = round(q1[ours] / q1[own], 3)
    if own_part:
        sec.other_ratios["cloudckpt's own part / the framework's own save"] = \
            round(statistics.median(own_part) / base, 4)
    sec.params["load_end"] = os.getloadavg()
    return sec


# --- PyTorch ---------------------------------------------------------------------------------------------------------

def torch_section(ctx: Ctx, mb: int) -> Section:
    import torch

    from cloudckpt.torch import CheckpointManager

    model = torch_mlp(mb)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = torch_digits(BATCH)

    def train_step() -> None:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    def state() -> dict[str, Any]:
        return {"model": model.state_dict(), "optimizer": opt.state_dict()}

    train_step()  # Adam's moments exist from here on
    real = tensor_mb(state())
    d = ctx.scratch / f"torch-{mb}-{uuid.uuid4().hex[:6]}"
    d.mkdir(parents=True)
    sec = Section(f"fw_torch_{mb}MB", f"9. PyTorch loop: training-thread stall per checkpoint, {real:.0f} MB of state",
                  "s", target=TARGET)
    commits: list[float] = []
    step = 0

    def own() -> float:
        train_step()
        t0 = time.perf_counter()
        torch.save(state(), d / "own.pt")
        took = time.perf_counter() - t0
        settle()
        return took

    def ours() -> float:
        nonlocal step
        train_step()
        step += 1
        t0 = time.perf_counter()
        job = mgr.save(step, state())
        took = time.perf_counter() - t0
        commits.append(settle(job.done.wait) or 0.0)
        if job.error is not None:
            raise job.error
        return took

    mgr = CheckpointManager(str(d / "store"), keep_last=2, preemption=None, staging_dir=d)
    try:
        interleaved(ctx.sizes.reps * ctx.sizes.framework_saves, {TORCH_OWN: own, TORCH_OURS: ours}, section=sec,
                    warmup=True)
    finally:
        mgr.close()
    sec.variant(TORCH_OURS).extra["commit_ms"] = ms(commits[1:])  # [0]: the warm-up save
    sec.params = {"state_MB": round(real, 1), "hidden_width": hidden_width(mb / 3), "optimizer": "Adam",
                  "saves_per_variant": ctx.sizes.reps * ctx.sizes.framework_saves, "threads": torch.get_num_threads()}
    sec.notes.append("Both calls build the state dicts; torch.save writes model+optimizer to one local file (page "
                     "cache, no fsync). CheckpointManager.save copies every tensor to new CPU memory on the training "
                     "thread and queues the job; torch.save of that copy and the commit (checksums, index swap) run "
                     "on the uploader thread: commit_ms, from save() returning to the commit.")
    return finish(sec, TORCH_OWN, TORCH_OURS)


# --- Lightning -------------------------------------------------------------------------------------------------------

def lightning_section(ctx: Ctx, mb: int) -> Section:
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.plugins.io import TorchCheckpointIO

    from cloudckpt.lightning import CloudCheckpointIO

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # Lightning sets INFO when it is imported
    x, y = torch_digits(BATCH * ctx.sizes.framework_saves)

    class Net(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.body = torch_mlp(mb)

        def training_step(self, batch, i):
            xb, yb = batch
            return torch.nn.functional.cross_entropy(self.body(xb), yb)

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    writes: list[float] = []  # TorchCheckpointIO.save_checkpoint (Lightning's write), either plugin
    io_total: list[float] = []  # CloudCheckpointIO.save_checkpoint, all of it
    state_mb: list[float] = []
    rec: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))

    class Saver(pl.Callback):
        """Saves at every batch end, as ModelCheckpoint(every_n_train_steps=1, save_last=True) would."""

        def __init__(self, name: str, path, io: CloudCheckpointIO | None) -> None:
            self.name, self.path, self.io, self.first = name, path, io, True

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if self.first:
                state_mb.append(tensor_mb(pl_module.state_dict()) + tensor_mb(trainer.optimizers[0].state_dict()))
            before, io_before = len(writes), len(io_total)
            t0 = time.perf_counter()
            trainer.save_checkpoint(self.path)
            took = time.perf_counter() - t0
            r = rec[self.name]
            commit = settle(self.io.wait if self.io is not None else None)
            if self.first:
                r["first"].append(took)
                self.first = False
                return
            r["stall"].append(took)
            r["write"].append(sum(writes[before:]))
            if self.io is not None:
                r["io"].append(sum(io_total[io_before:]))
                r["commit"].append(commit or 0.0)

    def fit(name: str) -> float:
        d = ctx.scratch / f"lightning-{uuid.uuid4().hex[:8]}"
        d.mkdir(parents=True)
        io = CloudCheckpointIO(str(d / "store"), staging_dir=d) if name == LIGHTNING_OURS else None
        if io is not None:  # the plugin's whole save_checkpoint, to split cloudckpt's own part from Lightning's
            io.save_checkpoint = timer(io.save_checkpoint, io_total)  # type: ignore[method-assign]
        n = len(rec[name]["stall"])
        trainer = pl.Trainer(max_steps=ctx.sizes.framework_saves, accelerator="cpu", devices=1,
                             plugins=[io] if io is not None else None, callbacks=[Saver(name, d / "last.ckpt", io)],
                             enable_checkpointing=False, logger=False, enable_progress_bar=False,
                             enable_model_summary=False, default_root_dir=d)
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=BATCH)
        trainer.fit(Net(), loader)
        return statistics.mean(rec[name]["stall"][n:])

    real_write = TorchCheckpointIO.save_checkpoint
    sec = Section(f"fw_lightning_{mb}MB", "", "s", target=TARGET)
    TorchCheckpointIO.save_checkpoint = timer(real_write, writes)  # type: ignore[method-assign]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Lightning's advice on dataloader workers, on this tiny loader
            interleaved(ctx.sizes.reps, {LIGHTNING_OWN: lambda: fit(LIGHTNING_OWN),
                                         LIGHTNING_OURS: lambda: fit(LIGHTNING_OURS)}, section=sec)
    finally:
        TorchCheckpointIO.save_checkpoint = real_write  # type: ignore[method-assign]
    real = statistics.median(state_mb)
    sec.title = f"9. Lightning: training-thread stall per checkpoint, {real:.0f} MB of state"
    ours = rec[LIGHTNING_OURS]
    own_part = [whole - write for whole, write in zip(ours["io"], ours["write"])]
    for name in (LIGHTNING_OWN, LIGHTNING_OURS):
        v, r = sec.variant(name), rec[name]
        v.samples = [round(s, 4) for s in r["stall"]]  # per save, replacing the per-fit means
        v.extra["framework_write_ms"] = ms(r["write"])
        v.extra["first_save_ms"] = ms(r["first"])
    sec.variant(LIGHTNING_OURS).extra["own_part_ms"] = ms(own_part)
    sec.variant(LIGHTNING_OURS).extra["commit_ms"] = ms(ours["commit"])
    sec.params = {"state_MB": round(real, 1), "hidden_width": hidden_width(mb / 3), "optimizer": "Adam",
                  "fits_per_variant": ctx.sizes.reps, "saves_per_fit": ctx.sizes.framework_saves,
                  "threads": torch.get_num_threads()}
    sec.notes.append("The stall is trainer.save_checkpoint: dump_checkpoint (Lightning) plus the plugin's "
                     "save_checkpoint. framework_write_ms is TorchCheckpointIO.save_checkpoint (torch.save to a "
                     "buffer, then an atomic file write); own_part_ms is the rest of CloudCheckpointIO.save_checkpoint"
                     " (the host RNG states added, the plain-data check, a hard link, the enqueue).")
    return finish(sec, LIGHTNING_OWN, LIGHTNING_OURS, own_part=own_part)


# --- Hugging Face ----------------------------------------------------------------------------------------------------

def hf_section(ctx: Ctx, mb: int) -> Section:
    import torch
    import transformers
    from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

    from cloudckpt.hf import CloudCheckpointCallback

    transformers.logging.set_verbosity_error()
    x, y = torch_digits(BATCH * ctx.sizes.framework_saves)

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = torch_mlp(mb)

        def forward(self, x, labels=None):
            logits = self.body(x)
            return {"loss": torch.nn.functional.cross_entropy(logits, labels), "logits": logits}

    class Rows(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(x)

        def __getitem__(self, i):
            return {"x": x[i], "labels": y[i]}

    rec: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    state_mb: list[float] = []

    class Settle(TrainerCallback):
        """After the cloudckpt callback (or alone): the commit's wait, write-back and gap; not timed."""

        def __init__(self, cb: CloudCheckpointCallback | None) -> None:
            self.cb = cb

        def on_save(self, args, state, control, **kwargs):
            uploader = self.cb.uploader if self.cb is not None else None
            took = settle((lambda: uploader.flush(600)) if uploader is not None else None)
            if took is not None:
                rec[HF_OURS]["commit_all"].append(took)

    def fit(name: str) -> float:
        d = ctx.scratch / f"hf-{uuid.uuid4().hex[:8]}"
        cb = CloudCheckpointCallback(str(d / "store"), preemption=None, staging_dir=d) if name == HF_OURS else None
        args = TrainingArguments(str(d / "out"), max_steps=ctx.sizes.framework_saves, per_device_train_batch_size=BATCH,
                                 save_strategy="steps", save_steps=1, save_total_limit=2, logging_strategy="no",
                                 report_to=[], use_cpu=True, disable_tqdm=True, dataloader_num_workers=0, seed=0)
        trainer = Trainer(Net(), args, train_dataset=Rows(), callbacks=[c for c in (cb, Settle(cb)) if c is not None])
        trainer.remove_callback(PrinterCallback)  # it prints the run's summary dict
        saves: list[float] = []
        hooks: list[float] = []
        trainer._save_checkpoint = timer(trainer._save_checkpoint, saves)  # type: ignore[method-assign]
        if cb is not None:
            cb.on_save = timer(cb.on_save, hooks)  # type: ignore[method-assign]
        trainer.train()
        state_mb.append(tensor_mb(trainer.model.state_dict()) + tensor_mb(trainer.optimizer.state_dict()))
        r = rec[name]
        stalls = [s + (hooks[i] if cb is not None else 0.0) for i, s in enumerate(saves)]
        r["first"].append(stalls[0])
        r["stall"].extend(stalls[1:])
        r["trainer"].extend(saves[1:])
        if cb is not None:
            r["hook"].extend(hooks[1:])
            r["commit"].extend(r.pop("commit_all")[1:])
        return statistics.mean(stalls[1:])

    sec = Section(f"fw_hf_{mb}MB", "", "s", target=TARGET)
    interleaved(ctx.sizes.reps, {HF_OWN: lambda: fit(HF_OWN), HF_OURS: lambda: fit(HF_OURS)}, section=sec)
    real = statistics.median(state_mb)
    sec.title = f"9. Hugging Face Trainer: training-thread stall per checkpoint, {real:.0f} MB of state"
    for name in (HF_OWN, HF_OURS):
        v, r = sec.variant(name), rec[name]
        v.samples = [round(s, 4) for s in r["stall"]]
        v.extra["trainer_save_ms"] = ms(r["trainer"])
        v.extra["first_save_ms"] = ms(r["first"])
    ours = rec[HF_OURS]
    sec.variant(HF_OURS).extra["own_part_ms"] = ms(ours["hook"])
    sec.variant(HF_OURS).extra["commit_ms"] = ms(ours["commit"])
    sec.params = {"state_MB": round(real, 1), "hidden_width": hidden_width(mb / 3), "optimizer": "AdamW (Trainer's)",
                  "fits_per_variant": ctx.sizes.reps, "saves_per_fit": ctx.sizes.framework_saves,
                  "save_total_limit": 2, "threads": torch.get_num_threads()}
    sec.notes.append("The stall is Trainer._save_checkpoint (the Trainer's own save, with the rotation of "
                     "save_total_limit) plus, with cloudckpt, CloudCheckpointCallback.on_save (own_part_ms: listing "
                     "checkpoint-N, hard links, the enqueue). trainer_save_ms is _save_checkpoint alone.")
    return finish(sec, HF_OWN, HF_OURS, own_part=ours["hook"])
