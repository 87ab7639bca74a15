"""A Lightning run on scikit-learn's digits whose ModelCheckpoint files are committed by
cloudckpt.lightning.CloudCheckpointIO; on a new machine, pull_last + fit(ckpt_path="last") continue the run.

Store: $CLOUDCKPT_REMOTE, else ./lightning-store. SIGTERM saves last.ckpt at the next batch, commits it, exits 143.

    python examples/lightning_fit.py && cloudckpt ls lightning-store
    cloudckpt pull best --from lightning-store --to best
"""

import os

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from sklearn.datasets import load_digits

from cloudckpt.lightning import CloudCheckpointIO, CloudPreemption, pull_last

REMOTE = os.environ.get("CLOUDCKPT_REMOTE", "lightning-store")


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


x, y = load_digits(return_X_y=True)
x, y = torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)
data = torch.utils.data.TensorDataset
train = torch.utils.data.DataLoader(data(x[300:], y[300:]), batch_size=64, shuffle=True)
val = torch.utils.data.DataLoader(data(x[:300], y[:300]), batch_size=300)

io = CloudCheckpointIO(REMOTE)
ckpt = ModelCheckpoint("lightning-ckpts", monitor="val_loss", save_top_k=2, save_last=True)
trainer = pl.Trainer(max_epochs=5, plugins=[io], callbacks=[ckpt, CloudPreemption(io)], logger=False,
                     accelerator="cpu", enable_progress_bar=False)
pull_last(REMOTE, "lightning-ckpts")  # a new machine: the latest committed file becomes last.ckpt
trainer.fit(Net(), train, val, ckpt_path="last")
