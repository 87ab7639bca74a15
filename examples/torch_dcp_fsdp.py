"""FSDP2 training under torchrun, checkpointed with PyTorch DCP through cloudckpt: every rank uploads its own shards,
rank 0 commits one checkpoint (atomic, verified, retention applied). Run it, kill it (Ctrl-C, kill -9 any rank), run
it again: it resumes from the latest committed step, on any number of ranks. Store: $CLOUDCKPT_REMOTE, else
./dcp-store.

    python -m torch.distributed.run --standalone --nproc_per_node 2 examples/torch_dcp_fsdp.py
    cloudckpt ls -r dcp-store && cloudckpt pull best -r dcp-store --to best   # DCP's FileSystemReader loads `best`
"""

import os
import sys

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from sklearn.datasets import load_digits
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from cloudckpt import CheckpointStore
from cloudckpt.errors import CheckpointNotFoundError
from cloudckpt.torch.dcp import CloudStorageReader, CloudStorageWriter, load

REMOTE = os.environ.get("CLOUDCKPT_REMOTE", "dcp-store")
STEPS, BATCH, SAVE_EVERY = 300, 64, 50

dist.init_process_group("gloo")  # CPU; "nccl" on GPUs (and init_device_mesh("cuda", ...))
rank, world = dist.get_rank(), dist.get_world_size()
saver_group = dist.new_group(backend="gloo")  # async_save's collectives must not interleave with training's
x, y = load_digits(return_X_y=True)
x, y = torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)
x_val, y_val, x, y = x[:300], y[:300], x[300:], y[300:]

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
mesh = init_device_mesh("cpu", (world,))
for layer in model:
    if isinstance(layer, torch.nn.Linear):
        fully_shard(layer, mesh=mesh)
fully_shard(model, mesh=mesh)
opt = torch.optim.Adam(model.parameters(), lr=1e-3)

start = 0
try:
    latest = CheckpointStore(REMOTE).latest()
except CheckpointNotFoundError:
    latest = None
if latest is not None:  # resume: each rank reads only the shards it now holds (any number of ranks saved them)
    msd, osd = get_state_dict(model, opt)
    state = {"model": msd, "optim": osd, "progress": {"step": 0}}
    load(state, storage_reader=CloudStorageReader(REMOTE, latest.id))
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    start = state["progress"]["step"]
    if rank == 0:
        print(f"resumed from step {start} ({latest.id})")

pending = None
gen = torch.Generator().manual_seed(1)
for step in range(start + 1, STEPS + 1):
    gen.manual_seed(1000 + step)  # the batch depends on the step alone: a resumed run sees the same data
    idx = torch.randint(0, len(x), (BATCH,), generator=gen)
    loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
    opt.zero_grad()
    loss.backward()
    opt.step()
    if step % SAVE_EVERY == 0:
        with torch.no_grad():
            val_loss = torch.nn.functional.cross_entropy(model(x_val), y_val).item()
        if pending is not None:
            pending.result()  # one save in flight at a time
        msd, osd = get_state_dict(model, opt)
        writer = CloudStorageWriter(REMOTE, step=step, metrics={"val_loss": val_loss}, monitor="val_loss",
                                    keep_best=1, keep_last=2)
        pending = dcp.async_save({"model": msd, "optim": osd, "progress": {"step": step}}, storage_writer=writer,
                                 process_group=saver_group)
        if rank == 0:
            print(f"step {step} val_loss {val_loss:.4f}: saving in the background")
if pending is not None:
    pending.result()
dist.barrier()  # every rank past its last collective before any tears the process group down
dist.destroy_process_group()
# torch 2.13 can abort a rank at interpreter exit after dcp.async_save (its save thread is shut down without a
# wait: "terminate called without an active exception", exit -6). Every checkpoint is committed by now: end here.
sys.stdout.flush()
os._exit(0)
