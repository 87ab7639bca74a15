"""A Hugging Face Trainer on scikit-learn's digits whose checkpoint-N folders are committed to a store by
cloudckpt.hf.CloudCheckpointCallback; on a new machine, pull_latest + resume_from_checkpoint=True continue the run.

Store: $CLOUDCKPT_REMOTE, else ./hf-store. SIGTERM saves the current step, commits it and exits with status 143.

    python examples/hf_trainer.py && cloudckpt ls hf-store && cloudckpt pull best --from hf-store --to best
"""

import os

import torch
from sklearn.datasets import load_digits
from transformers import Trainer, TrainingArguments

from cloudckpt.hf import CloudCheckpointCallback, pull_latest

REMOTE = os.environ.get("CLOUDCKPT_REMOTE", "hf-store")


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))

    def forward(self, x, labels=None):
        logits = self.body(x)
        return {"loss": torch.nn.functional.cross_entropy(logits, labels), "logits": logits}


class Rows(torch.utils.data.Dataset):
    def __init__(self, x, y):
        self.x, self.y = torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


x, y = load_digits(return_X_y=True)
args = TrainingArguments("hf-out", max_steps=200, per_device_train_batch_size=32, learning_rate=1e-3, seed=0,
                         eval_strategy="steps", eval_steps=50, save_strategy="steps", save_steps=50,
                         save_total_limit=1, metric_for_best_model="loss", greater_is_better=False, report_to=[],
                         use_cpu=True, disable_tqdm=True)
found = pull_latest(REMOTE, args.output_dir)  # None on a fresh run
torch.manual_seed(0)
trainer = Trainer(Net(), args, train_dataset=Rows(x[300:], y[300:]), eval_dataset=Rows(x[:300], y[:300]),
                  callbacks=[CloudCheckpointCallback(REMOTE, keep_best=1, keep_last=2)])
trainer.train(resume_from_checkpoint=True if found else None)
