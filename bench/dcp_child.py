"""One rank of the DCP benchmark (:mod:`bench.dcp`), started by torchrun (gloo, CPU): ``save`` or ``load``.

``save``: each rank holds ``--mb`` MiB of DTensor shards (8 float32 tensors, sharded on dim 0 over the ranks);
per repetition, in turn (alternating order), every writer saves the state once — rank 0 times each save from a
barrier before it to a barrier after it (every rank's bytes stored, the commit or ``.metadata`` done). Then per
repetition the training-thread stall of ``dcp.async_save`` through CloudStorageWriter (until the call returns; the
upload goes on behind it and is waited for, untimed) against the device-to-host copy alone (the rank's shards cloned
into new CPU memory), on every rank; the slowest rank's figure counts. The last repetition's checkpoints are kept for
``load``.

``load``: on this job's (other) number of ranks, each reader loads the checkpoint a writer left into zero-filled
DTensors of the same global shapes (DCP reshards); rank 0 times each load barrier to barrier, and checks a few bytes.

Results: rank 0 writes ``--out`` (JSON: samples per variant, in seconds).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard

from cloudckpt.distributed_commit import forget_job_stores
from cloudckpt.torch.dcp import CloudStorageReader, CloudStorageWriter

TENSORS = 8
COLS = 1024
REGION = "us-east-1"
CLOUD, LOCAL, FSSPEC, S3TC = ("cloudckpt CloudStorageWriter (S3)", "DCP FileSystemWriter (local disk)",
                              "DCP FsspecWriter (s3fs)", "s3torchconnector S3StorageWriter")
CLOUD_R, LOCAL_R, FSSPEC_R, S3TC_R = ("cloudckpt CloudStorageReader (S3)", "DCP FileSystemReader (local disk)",
                                      "DCP FsspecReader (s3fs)", "s3torchconnector S3StorageReader")


def state(mesh: Any, save_world: int, mb: int, fill: bool) -> dict[str, DTensor]:
    """The state: global shapes fixed by the saving job's world size; this rank's shard random or zeros."""
    rows = mb * 2**20 // (TENSORS * COLS * 4)  # per saving rank and tensor
    world, rank = dist.get_world_size(), dist.get_rank()
    local_rows = rows * save_world // world
    gen = torch.Generator().manual_seed(rank)
    out = {}
    for i in range(TENSORS):
        local = torch.rand(local_rows, COLS, generator=gen) if fill else torch.zeros(local_rows, COLS)
        out[f"layer{i}.weight"] = DTensor.from_local(local, mesh, [Shard(0)], run_check=False)
    return out


def s3tc_client(endpoint: str) -> Any:
    """s3torchconnector's client for the test server (its S3FileSystem has no endpoint option of its own)."""
    from s3torchconnector import S3ClientConfig
    from s3torchconnector._s3client import S3Client

    return S3Client(REGION, endpoint=endpoint, s3client_config=S3ClientConfig(force_path_style=True))


def writers(a: argparse.Namespace, rep: int) -> dict[str, Callable[[], Any]]:
    opts = {"client_kwargs": {"endpoint_url": a.endpoint}}
    out: dict[str, Callable[[], Any]] = {
        CLOUD: lambda: CloudStorageWriter(f"s3://{a.bucket}/cloud-{rep}", step=rep, prune=False),
        LOCAL: lambda: dcp.FileSystemWriter(f"{a.scratch}/local-{rep}"),
        FSSPEC: lambda: FsspecWriter(f"s3://{a.bucket}/fsspec-{rep}", **opts),
    }
    if a.s3tc:
        def s3tc() -> Any:
            from s3torchconnector.dcp import S3StorageWriter

            w = S3StorageWriter(REGION, f"s3://{a.bucket}/s3tc-{rep}")
            w.fs._client = s3tc_client(a.endpoint)
            return w
        out[S3TC] = s3tc
    return out


def readers(a: argparse.Namespace, rep: int) -> dict[str, Callable[[], Any]]:
    out: dict[str, Callable[[], Any]] = {
        CLOUD_R: lambda: CloudStorageReader(f"s3://{a.bucket}/cloud-{rep}", "latest"),
        LOCAL_R: lambda: dcp.FileSystemReader(f"{a.scratch}/local-{rep}"),
        FSSPEC_R: lambda: FsspecReader(f"s3://{a.bucket}/fsspec-{rep}",
                                         client_kwargs={"endpoint_url": a.endpoint}),
    }
    if a.s3tc:
        def s3tc() -> Any:
            from s3torchconnector.dcp import S3StorageReader

            r = S3StorageReader(REGION, f"s3://{a.bucket}/s3tc-{rep}")
            r.fs._client = s3tc_client(a.endpoint)
            return r
        out[S3TC_R] = s3tc
    return out


def timed(fn: Callable[[], Any]) -> float:
    dist.barrier()
    t0 = time.perf_counter()
    fn()
    dist.barrier()
    return time.perf_counter() - t0


def cleanup(a: argparse.Namespace, rep: int) -> None:
    """Rank 0 removes a repetition's checkpoints (the servers keep objects in RAM)."""
    if dist.get_rank() == 0:
        import s3fs

        fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": a.endpoint})
        for name in ("cloud", "fsspec", "s3tc"):
            if fs.exists(f"{a.bucket}/{name}-{rep}"):
                fs.rm(f"{a.bucket}/{name}-{rep}", recursive=True)
        shutil.rmtree(f"{a.scratch}/local-{rep}", ignore_errors=True)
    forget_job_stores()
    dist.barrier()


def save(a: argparse.Namespace, mesh: Any) -> dict[str, Any]:
    sd = state(mesh, dist.get_world_size(), a.mb, fill=True)
    samples: dict[str, list[float]] = {}
    for rep in range(a.reps + 1):  # rep 0: warm-up, not recorded
        ws = writers(a, rep)
        order = list(ws) if rep % 2 == 0 else list(reversed(ws))
        for name in order:
            dt = timed(lambda name=name: dcp.save(sd, storage_writer=ws[name]()))
            if rep:
                samples.setdefault(name, []).append(dt)
        if rep < a.reps:
            cleanup(a, rep)
    stall: dict[str, list[float]] = {"async_save returns": [], "copy alone (clone)": [], "async_save total": []}
    for rep in range(a.reps + 1):
        dist.barrier()
        t0 = time.perf_counter()
        copy = {k: v.to_local().clone() for k, v in sd.items()}
        d2h = time.perf_counter() - t0
        del copy
        dist.barrier()
        t0 = time.perf_counter()
        fut = dcp.async_save(sd, storage_writer=CloudStorageWriter(f"s3://{a.bucket}/async-{rep}", step=rep,
                                                                   prune=False))
        returned = time.perf_counter() - t0
        fut.result()
        total = time.perf_counter() - t0
        worst = [0.0] * 3
        dist.all_gather_object(gathered := [None] * dist.get_world_size(), (returned, d2h, total))
        for r in gathered:
            worst = [max(w, x) for w, x in zip(worst, r, strict=True)]
        if rep:
            for k, v in zip(stall, worst, strict=True):
                stall[k].append(v)
        if dist.get_rank() == 0:
            import s3fs

            s3fs.S3FileSystem(client_kwargs={"endpoint_url": a.endpoint}).rm(f"{a.bucket}/async-{rep}",
                                                                              recursive=True)
        forget_job_stores()
    return {"save": samples, "stall": stall, "kept": a.reps}


def load(a: argparse.Namespace, mesh: Any) -> dict[str, Any]:
    samples: dict[str, list[float]] = {}
    for rep in range(a.reps + 1):
        rs = readers(a, a.kept)
        order = list(rs) if rep % 2 == 0 else list(reversed(rs))
        for name in order:
            target = state(mesh, a.save_world, a.mb, fill=False)
            dt = timed(lambda name=name, target=target: dcp.load(target, storage_reader=rs[name]()))
            first = next(iter(target.values())).to_local()
            assert first.abs().sum() > 0, f"{name} loaded nothing"
            if rep:
                samples.setdefault(name, []).append(dt)
            del target
        forget_job_stores()
    return {"load": samples}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["save", "load"])
    p.add_argument("--endpoint", required=True)
    p.add_argument("--bucket", required=True)
    p.add_argument("--scratch", required=True)
    p.add_argument("--mb", type=int, default=256)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--save-world", type=int, default=4)
    p.add_argument("--kept", type=int, default=0)
    p.add_argument("--s3tc", action="store_true")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    result = save(a, mesh) if a.mode == "save" else load(a, mesh)
    if dist.get_rank() == 0:
        Path(a.out).write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # as tests/support/dcp_job.py: no interpreter finalization after async_save (torch 2.13)


if __name__ == "__main__":
    main()
