"""A hand-written PyTorch loop on scikit-learn's digits, checkpointed with cloudckpt.torch.CheckpointManager.

Run it, interrupt it (Ctrl-C, SIGTERM or kill -9), run it again: it continues from the latest committed step.
SIGTERM commits the current step and exits with status 143. Store: $CLOUDCKPT_REMOTE, else ./torch-store.

    python examples/torch_loop.py && cloudckpt ls torch-store && cloudckpt pull best --from torch-store --to best
"""

import os

import torch
from sklearn.datasets import load_digits

from cloudckpt.torch import CheckpointManager, rng_state, set_rng_state

EPOCHS, BATCH, SAVE_EVERY = 5, 64, 20

x, y = load_digits(return_X_y=True)
x, y = torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)
x_val, y_val, x, y = x[:300], y[:300], x[300:], y[300:]
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(64, 10))
opt = torch.optim.Adam(model.parameters(), lr=1e-3)
gen = torch.Generator().manual_seed(1)

mgr = CheckpointManager(os.environ.get("CLOUDCKPT_REMOTE", "torch-store"), monitor="val_loss", keep_best=1,
                        keep_last=2)
step, epoch, batch, perm = 0, 0, 0, None
if (r := mgr.restore()) is not None:
    model.load_state_dict(r.state["model"])
    opt.load_state_dict(r.state["optimizer"])
    set_rng_state(r.state["rng"])
    gen.set_state(r.state["data"]["generator"])
    step, epoch, batch, perm = r.step, r.state["data"]["epoch"], r.state["data"]["batch"], r.state["data"]["perm"]
    print(f"resumed from step {step}")


def state():
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "rng": rng_state(),
            "data": {"epoch": epoch, "batch": batch, "perm": perm, "generator": gen.get_state()}}


while epoch < EPOCHS:
    perm = torch.randperm(len(x), generator=gen) if perm is None else perm
    while batch * BATCH < len(x):
        idx = perm[batch * BATCH:(batch + 1) * BATCH]
        model.train()
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        batch, step = batch + 1, step + 1
        if mgr.preempted:
            mgr.save_and_exit(step, state())  # SIGTERM or a cloud notice: commit this step, exit 143
        if step % SAVE_EVERY == 0:
            model.eval()
            with torch.no_grad():
                val_loss = float(torch.nn.functional.cross_entropy(model(x_val), y_val))
            mgr.save(step, state(), metrics={"val_loss": val_loss})
            print(f"step {step}: val_loss {val_loss:.4f}")
    epoch, batch, perm = epoch + 1, 0, None
mgr.save(step, state())
mgr.close()  # waits for the commits; raises if the last one failed
print("done at step", step)
