"""A small, deterministic PyTorch training loop on generated data, checkpointed with
cloudckpt.torch.CheckpointManager (run as a process by tests/test_torch_manager.py, killed and restarted with the
same command).

Usage: torch_job.py REMOTE OUT [--epochs E] [--save-every N] [--step-delay S]

Prints ``resumed S`` (or ``fresh``), ``step S`` after every step, ``saved S VAL_LOSS`` per save, ``done`` at the end,
and writes the final model and optimizer state to OUT (torch.save).
"""

from __future__ import annotations

import argparse
import logging
import time

import torch

from cloudckpt.torch import CheckpointManager, rng_state, set_rng_state


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("remote")
    p.add_argument("out")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--save-every", type=int, default=10)
    p.add_argument("--step-delay", type=float, default=0.0)
    a = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)

    data = torch.Generator().manual_seed(2)  # a generated data set: 1500 points in 64-d, 10 linear classes
    x = torch.randn(1500, 64, generator=data)
    y = (x @ torch.randn(64, 10, generator=data)).argmax(1)
    xv, yv, xt, yt = x[:300], y[:300], x[300:], y[300:]
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Dropout(0.2),
                                torch.nn.Linear(32, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=20, gamma=0.9)
    gen = torch.Generator().manual_seed(1)
    per_epoch = (len(xt) + a.batch - 1) // a.batch

    mgr = CheckpointManager(a.remote, monitor="val_loss", mode="min", keep_best=1, keep_last=2)
    step, epoch, batch, perm = 0, 0, 0, None
    restored = mgr.restore()
    if restored is not None:
        s = restored.state
        model.load_state_dict(s["model"])
        opt.load_state_dict(s["optimizer"])
        sched.load_state_dict(s["scheduler"])
        gen.set_state(s["data"]["generator"])
        set_rng_state(s["rng"])
        step, epoch, batch, perm = restored.step, s["data"]["epoch"], s["data"]["batch"], s["data"]["perm"]
        print(f"resumed {step}", flush=True)
    else:
        print("fresh", flush=True)

    def state() -> dict:
        return {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "rng": rng_state(), "data": {"epoch": epoch, "batch": batch, "perm": perm,
                                             "generator": gen.get_state()}}

    while epoch < a.epochs:
        if perm is None:
            perm = torch.randperm(len(xt), generator=gen)
        while batch < per_epoch:
            idx = perm[batch * a.batch:(batch + 1) * a.batch]
            model.train()
            loss = torch.nn.functional.cross_entropy(model(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            batch += 1
            step += 1
            if a.step_delay:
                time.sleep(a.step_delay)  # stands in for a real step's compute, so a kill lands mid-run
            print(f"step {step}", flush=True)
            if mgr.preempted:
                mgr.save_and_exit(step, state())
            if step % a.save_every == 0:
                model.eval()
                with torch.no_grad():
                    val = float(torch.nn.functional.cross_entropy(model(xv), yv))
                mgr.save(step, state(), metrics={"val_loss": val})
                print(f"saved {step} {val!r}", flush=True)
        epoch, batch, perm = epoch + 1, 0, None
    mgr.save(step, state())
    mgr.close()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, a.out)
    print("done", flush=True)


if __name__ == "__main__":
    main()
