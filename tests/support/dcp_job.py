"""A tiny MLP trained under torchrun (gloo, CPU) and checkpointed with DCP through cloudckpt.torch.dcp; run by
tests/test_torch_dcp.py as real processes.

Usage (every rank): ``python -m torch.distributed.run --standalone --nproc_per_node N dcp_job.py MODE REMOTE OUT``
    save: train ``--steps`` steps, save at each step of ``--save-at`` (``--async-at``: with dcp.async_save), rank 0
        writes the full state it saved to ``OUT/ref-<step>.pt`` and prints ``saved <step> <id>``. With
        ``--kill-at S --kill-rank R --failpoint P`` rank R sets ``CLOUDCKPT_FAILPOINT=P`` before the save at step S.
    load: load ``--selector`` into a freshly initialised model (and optimizer) laid out by ``--kind``, compare the
        full state with ``OUT/ref-<step>.pt`` and write ``OUT/load-<rank>.json`` (``equal``, ``step``, ``stats``,
        ``data_bytes``: the bytes of the checkpoint's data objects).

With ``--wait-before S --wait-file F`` it waits for file F to exist before the save at step S. ``--resume``: a save
run first loads the run's latest checkpoint, if any, and trains on from its step (the restart after a crash; the data
of a step depends on the step alone, so a resumed run ends where an uninterrupted one does). ``--keep-going``: a save
or load that raises is reported (``failed <step> <error types>``; a load writes ``error`` into its JSON) and the job
goes on; ``untyped`` among the types marks an error outside cloudckpt's hierarchy. ``--options``: JSON storage options
for the writer and reader (e.g. short client timeouts under injected faults).

``--kind``: ``plain`` (a single process), ``ddp`` (DistributedDataParallel: replicated), ``fsdp`` (FSDP2
``fully_shard`` on a CPU mesh: DTensor shards).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor

from cloudckpt.errors import CloudCkptError
from cloudckpt.torch.dcp import CloudStorageReader, CloudStorageWriter

WIDTH = 256  # the tensors outweigh the per-item framing: what a rank reads shows in its byte count


def build(kind: str, seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The model and its Adam optimizer with state (one step taken), laid out for ``kind``."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, WIDTH), torch.nn.ReLU(), torch.nn.Linear(WIDTH, WIDTH),
                                torch.nn.ReLU(), torch.nn.Linear(WIDTH, 10))
    if kind == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(model)
    elif kind == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    train(model, opt, 1, seed)
    return model, opt


def train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int) -> None:
    data = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(32, 16, generator=data)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def state(model: torch.nn.Module, opt: torch.optim.Optimizer, step: int) -> dict[str, Any]:
    msd, osd = get_state_dict(model, opt)
    return {"model": msd, "optim": osd, "extra": {"step": step}}


def full(value: Any, prefix: str = "") -> dict[str, Any]:
    """The state flattened to ``name -> full tensor or value`` (DTensors gathered: a collective on every rank)."""
    out: dict[str, Any] = {}
    if isinstance(value, dict):
        for k in sorted(value, key=str):
            out.update(full(value[k], f"{prefix}/{k}"))
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            out.update(full(v, f"{prefix}/{i}"))
    elif isinstance(value, DTensor):
        out[prefix] = value.full_tensor().detach().clone()
    elif isinstance(value, torch.Tensor):
        out[prefix] = value.detach().clone()
    else:
        out[prefix] = value
    return out


def differences(got: dict[str, Any], want: dict[str, Any]) -> list[str]:
    """Names whose values differ (tensors bit for bit: dtype, shape and every byte)."""
    bad = sorted(set(got) ^ set(want))
    for k in sorted(set(got) & set(want)):
        a, b = got[k], want[k]
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
            same = a.dtype == b.dtype and a.shape == b.shape and bool(torch.equal(a.view(-1).view(torch.uint8),
                                                                                   b.view(-1).view(torch.uint8)))
        else:
            same = a == b
        if not same:
            bad.append(k)
    return bad


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def error_types(exc: BaseException) -> list[str]:
    """The types of what failed: each rank's error inside DCP's CheckpointException (else ``exc`` itself), with
    ``untyped`` added when one is not a cloudckpt error."""
    failures = getattr(exc, "failures", None)
    found = [f[0] for f in failures.values()] if isinstance(failures, dict) and failures else [exc]
    names = sorted({type(e).__name__ for e in found})
    return names + (["untyped"] if not all(isinstance(e, CloudCkptError) for e in found) else [])


def resume(a: argparse.Namespace, model: torch.nn.Module, opt: torch.optim.Optimizer) -> int:
    """Load the run's latest checkpoint into ``model`` and ``opt``; its step (0 when the run has none)."""
    from cloudckpt import CheckpointStore
    from cloudckpt.errors import CheckpointNotFoundError

    try:
        with CheckpointStore(a.remote, **a.options) as store:
            latest = store.latest().id
    except CheckpointNotFoundError:
        return 0
    sd = state(model, opt, 0)
    dcp.load(sd, storage_reader=CloudStorageReader(a.remote, latest, **a.options))
    set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    print(f"resumed {sd['extra']['step']} {latest}", flush=True)
    return int(sd["extra"]["step"])


def save(a: argparse.Namespace) -> None:
    out = Path(a.out)
    model, opt = build(a.kind, seed=0)
    first = resume(a, model, opt) + 1 if a.resume else 1
    saves, asyncs = _steps(a.save_at), _steps(a.async_at)
    for step in range(first, a.steps + 1):
        train(model, opt, 1, seed=100 + step)
        if step not in saves and step not in asyncs:
            continue
        if step == a.wait_before:
            print(f"waiting {step}", flush=True)
            while not Path(a.wait_file).exists():  # the test creates it once the other job has saved
                time.sleep(0.05)
        if step == a.kill_at and rank() == a.kill_rank:
            os.environ["CLOUDCKPT_FAILPOINT"] = a.failpoint
        sd = state(model, opt, step)
        writer = CloudStorageWriter(a.remote, step=step, metrics={"loss": float(a.losses.get(step, step))},
                                    monitor="loss", keep_last=a.keep_last, keep_best=1,
                                    files_per_rank=a.files_per_rank, block_size=a.block_size,
                                    **({} if a.stage_in_memory is None else {"stage_in_memory": a.stage_in_memory}),
                                    **a.options)
        try:
            if step in asyncs:
                dcp.async_save(sd, storage_writer=writer).result()
            else:
                dcp.save(sd, storage_writer=writer)
        except BaseException as exc:
            if not a.keep_going or isinstance(exc, KeyboardInterrupt):
                raise
            print(f"failed {step} {' '.join(error_types(exc))}", flush=True)
            continue
        ref = full(sd)
        if rank() == 0:
            assert writer.committed is not None
            torch.save(ref, out / f"ref-{step}.pt")
            print(f"saved {step} {writer.committed.id}", flush=True)


def load(a: argparse.Namespace) -> None:
    out = Path(a.out)
    model, opt = build(a.kind, seed=1234)  # other values than any save: a load that does nothing is seen
    sd = state(model, opt, 0)
    reader = CloudStorageReader(a.remote, a.selector, **a.options)
    try:
        dcp.load(sd, storage_reader=reader)
    except BaseException as exc:
        if not a.keep_going or isinstance(exc, KeyboardInterrupt):
            raise
        (out / f"load-{rank()}.json").write_text(json.dumps({"error": error_types(exc)}))
        return
    set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    assert reader.entry is not None
    got = full(state(model, opt, sd["extra"]["step"]))  # what the model and optimizer hold now
    want = torch.load(out / f"ref-{reader.entry.step}.pt", weights_only=True)
    bad = differences(got, want)
    data = sum(f.size for f in reader.entry.files if f.path.endswith(".distcp"))
    (out / f"load-{rank()}.json").write_text(json.dumps({
        "equal": not bad, "differences": bad[:10], "step": reader.entry.step, "compared": len(want),
        "stats": reader.stats, "data_bytes": data, "world": dist.get_world_size() if dist.is_initialized() else 1}))


def _steps(text: str) -> set[int]:
    return {int(s) for s in text.split(",") if s}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """The job's arguments (``argv``: sys.argv's when None); a test calling save() or load() in its own process
    gets every default from here."""
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["save", "load"])
    p.add_argument("remote")
    p.add_argument("out")
    p.add_argument("--kind", choices=["plain", "ddp", "fsdp"], default="fsdp")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--save-at", default="2,4")
    p.add_argument("--async-at", default="")
    p.add_argument("--losses", type=json.loads, default={})
    p.add_argument("--keep-last", type=int, default=2)
    p.add_argument("--files-per-rank", type=int, default=1)
    p.add_argument("--block-size", type=int, default=16384)  # small tensors here: several blocks each
    p.add_argument("--stage-in-memory", type=int, default=None)  # 0: every rank's items through temporary files
    p.add_argument("--selector", default="latest")
    p.add_argument("--kill-at", type=int, default=-1)
    p.add_argument("--kill-rank", type=int, default=-1)
    p.add_argument("--failpoint", default="")
    p.add_argument("--wait-before", type=int, default=-1)
    p.add_argument("--wait-file", default="")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--keep-going", action="store_true")
    p.add_argument("--options", type=json.loads, default={})
    a = p.parse_args(argv)
    a.losses = {int(k): v for k, v in a.losses.items()}
    return a


def main() -> None:
    a = parse()
    torch.set_num_threads(1)
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group("gloo")
    try:
        save(a) if a.mode == "save" else load(a)
        if dist.is_initialized():
            dist.barrier()  # every rank past its last collective before any tears gloo down (only after success)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    # Past this point everything is committed and checked. torch 2.13 can abort a rank at interpreter finalization
    # after dcp.async_save ("terminate called without an active exception", exit -6: its save thread is shut down
    # with wait=False; 2 of 16 runs under load here): end without finalization, as the job's result is in already.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
