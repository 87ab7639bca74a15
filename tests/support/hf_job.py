"""A tiny, deterministic Hugging Face Trainer run committed with cloudckpt.hf.CloudCheckpointCallback (run as a
process by tests/test_hf_callback.py, killed and restarted with the same command on an emptied output_dir).

Usage: hf_job.py REMOTE OUTPUT_DIR FINAL [--step-delay S] [--raise-after-save N] [--slow-uploads S]

Prints ``resumed N`` (or ``fresh``), ``step N`` after every step, ``eval N LOSS`` per evaluation, ``saved N`` after
each checkpoint's ``on_save``, ``done``; writes the final model and optimizer state to FINAL (torch.save).
``--raise-after-save N``: a callback raises right after checkpoint-N is saved; ``--slow-uploads S``: every push
takes S seconds longer.
"""

from __future__ import annotations

import argparse
import logging
import time

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from cloudckpt.hf import CloudCheckpointCallback, pull_latest

SAVE_EVERY = 10


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(32, 16), torch.nn.ReLU(), torch.nn.Dropout(0.2),
                                        torch.nn.Linear(16, 4))

    def forward(self, x, labels=None):
        logits = self.body(x)
        return {"loss": torch.nn.functional.cross_entropy(logits, labels), "logits": logits}


class Rows(torch.utils.data.Dataset):
    def __init__(self, x, y) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


class Progress(TrainerCallback):
    def __init__(self, delay: float, raise_after_save: int | None = None) -> None:
        self.delay, self.raise_after_save = delay, raise_after_save

    def on_save(self, args, state, control, **kwargs):
        print(f"saved {state.global_step}", flush=True)
        if state.global_step == self.raise_after_save:
            raise RuntimeError(f"a callback failed after checkpoint-{state.global_step} was saved")

    def on_step_end(self, args, state, control, **kwargs):
        if self.delay:
            time.sleep(self.delay)  # stands in for a real step's compute, so a kill lands mid-run
        print(f"step {state.global_step}", flush=True)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        print(f"eval {state.global_step} {metrics['eval_loss']!r}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("remote")
    p.add_argument("output_dir")
    p.add_argument("final")
    p.add_argument("--step-delay", type=float, default=0.0)
    p.add_argument("--raise-after-save", type=int)
    p.add_argument("--slow-uploads", type=float, default=0.0)
    a = p.parse_args()
    if a.slow_uploads:
        from cloudckpt.store import CheckpointStore

        push = CheckpointStore.push

        def slow(self, source, **kw):
            time.sleep(a.slow_uploads)
            return push(self, source, **kw)

        CheckpointStore.push = slow
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(640, 32, generator=g)
    y = (x @ torch.randn(32, 4, generator=g)).argmax(1)
    args = TrainingArguments(
        a.output_dir, max_steps=60, per_device_train_batch_size=16, learning_rate=1e-2, seed=0,
        full_determinism=True, eval_strategy="steps", eval_steps=SAVE_EVERY, save_strategy="steps",
        save_steps=SAVE_EVERY, save_total_limit=1, metric_for_best_model="loss", greater_is_better=False,
        logging_steps=SAVE_EVERY, report_to=[], use_cpu=True, disable_tqdm=True, dataloader_num_workers=0)
    found = pull_latest(a.remote, a.output_dir)
    print(f"resumed {found.name.split('-')[1]}" if found else "fresh", flush=True)
    torch.manual_seed(0)  # the model's initial weights
    trainer = Trainer(Net(), args, train_dataset=Rows(x[:480], y[:480]), eval_dataset=Rows(x[480:], y[480:]),
                      callbacks=[CloudCheckpointCallback(a.remote, preemption_deadline=90),
                                 Progress(a.step_delay, a.raise_after_save)])
    trainer.train(resume_from_checkpoint=True if found else None)
    torch.save({"model": trainer.model.state_dict(), "optimizer": trainer.optimizer.state_dict()}, a.final)
    print("done", flush=True)


if __name__ == "__main__":
    main()
