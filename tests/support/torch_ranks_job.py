"""One rank of a deterministic training job checkpointed with cloudckpt.torch.CheckpointManager under
torch.distributed (gloo, CPU); tests/test_torch_ranks.py starts every rank as its own process, as torchrun does
(RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT in the environment), kills ranks and restarts the job.

Usage: torch_ranks_job.py REMOTE OUT [--kind ddp|fsdp] [--steps N] [--save-every N] [--step-delay S]
    [--kill-at S --kill-rank R --failpoint P]

``ddp``: DistributedDataParallel, the replicated state dicts (rank 0 writes them); ``fsdp``: FSDP2 ``fully_shard``
on a CPU mesh, ``get_state_dict`` (DTensor shards, saved through DCP). Every rank prints ``resumed S`` (or
``fresh``), ``step S`` after every step, ``saved S`` after each save, ``done`` at the end; rank 0 writes the full
final state (DTensors gathered) to OUT. With ``--kill-at``, rank R sets ``CLOUDCKPT_FAILPOINT=P`` before the save at
step S (the failpoint SIGKILLs it there). After each save every rank prints ``wait S <mgr.wait()> <failed
steps>``; with ``--rank0-saves`` only rank 0 calls ``save`` (``if rank == 0``); with ``--fail-at S`` rank 0's
upload of the save at step S fails once (ENOSPC; committed at close). ``--probe-missing``: first restore a step
that has no checkpoint and print ``missing: <error type>``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from dcp_job import full  # the same directory: DTensors gathered to full tensors
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from cloudckpt.errors import CheckpointNotFoundError
from cloudckpt.torch import CheckpointManager


def build(kind: str) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64), torch.nn.ReLU(),
                                torch.nn.Linear(64, 4))
    if kind == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(model)
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    return model, torch.optim.Adam(model.parameters(), lr=1e-2)


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's batch at ``step``: a function of (step, rank) only, so a resumed run sees the same data."""
    g = torch.Generator().manual_seed(1000 * step + dist.get_rank())
    x = torch.randn(32, 16, generator=g)
    return x, (x[:, :4] * 2).sum(1, keepdim=True).expand(32, 4)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("remote")
    p.add_argument("out")
    p.add_argument("--kind", choices=["ddp", "fsdp"], default="ddp")
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--save-every", type=int, default=4)
    p.add_argument("--step-delay", type=float, default=0.0)
    p.add_argument("--kill-at", type=int, default=-1)
    p.add_argument("--kill-rank", type=int, default=-1)
    p.add_argument("--failpoint", default="")
    p.add_argument("--fail-at", type=int, default=-1)
    p.add_argument("--probe-missing", action="store_true", help="restore a step that has no checkpoint first")
    p.add_argument("--rank0-saves", action="store_true", help="only rank 0 calls save (replicated state)")
    a = p.parse_args()
    logging.basicConfig(level=logging.WARNING, format=f"rank {os.environ.get('RANK')}: %(levelname)s %(message)s")
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    rank = dist.get_rank()
    model, opt = build(a.kind)
    sharded = a.kind == "fsdp"

    def state(step: int) -> dict[str, Any]:
        if sharded:
            msd, osd = get_state_dict(model, opt)
            return {"model": msd, "optim": osd, "step": step}
        return {"model": model.state_dict(), "optim": opt.state_dict(), "step": step}

    mgr = CheckpointManager(a.remote, monitor="loss", keep_best=1, keep_last=2, preemption=["sigterm"],
                            store_budget=60)
    start = 0
    if a.probe_missing:  # every rank gets rank 0's typed error (none waits for an answer that never comes)
        try:
            mgr.restore(10**6, state=state(0) if sharded else None)
        except CheckpointNotFoundError as exc:
            print(f"missing: {type(exc).__name__}", flush=True)
    if sharded:
        restored = mgr.restore(state=state(0))
        if restored is not None:
            set_state_dict(model, opt, model_state_dict=restored.state["model"],
                           optim_state_dict=restored.state["optim"])
    else:
        restored = mgr.restore()
        if restored is not None:
            model.load_state_dict(restored.state["model"])
            opt.load_state_dict(restored.state["optim"])
    if restored is not None:
        start = restored.step
        assert restored.state["step"] == start
        print(f"resumed {start}", flush=True)
    else:
        print("fresh", flush=True)

    for step in range(start + 1, a.steps + 1):
        x, y = batch(step)
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if a.step_delay:
            time.sleep(a.step_delay)  # stands in for a real step's compute, so a signal lands mid-run
        print(f"step {step}", flush=True)
        if mgr.preempted:
            print(f"preempted {step}", flush=True)
            mgr.save_and_exit(step, state(step))
        if step % a.save_every == 0:
            if step == a.kill_at and rank == a.kill_rank:
                os.environ["CLOUDCKPT_FAILPOINT"] = a.failpoint
            if step == a.fail_at and rank == 0:  # rank 0's upload of this save fails once (a full disk)
                os.environ["CLOUDCKPT_FAILPOINT"] = "push.after_upload:1:enospc"
            if rank == 0 or not a.rank0_saves:
                mgr.save(step, state(step), metrics={"loss": loss.item()})
            print(f"saved {step}", flush=True)
            ok = mgr.wait()  # every rank learns rank 0's outcome
            print(f"wait {step} {ok} {[f.step for f in mgr.failures()]}", flush=True)
    mgr.close()
    final = full(state(a.steps))  # a collective for DTensors
    if rank == 0:
        torch.save(final, a.out)
    print("done", flush=True)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
