"""A Lightning run on scikit-learn's digits whose ModelCheckpoint files are committed by
cloudckpt.lightning.CloudCheckpointIO; on a new machine, pull_last + fit(ckpt_path="last") continue the run.

Two ModelCheckpoints, as a preemptible run wants them: the best two by val_loss, and a periodic one (every
``--every`` training steps, with ``last.ckpt``). The periodic one matters: a monitored ModelCheckpoint writes nothing,
not even ``last.ckpt``, once val_loss stops improving, so a run killed late in a plateau would resume from the last
improvement. Store: ``--remote`` (or $CLOUDCKPT_REMOTE), else ./lightning-store. SIGTERM saves last.ckpt at the next
batch, commits it, exits 143.

    python examples/lightning_fit.py && cloudckpt ls -r lightning-store
    cloudckpt pull best -r lightning-store --to best
"""

import argparse
import os

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from sklearn.datasets import load_digits

from cloudckpt.lightning import CloudCheckpointIO, CloudPreemption, pull_last


class Net(pl.LightningModule):
    def __init__(self, lr: float = 1e-3):
        super().__init__()
        self.save_hyperparameters()  # plain values only: checkpoints are read with weights_only=True
        self.body = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))

    def training_step(self, batch, i):
        x, y = batch
        return torch.nn.functional.cross_entropy(self.body(x), y)

    def validation_step(self, batch, i):
        x, y = batch
        self.log("val_loss", torch.nn.functional.cross_entropy(self.body(x), y))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--remote", default=os.environ.get("CLOUDCKPT_REMOTE", "lightning-store"))
    p.add_argument("--dir", default="lightning-ckpts", help="the local checkpoint folder")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--every", type=int, default=10, help="training steps between periodic checkpoints")
    p.add_argument("--lr", type=float, default=1e-3)
    a = p.parse_args()

    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)
    data = torch.utils.data.TensorDataset
    train = torch.utils.data.DataLoader(data(x[300:], y[300:]), batch_size=64, shuffle=True)
    val = torch.utils.data.DataLoader(data(x[:300], y[:300]), batch_size=300)

    io = CloudCheckpointIO(a.remote)
    best = ModelCheckpoint(a.dir, filename="best-{epoch}-{step}", monitor="val_loss", save_top_k=2)
    periodic = ModelCheckpoint(a.dir, filename="periodic-{epoch}-{step}", every_n_train_steps=a.every,
                               save_last=True)  # no monitor: keeps the newest; last.ckpt follows it
    # CloudPreemption last: it ends the run inside on_train_batch_end (callbacks after it would miss that step)
    trainer = pl.Trainer(max_epochs=a.epochs, plugins=[io], callbacks=[best, periodic, CloudPreemption(io)],
                         logger=False, accelerator="cpu", enable_progress_bar=False)
    found = pull_last(a.remote, a.dir)  # a new machine: the latest committed file becomes last.ckpt
    print(f"resuming from {found}" if found else "starting fresh", flush=True)
    trainer.fit(Net(a.lr), train, val, ckpt_path="last")
    print(f"done at step {trainer.global_step}", flush=True)


if __name__ == "__main__":
    main()
