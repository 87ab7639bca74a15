"""A tiny, deterministic Lightning run whose ModelCheckpoint commits through cloudckpt.lightning.CloudCheckpointIO
(run as a process by tests/test_lightning_io.py, killed and restarted with the same command on an emptied folder).

Usage: lightning_job.py REMOTE ROOT FINAL [--step-delay S] [--train-delay S] [--periodic] [--epochs N] [--lr LR]

Prints ``resumed PATH`` (or ``fresh``), ``step N`` after every batch, ``val N LOSS`` per validation, ``done``; writes
the final model and optimizer state to FINAL (torch.save). ``--step-delay`` sleeps in a callback after each batch,
``--train-delay`` inside the training step (where a real step's compute and so most signals land). ``--periodic``:
Lightning's usual pair instead of one callback, a best-2 ModelCheckpoint by val_loss (``best-…``) and a periodic one
with no monitor and ``save_last=True`` (``periodic-…``, every epoch).
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from cloudckpt.lightning import CloudCheckpointIO, CloudPreemption, pull_last

STEPS_PER_EPOCH = 10


class Net(pl.LightningModule):
    def __init__(self, lr: float = 1e-2) -> None:
        super().__init__()
        self.train_delay = 0.0  # seconds slept in each training step (--train-delay); not a hyperparameter
        self.save_hyperparameters()
        self.body = torch.nn.Sequential(torch.nn.Linear(32, 16), torch.nn.ReLU(), torch.nn.Dropout(0.2),
                                        torch.nn.Linear(16, 4))

    def training_step(self, batch, i):
        x, y = batch
        if self.train_delay:
            time.sleep(self.train_delay)
        return torch.nn.functional.cross_entropy(self.body(x), y)

    def validation_step(self, batch, i):
        x, y = batch
        self.log("val_loss", torch.nn.functional.cross_entropy(self.body(x), y))

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        return [opt], [torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.9)]


class EpochSampler(torch.utils.data.Sampler):
    """A shuffle drawn from (seed, epoch): Lightning calls set_epoch, so a resumed run draws the same orders."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        return iter(torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist())


class Progress(pl.Callback):
    def __init__(self, delay: float) -> None:
        self.delay = delay

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.delay:
            time.sleep(self.delay)  # stands in for a real step's compute, so a kill lands mid-run
        print(f"step {trainer.global_step}", flush=True)
        if os.environ.get("JOB_DIE_AT") == str(trainer.global_step):
            os._exit(9)

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            print(f"val {trainer.global_step} {float(trainer.callback_metrics['val_loss'])!r}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("remote")
    p.add_argument("root")
    p.add_argument("final")
    p.add_argument("--step-delay", type=float, default=0.0)
    p.add_argument("--train-delay", type=float, default=0.0)
    p.add_argument("--periodic", action="store_true")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--lr", type=float, default=1e-2)
    a = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    pl.seed_everything(0, workers=True)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(200, 32, generator=g)
    y = (x @ torch.randn(32, 4, generator=g)).argmax(1)
    train = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[:160], y[:160]), batch_size=16,
                                        sampler=EpochSampler(160, 3))
    val = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[160:], y[160:]), batch_size=40)
    io = CloudCheckpointIO(a.remote)
    if a.periodic:
        ckpt = ModelCheckpoint(f"{a.root}/ckpts", filename="best-{epoch}-{step}", monitor="val_loss", mode="min",
                               save_top_k=2)
        saving = [ckpt, ModelCheckpoint(f"{a.root}/ckpts", filename="periodic-{epoch}-{step}", save_top_k=-1,
                                        every_n_epochs=1, save_last=True)]
    else:
        ckpt = ModelCheckpoint(f"{a.root}/ckpts", monitor="val_loss", mode="min", save_top_k=2, save_last=True,
                               every_n_train_steps=STEPS_PER_EPOCH)
        saving = [ckpt]
    # CloudPreemption last: it ends the run inside on_train_batch_end, so callbacks listed after it never see the
    # step it commits (this one prints each step before the check, so the last line printed is the committed step)
    trainer = pl.Trainer(max_epochs=a.epochs, plugins=[io],
                         callbacks=[Progress(a.step_delay), *saving, CloudPreemption(io)],
                         default_root_dir=a.root, deterministic=True, accelerator="cpu", devices=1, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    found = pull_last(a.remote, f"{a.root}/ckpts")
    print(f"resumed {found}" if found else "fresh", flush=True)
    model = Net(lr=a.lr)
    model.train_delay = a.train_delay
    trainer.fit(model, train, val, ckpt_path="last")
    torch.save({"model": model.state_dict(), "optimizer": trainer.optimizers[0].state_dict()}, a.final)
    print(f"best {Path(ckpt.best_model_path).name} {float(ckpt.best_model_score)!r}", flush=True)
    print("done", flush=True)


if __name__ == "__main__":
    main()
