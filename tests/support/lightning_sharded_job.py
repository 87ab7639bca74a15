"""A tiny, deterministic Lightning run under torchrun (gloo, CPU) with cloudckpt.lightning.CloudModelParallelStrategy:
FSDP2 over the ranks, one checkpoint committed per epoch (run by tests/test_lightning_sharded.py, SIGKILLed and
restarted with the same command).

Usage (every rank): ``python -m torch.distributed.run --standalone --nproc_per_node N lightning_sharded_job.py
REMOTE ROOT OUT [--epochs E] [--kill-epoch K --kill-rank R --failpoint P] [--preempt --step-delay S]``

Resumes from the run's latest checkpoint when there is one (prints ``resumed <ckpt_path>``, else ``fresh``); on
rank 0 prints ``val <step> <val_loss>`` (validation each epoch; a ModelCheckpoint monitoring val_loss saves after it)
and ``saved <step>`` after each commit. Writes ``OUT/saving-<step>-<rank>.pt`` at each validation end, just before
the save, and ``OUT/final-<rank>.pt`` at the end: this rank's local shards of the parameters and of the optimizer
state (torch.save). With ``--kill-epoch``, rank R sets ``CLOUDCKPT_FAILPOINT=P`` at the start of epoch K (that rank
SIGKILLs itself at that point of the epoch's save). After a resume every rank writes ``OUT/restored-<rank>.pt``: its
local shards right after the restore.

With ``--preempt`` a CloudPreemption (SIGTERM only) is the last callback, every training step sleeps ``--step-delay``
seconds, rank 0 prints ``step <global_step>`` at each batch end, and a rank leaving with status 143 prints
``preempted <step>`` and writes ``OUT/preempted-<rank>.pt`` (its local shards as saved).
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
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from cloudckpt.lightning import EXIT_PREEMPTED, CloudModelParallelStrategy, CloudPreemption

STEPS_PER_EPOCH = 4


class Net(pl.LightningModule):
    def __init__(self, lr: float = 1e-2, step_delay: float = 0.0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.body = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))

    def configure_model(self) -> None:
        mesh = self.device_mesh["data_parallel"]
        for layer in self.body:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self.body, mesh=mesh)

    def training_step(self, batch, i):
        if self.hparams.step_delay:
            time.sleep(self.hparams.step_delay)
        x, y = batch
        return torch.nn.functional.cross_entropy(self.body(x), y)

    def validation_step(self, batch, i):
        x, y = batch
        self.log("val_loss", torch.nn.functional.cross_entropy(self.body(x), y), sync_dist=True)

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        return [opt], [torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.9)]


def local_state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict:
    """This rank's shards of the parameters and the optimizer state, as plain tensors."""
    def local(t):
        return (t.to_local() if isinstance(t, DTensor) else t).detach().clone()

    return {"params": {k: local(v) for k, v in model.state_dict().items()},
            "opt": {i: {k: local(v) for k, v in s.items()} for i, s in enumerate(opt.state.values())}}


class Watch(pl.Callback):
    def __init__(self, a: argparse.Namespace, strategy: CloudModelParallelStrategy) -> None:
        self.a, self.strategy, self.seen = a, strategy, 0

    def on_train_start(self, trainer, pl_module):
        if trainer.ckpt_path:
            torch.save(local_state(pl_module, trainer.optimizers[0]),
                       Path(self.a.out) / f"restored-{trainer.global_rank}.pt")

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.a.kill_epoch and trainer.global_rank == self.a.kill_rank:
            os.environ["CLOUDCKPT_FAILPOINT"] = self.a.failpoint

    def on_validation_end(self, trainer, pl_module):  # before ModelCheckpoint's save (Lightning runs those last)
        torch.save(local_state(pl_module, trainer.optimizers[0]),
                   Path(self.a.out) / f"saving-{trainer.global_step}-{trainer.global_rank}.pt")
        if trainer.global_rank == 0:
            print(f"val {trainer.global_step} {float(trainer.callback_metrics['val_loss'])!r}", flush=True)

    def on_train_epoch_end(self, trainer, pl_module):
        self.report()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, i):
        if self.a.preempt and trainer.global_rank == 0:
            print(f"step {trainer.global_step}", flush=True)

    def on_exception(self, trainer, pl_module, exception):  # before CloudPreemption's (listed first): no-op there
        if isinstance(exception, SystemExit) and exception.code == EXIT_PREEMPTED:
            torch.save(local_state(pl_module, trainer.optimizers[0]),
                       Path(self.a.out) / f"preempted-{trainer.global_rank}.pt")
            print(f"preempted {trainer.global_step}", flush=True)

    def report(self) -> None:
        while len(self.strategy.committed) > self.seen:
            print(f"saved {self.strategy.committed[self.seen].step}", flush=True)
            self.seen += 1

    def on_train_end(self, trainer, pl_module):
        self.report()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("remote")
    p.add_argument("root")
    p.add_argument("out")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--kill-epoch", type=int, default=-1)
    p.add_argument("--kill-rank", type=int, default=-1)
    p.add_argument("--failpoint", default="")
    p.add_argument("--preempt", action="store_true")
    p.add_argument("--step-delay", type=float, default=0.0)
    a = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    pl.seed_everything(0, workers=True)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(160, 32, generator=g)
    y = (x @ torch.randn(32, 4, generator=g)).argmax(1)
    # Lightning wraps the loader in a DistributedSampler (seed 0, set_epoch): a resumed run draws the same batches
    train = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[:128], y[:128]), batch_size=16,
                                        shuffle=True)
    val = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[128:], y[128:]), batch_size=16)
    strategy = CloudModelParallelStrategy(a.remote, writer_options={"keep_last": 2}, data_parallel_size=2,
                                          tensor_parallel_size=1)
    ckpt = ModelCheckpoint(f"{a.root}/ckpts", monitor="val_loss", save_top_k=-1, every_n_epochs=1)
    trainer = pl.Trainer(max_epochs=a.epochs, accelerator="cpu", devices=2, strategy=strategy,
                         callbacks=[Watch(a, strategy), ckpt,
                                    *([CloudPreemption(sources=["sigterm"])] if a.preempt else [])],
                         default_root_dir=a.root, deterministic=True,
                         logger=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0)
    resume = strategy.resume_path()
    model = Net(step_delay=a.step_delay)
    trainer.fit(model, train, val, ckpt_path=resume)
    if trainer.global_rank == 0:
        print(f"resumed {resume}" if resume else "fresh", flush=True)
    torch.save(local_state(model, trainer.optimizers[0]), Path(a.out) / f"final-{trainer.global_rank}.pt")
    print("done", flush=True)


if __name__ == "__main__":
    main()
