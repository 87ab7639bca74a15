"""Time to the first training step on a fresh machine (issue 23): a new process starts, gets a Keras checkpoint from
S3 (moto) and loads it, then trains one batch. cloudckpt's verified pull against what a user does without it: the
AWS CLI's ``aws s3 cp`` (boto3's parallel ranged download) and Keras' own ``load_weights`` of the local file.

Each run is a fresh Python process (imports, model build, fetch, load, one ``train_on_batch``), timed by the parent
from its start to the child's ``FIRST_STEP`` line; the child also reports its own phases. Both variants run on the
raw local server and through :mod:`tests.support.shaping_proxy` (default 40 MB/s per connection, 30 ms to the first
byte), interleaved, ``--reps`` times. Needs the ``aws`` command on the PATH, installed apart from the project's venv
(``pipx install awscli``: it pins botocore, so it is in none of our extras); nothing here runs in CI.

    python -m bench.first_step --sizes-mb 100,1000 --reps 3 --out bench/results/first_step
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.support import servers
from tests.support.proxy_process import ShapingProxyProcess

ROOT = Path(__file__).resolve().parent.parent
CHILD = "bench.first_step"
WIDTH = 2048  # the model: Dense(WIDTH) layers; each holds WIDTH * (WIDTH + 1) float32 weights (~16 MiB)


def layers_for(mb: int) -> int:
    return max(1, round(mb * 2**20 / (WIDTH * (WIDTH + 1) * 4)))


def model(n_layers: int):  # noqa: ANN201 (keras is imported late: the child's import is part of what is timed)
    import keras

    keras.utils.set_random_seed(0)
    m = keras.Sequential([keras.Input((WIDTH,)), *[keras.layers.Dense(WIDTH) for _ in range(n_layers)]])
    m.compile(optimizer="sgd", loss="mse")
    return m


def child(argv: list[str]) -> None:
    """``<how> <n_layers> <url or s3 uri> <endpoint> <workdir>``: fetch, load, one step; print the phases."""
    how, n_layers, where, endpoint, work = argv[0], int(argv[1]), argv[2], argv[3], Path(argv[4])
    t0 = time.perf_counter()
    import numpy as np

    m = model(n_layers)
    built = time.perf_counter()
    if how == "cloudckpt":
        from cloudckpt import CheckpointStore

        with CheckpointStore(where, endpoint_url=endpoint) as store:
            path = store.pull("latest", to=work / "ckpt").path / "model.weights.h5"  # verified, all or nothing
    else:
        subprocess.run(["aws", "s3", "cp", "--only-show-errors", "--endpoint-url", endpoint, where,
                        str(work / "model.weights.h5")], check=True)
        path = work / "model.weights.h5"
    fetched = time.perf_counter()
    m.load_weights(path)
    loaded = time.perf_counter()
    x = np.ones((32, WIDTH), dtype="float32")
    m.train_on_batch(x, x)
    stepped = time.perf_counter()
    print("FIRST_STEP " + json.dumps({"build": built - t0, "fetch": fetched - built, "load": loaded - fetched,
                                      "step": stepped - loaded}), flush=True)


def timed_run(how: str, n_layers: int, where: str, endpoint: str, scratch: Path) -> dict:
    work = scratch / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", CHILD, "--child", how, str(n_layers), where, endpoint, str(work)],
                          capture_output=True, text=True, cwd=ROOT, timeout=900,
                          env={**os.environ, "KERAS_BACKEND": os.environ.get("KERAS_BACKEND", "tensorflow"),
                               "TF_CPP_MIN_LOG_LEVEL": "3"})
    total = time.perf_counter() - t0
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("FIRST_STEP ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"{how}: exit {proc.returncode}: {proc.stderr[-2000:]}")
    return {"total": total, **json.loads(line.split(" ", 1)[1])}


def measure(mb: int, server: servers.Server, proxy: ShapingProxyProcess, reps: int, scratch: Path) -> list[dict]:
    import boto3

    from cloudckpt import CheckpointStore

    n_layers = layers_for(mb)
    src = scratch / "src"
    shutil.rmtree(src, ignore_errors=True)
    src.mkdir()
    model(n_layers).save_weights(src / "model.weights.h5")
    size = (src / "model.weights.h5").stat().st_size
    bucket = f"first-step-{mb}"
    boto3.client("s3", endpoint_url=server.endpoint).create_bucket(Bucket=bucket)
    url = f"s3://{bucket}/run"
    with CheckpointStore(url, endpoint_url=server.endpoint) as store:
        entry = store.push(src, epoch=1)
    uri = f"{url}/{entry.id}/model.weights.h5"  # the object the checkpoint's file is stored as
    rows = []
    for network in ("raw", "shaped"):
        endpoint = proxy.endpoint if network == "shaped" else server.endpoint
        runs = {"cloudckpt pull + load_weights": ("cloudckpt", url),
                "aws s3 cp + load_weights": ("aws", uri)}
        got: dict[str, list[dict]] = {n: [] for n in runs}
        for r in range(reps):
            for name in (list(runs) if r % 2 == 0 else list(reversed(runs))):
                proxy.reset_stats()
                how, where = runs[name]
                got[name].append(timed_run(how, n_layers, where, endpoint, scratch))
                through = proxy.stats.body_bytes
                if (network == "shaped" and through < size) or (network == "raw" and through > size // 10):
                    raise RuntimeError(f"{network} {name}: {through} of {size} bytes came through the proxy")
                logging.info("%d MB %s %s: %.2f s (%s)", mb, network, name, got[name][-1]["total"],
                             ", ".join(f"{k} {v:.2f}" for k, v in got[name][-1].items() if k != "total"))
        med = {n: {k: round(statistics.median(s[k] for s in samples), 2) for k in samples[0]}
               for n, samples in got.items()}
        ours, theirs = med["cloudckpt pull + load_weights"], med["aws s3 cp + load_weights"]
        rows.append({"model_mb": mb, "file_bytes": size, "network": network, "medians_s": med,
                     "samples_total_s": {n: [round(s["total"], 2) for s in v] for n, v in got.items()},
                     "ratio_total": round(ours["total"] / theirs["total"], 3),
                     "ratio_fetch": round(ours["fetch"] / theirs["fetch"], 3)})
    return rows


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        child(argv[1:])
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes-mb", default="100,1000")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--rate-mbps", type=float, default=40.0, help="MB/s per connection through the shaped network")
    p.add_argument("--latency-ms", type=float, default=30.0, help="time to first byte of every answer")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if shutil.which("aws") is None:
        raise SystemExit("the `aws` command is needed on the PATH (pipx install awscli)")
    scratch = Path(tempfile.mkdtemp(prefix="cloudckpt-first-step-"))
    server = servers.start_moto(ranges=True)
    servers.apply_env(servers.s3_env(server.endpoint))
    proxy = ShapingProxyProcess(server.endpoint, rate=args.rate_mbps * 1e6, latency=args.latency_ms / 1e3).start()
    started, load = time.strftime("%Y-%m-%dT%H:%M:%SZ"), os.getloadavg()
    try:
        rows = [r for mb in map(int, args.sizes_mb.split(",")) for r in measure(mb, server, proxy, args.reps, scratch)]
    finally:
        proxy.stop()
        server.stop()
        shutil.rmtree(scratch, ignore_errors=True)
    doc = {"started": started, "load": [load, os.getloadavg()], "reps": args.reps,
           "rate_MBps_per_connection": args.rate_mbps, "latency_ms": args.latency_ms,
           "keras_backend": os.environ.get("KERAS_BACKEND", "tensorflow"), "rows": rows}
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(doc, indent=1))
    print(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
