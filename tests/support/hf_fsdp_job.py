"""A tiny, deterministic Hugging Face Trainer run under torchrun (gloo, CPU), FSDP2 with a sharded state dict, with
cloudckpt's CloudCheckpointCallback committing each checkpoint from every rank (run by tests/test_hf_fsdp.py,
SIGKILLed and restarted with the same command).

Usage (every rank): ``python -m torch.distributed.run --standalone --nproc_per_node N hf_fsdp_job.py REMOTE OUT
[--kill-step K --kill-rank R --failpoint P] [--preempt --step-delay S]``

Resumes from the run's latest checkpoint when there is one (``pull_latest``, every rank; prints ``resumed <path>``,
else ``fresh``); saves every 4 steps of 12. Every rank writes ``OUT/saving-<step>-<rank>.pt`` at each save step (its
local shards of the parameters and the optimizer state after that step, torch.save), ``OUT/restored-<rank>.pt`` at
the first step after a resume (what it restored) and ``OUT/final-<rank>.pt`` at the end. With ``--kill-step``, rank
R sets ``CLOUDCKPT_FAILPOINT=P`` at the end of step K (that rank SIGKILLs itself at that point of the step's save).
With ``--preempt`` the callback watches SIGTERM, every step sleeps ``--step-delay`` seconds first, rank 0 prints
``step <global_step>`` at each step end, and a rank leaving with status 143 prints ``preempted <step>`` and writes
``OUT/preempted-<rank>.pt`` (its local shards as saved).

accelerate (1.15) turns FSDP on only for accelerator devices (``AcceleratorState.__init__`` in accelerate/state.py
sets ``DistributedType.FSDP`` for MULTI_GPU/NPU/XPU/..., never MULTI_CPU: on CPU the plugin is silently dropped and
the model is wrapped in DDP). :class:`CpuFsdpAccelerator` sets what it sets on those devices, so the Trainer shards
the model with FSDP2 and saves through DCP exactly as on GPUs.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

import torch
import transformers.trainer as hf_trainer
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import nn
from torch.distributed.tensor import DTensor
from transformers import PretrainedConfig, PreTrainedModel, Trainer, TrainerCallback, TrainingArguments

from cloudckpt.hf import CloudCheckpointCallback, pull_latest


class CpuFsdpAccelerator(Accelerator):
    def __init__(self, *args, fsdp_plugin=None, **kwargs):
        super().__init__(*args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None:
            self.state.distributed_type = DistributedType.FSDP
            self.state.fsdp_plugin = fsdp_plugin


hf_trainer.Accelerator = CpuFsdpAccelerator


class TinyConfig(PretrainedConfig):
    model_type = "cloudckpt-tiny"

    def __init__(self, width: int = 16, **kwargs):
        self.width = width
        super().__init__(**kwargs)


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.lin = nn.Linear(width, width)

    def forward(self, x):
        return torch.relu(self.lin(x))


class Tiny(PreTrainedModel):
    config_class = TinyConfig
    _no_split_modules = ["Block"]

    def __init__(self, config: TinyConfig) -> None:
        super().__init__(config)
        self.b1, self.b2 = Block(config.width), Block(config.width)
        self.head = nn.Linear(config.width, 2)
        self.post_init()

    def get_input_embeddings(self):
        return None

    def get_output_embeddings(self):
        return None

    def forward(self, x, labels=None):
        logits = self.head(self.b2(self.b1(x)))
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


class Data(torch.utils.data.Dataset):
    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(64, 16, generator=g)
        self.y = (self.x.sum(1) > 0).long()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


def local_state(model: nn.Module, opt: torch.optim.Optimizer) -> dict:
    def local(t):
        return (t.to_local() if isinstance(t, DTensor) else t).detach().clone()

    return {"params": {k: local(v) for k, v in model.state_dict().items()},
            "opt": {i: {k: local(v) for k, v in s.items()} for i, s in enumerate(opt.state.values())}}


class Watch(TrainerCallback):
    def __init__(self, a: argparse.Namespace, resumed: bool) -> None:
        self.a, self.resumed = a, resumed
        self.rank = int(os.environ["RANK"])

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.a.step_delay:
            time.sleep(self.a.step_delay)
        if self.resumed:
            self.resumed = False
            torch.save(local_state(model, optimizer), Path(self.a.out) / f"restored-{self.rank}.pt")

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.a.preempt and self.rank == 0:
            print(f"step {state.global_step}", flush=True)
        if state.global_step % args.save_steps == 0:
            torch.save(local_state(model, optimizer), Path(self.a.out) / f"saving-{state.global_step}-{self.rank}.pt")
        if state.global_step == self.a.kill_step and self.rank == self.a.kill_rank:
            os.environ["CLOUDCKPT_FAILPOINT"] = self.a.failpoint

    def on_train_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        torch.save(local_state(model, optimizer), Path(self.a.out) / f"final-{self.rank}.pt")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("remote")
    p.add_argument("out")
    p.add_argument("--kill-step", type=int, default=-1)
    p.add_argument("--kill-rank", type=int, default=-1)
    p.add_argument("--failpoint", default="")
    p.add_argument("--preempt", action="store_true")
    p.add_argument("--step-delay", type=float, default=0.0)
    a = p.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    args = TrainingArguments(
        output_dir=str(Path(a.out) / "trainer"), per_device_train_batch_size=4, max_steps=12, save_steps=4,
        logging_steps=100, report_to=[], use_cpu=True, seed=0, dataloader_num_workers=0, disable_tqdm=True,
        fsdp=True, fsdp_config={"fsdp_version": 2, "transformer_layer_cls_to_wrap": ["Block"],
                                "state_dict_type": "SHARDED_STATE_DICT"})
    assert args.device.type == "cpu"  # initialises torch.distributed (gloo)
    found = pull_latest(a.remote, args.output_dir)
    if int(os.environ["RANK"]) == 0:
        print(f"resumed {found.name}" if found else "fresh", flush=True)
    torch.manual_seed(0)
    callback = CloudCheckpointCallback(a.remote, keep_last=2, preemption=["sigterm"] if a.preempt else None)
    trainer = Trainer(model=Tiny(TinyConfig()), args=args, train_dataset=Data(),
                      callbacks=[Watch(a, found is not None), callback])
    assert trainer.is_fsdp_enabled
    try:
        trainer.train(resume_from_checkpoint=str(found) if found else None)
    except SystemExit as exc:
        if exc.code == 143:
            torch.save(local_state(trainer.model, trainer.optimizer),
                       Path(a.out) / f"preempted-{os.environ['RANK']}.pt")
            print(f"preempted {trainer.state.global_step}", flush=True)
        raise
    if int(os.environ["RANK"]) == 0:
        print("done", flush=True)


if __name__ == "__main__":
    main()
