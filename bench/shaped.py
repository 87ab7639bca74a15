"""Verified pulls on the raw local servers and on a network shaped like a cloud's (issue 23): cloudckpt against the
clients' own parallel downloads, on S3 (moto), GCS (fake-gcs-server) and Azure (Azurite).

Every row is measured twice: straight to the server on 127.0.0.1, and through :mod:`tests.support.shaping_proxy`
capping each connection (default 40 MB/s) with a time to first byte (default 30 ms), as a cloud's per-stream limit
does. Variants run interleaved, ``--reps`` times; a raw client's pull is "verified" as cloudckpt's is (the crc32c
of every file checked after the download). ``--grid`` instead times cloudckpt's pull of the large file through the
shaped network for several range sizes and concurrencies (how the defaults were chosen).

    python -m bench.shaped --size-mib 256 --files 20 --file-mib 10 --reps 2 --out bench/results/shaped
    python -m bench.shaped --push --size-mib 256 --reps 2 --out bench/results/shaped
    python -m bench.shaped --grid --stores s3,gcs,az --size-mib 128
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

from tests.support import servers  # noqa: E402
from tests.support.proxy_process import ShapingProxyProcess  # noqa: E402

from . import shaped_clients as clients  # noqa: E402
from .common import make_file  # noqa: E402

MiB = 2**20
CKPT = "cloudckpt pull"


def _pull(kind: str, url: str, endpoint: str, cid: str, out: Path, settings: tuple[int, int] | None = None
          ) -> Callable[[], None]:
    """A verified pull of ``cid``; ``settings``: (range MiB, concurrency) in place of the defaults."""
    with_env = {} if settings is None else {"CLOUDCKPT_RANGE_SIZE": str(settings[0] * MiB),
                                            "CLOUDCKPT_CONCURRENCY": str(settings[1])}
    with clients.env(**with_env):  # the store's connection pool is sized when it is made
        store = clients.store(kind, url, endpoint)

    def run() -> None:
        shutil.rmtree(out, ignore_errors=True)
        with clients.env(**with_env):
            store.pull(cid, to=out)

    return run


def _pushed(kind: str, server: servers.Server, src: Path) -> tuple[str, str, Any]:
    """A new bucket with ``src`` pushed to it straight to ``server`` (untimed): its name, the run's URL, the entry."""
    with clients.env(**({"STORAGE_EMULATOR_HOST": server.endpoint} if kind == "gcs" else {})):
        bucket = clients.container(kind)
        url = f"{'gs' if kind == 'gcs' else kind}://{bucket}/run"
        with clients.store(kind, url, server.endpoint) as store:
            return bucket, url, store.push(src, epoch=1)


def measure(kind: str, servers_by_network: dict[str, servers.Server], src: Path, proxy: ShapingProxyProcess,
            reps: int, scratch: Path, ours: tuple[tuple[int, int], ...] = ()) -> list[dict]:
    """Both networks for one checkpoint ``src`` on one store: rows of medians and ratios. ``servers_by_network``:
    the server each network's data is pushed to (GCS has one per network: fake-gcs-server's media links name the
    address it is told, which the raw network's clients must reach directly and the shaped one's through the proxy)."""
    from cloudckpt.checksum import file_checksums

    files = [src] if src.is_file() else sorted(src.iterdir())
    size = sum(f.stat().st_size for f in files)
    rows = []
    for network, server in servers_by_network.items():
        endpoint = proxy.endpoint if network == "shaped" else server.endpoint
        bucket, url, entry = _pushed(kind, server, src)
        keys = {f"run/{entry.id}/{f.name}": file_checksums(f)["crc32c"] for f in files}
        out = scratch / "out"
        out.mkdir(parents=True, exist_ok=True)
        runs = {CKPT: _pull(kind, url, endpoint, entry.id, scratch / "pulled")}
        for mib, threads in ours:  # other settings of ours, side by side (not counted as a client)
            runs[f"{CKPT} ({mib} MiB x {threads})"] = _pull(kind, url, endpoint, entry.id, scratch / "pulled",
                                                            (mib, threads))
        runs.update(clients.pullers(kind, endpoint, bucket, keys, out))
        times: dict[str, list[float]] = {n: [] for n in runs}
        for r in range(reps):
            for name in (list(runs) if r % 2 == 0 else list(reversed(runs))):
                proxy.reset_stats()
                t0 = time.perf_counter()
                runs[name]()
                times[name].append(time.perf_counter() - t0)
                through = proxy.stats.body_bytes  # a client must not go around the proxy, nor through it when raw
                if (network == "shaped" and through < size) or (network == "raw" and through > size // 10):
                    raise RuntimeError(f"{kind} {network} {name}: {through} of {size} bytes came through the "
                                       "shaped network")
                logging.info("%s %s %s: %.2f s", kind, network, name, times[name][-1])
                shutil.rmtree(out, ignore_errors=True)
                out.mkdir()
        med = {n: statistics.median(t) for n, t in times.items()}
        best = min((n for n in med if not n.startswith(CKPT)), key=med.get)
        rows.append({"store": kind, "network": network, "what": f"{len(files)} × {files[0].stat().st_size // MiB} MiB",
                     "bytes": size, "medians_s": {n: round(t, 2) for n, t in med.items()},
                     "samples_s": {n: [round(x, 2) for x in t] for n, t in times.items()},
                     "fastest_client": best, "ratio": round(med[CKPT] / med[best], 2)})
    return rows


def measure_push(kind: str, servers_by_network: dict[str, servers.Server], src: Path, proxy: ShapingProxyProcess,
                 reps: int) -> list[dict]:
    """Pushes of ``src`` (a file or a folder) on both networks: rows of medians and ratios (the clients' own
    parallel uploads)."""
    files = [src] if src.is_file() else sorted(src.iterdir())
    size = sum(f.stat().st_size for f in files)
    rows = []
    for network, server in servers_by_network.items():
        endpoint = proxy.endpoint if network == "shaped" else server.endpoint
        with clients.env(**({"STORAGE_EMULATOR_HOST": server.endpoint} if kind == "gcs" else {})):
            bucket = clients.container(kind)
        runs = clients.pushers(kind, endpoint, bucket, src)
        times: dict[str, list[float]] = {n: [] for n in runs}
        for r in range(reps):
            for name in (list(runs) if r % 2 == 0 else list(reversed(runs))):
                proxy.reset_stats()
                t0 = time.perf_counter()
                runs[name]()
                times[name].append(time.perf_counter() - t0)
                through = proxy.stats.sent_bytes
                if (network == "shaped" and through < size) or (network == "raw" and through > size // 10):
                    raise RuntimeError(f"{kind} {network} {name}: {through} of {size} bytes went through the "
                                       "shaped network")
                logging.info("%s %s %s: %.2f s", kind, network, name, times[name][-1])
                clients.empty(kind, bucket, server.endpoint)
        med = {n: statistics.median(t) for n, t in times.items()}
        raw_clients = [n for n in med if not n.startswith("cloudckpt")]
        best = min(raw_clients, key=med.get)
        what = f"push {len(files)} × {files[0].stat().st_size // MiB} MiB"
        rows.append({"store": kind, "network": network, "what": what, "bytes": size,
                     "ours": "cloudckpt push", "medians_s": {n: round(t, 2) for n, t in med.items()},
                     "samples_s": {n: [round(x, 2) for x in t] for n, t in times.items()},
                     "fastest_client": best, "ratio": round(med["cloudckpt push"] / med[best], 2)})
    return rows


def measure_repull(kind: str, servers_by_network: dict[str, servers.Server], src: Path,
                   proxy: ShapingProxyProcess, reps: int, scratch: Path) -> list[dict]:
    """The first verified pull of ``src`` (with a node cache configured, as a restarted machine would have), a pull
    of the unchanged checkpoint into the same folder (every file re-used), and one into a new folder from the node
    cache: their times, where their files came from and how many bytes of responses crossed the network."""
    files = [src] if src.is_file() else sorted(src.iterdir())
    size = sum(f.stat().st_size for f in files)
    rows = []
    for network, server in servers_by_network.items():
        endpoint = proxy.endpoint if network == "shaped" else server.endpoint
        bucket, url, entry = _pushed(kind, server, src)
        cache, first, again = scratch / "cache", scratch / "pulled", scratch / "elsewhere"
        runs = {CKPT: first, f"{CKPT} again, same folder": first,
                f"{CKPT} into a new folder, from the node cache": again}
        times: dict[str, list[float]] = {n: [] for n in runs}
        through: dict[str, list[int]] = {n: [] for n in runs}
        sources: dict[str, dict] = {}
        for _ in range(reps):
            for path in (cache, first, again):
                shutil.rmtree(path, ignore_errors=True)
            for name, dest in runs.items():  # in this order: each pull needs the one before
                # a store of its own for each pull (made untimed, as by a new process): nothing read before is known
                with clients.env(CLOUDCKPT_CACHE_DIR=str(cache)):  # read when the store is made
                    puller = clients.store(kind, url, endpoint)
                with puller:
                    proxy.reset_stats()
                    t0 = time.perf_counter()
                    result = puller.pull(entry.id, to=dest)
                    times[name].append(time.perf_counter() - t0)
                    through[name].append(proxy.stats.body_bytes)
                    sources[name] = result.sources
                    logging.info("%s %s %s: %.3f s, %d bytes through the network, %s", kind, network, name,
                                 times[name][-1], through[name][-1], result.sources)
        med = {n: statistics.median(t) for n, t in times.items()}
        rows.append({"store": kind, "network": network, "what": f"{len(files)} × {files[0].stat().st_size // MiB} MiB",
                     "bytes": size, "ours": CKPT, "medians_s": {n: round(t, 3) for n, t in med.items()},
                     "samples_s": {n: [round(x, 3) for x in t] for n, t in times.items()},
                     "response_bytes": through, "sources": sources, "fastest_client": f"{CKPT} (the first)",
                     "ratios_vs_first_pull": {n: round(med[n] / med[CKPT], 4) for n in med if n != CKPT},
                     "ratio": round(med[f"{CKPT} again, same folder"] / med[CKPT], 4)})
    return rows


def grid(kind: str, server: servers.Server, src: Path, proxy: ShapingProxyProcess, scratch: Path) -> list[dict]:
    """cloudckpt's pull of ``src`` through the shaped network for range sizes x concurrencies."""
    bucket = clients.container(kind)
    url = f"{'gs' if kind == 'gcs' else kind}://{bucket}/run"
    with clients.store(kind, url, server.endpoint) as store:
        entry = store.push(src, epoch=1)
    out = []
    for range_mib in (4, 8, 16):
        for concurrency in (4, 8, 16):
            with clients.env(CLOUDCKPT_RANGE_SIZE=str(range_mib * MiB), CLOUDCKPT_CONCURRENCY=str(concurrency)):
                pull = _pull(kind, url, proxy.endpoint, entry.id, scratch / "pulled")
                t0 = time.perf_counter()
                pull()
                dt = time.perf_counter() - t0
            logging.info("%s range %d MiB x %d: %.2f s", kind, range_mib, concurrency, dt)
            out.append({"store": kind, "range_mib": range_mib, "concurrency": concurrency, "seconds": round(dt, 2)})
    return out


def _gcs_behind(proxy_port: int) -> servers.Server:
    """fake-gcs-server whose answers name the proxy as its address: the media links of its objects (which gcsfs
    downloads from) lead through the shaped network, not around it. Straight requests still reach it directly."""
    return servers.start_fake_gcs(external_url=f"http://127.0.0.1:{proxy_port}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stores", default="s3,gcs,az")
    p.add_argument("--size-mib", type=int, default=256, help="the one large file")
    p.add_argument("--files", type=int, default=20, help="how many small files")
    p.add_argument("--file-mib", type=int, default=10)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--rate-mbps", type=float, default=40.0, help="MB/s per connection through the shaped network")
    p.add_argument("--latency-ms", type=float, default=30.0, help="time to first byte of every answer")
    p.add_argument("--grid", action="store_true", help="time range sizes x concurrencies instead")
    p.add_argument("--push", action="store_true", help="time pushes of the large file instead")
    p.add_argument("--repull", action="store_true", help="time a pull of an unchanged checkpoint into the folder "
                   "that holds it, and one from the node cache into a new folder, against the first pull")
    p.add_argument("--stock-moto", action="store_true", help="S3 on stock moto (every ranged GET reads the whole "
                   "object) instead of tests/support/moto_ranges.py")
    p.add_argument("--networks", default="raw,shaped", help="raw, shaped or both")
    p.add_argument("--ours", default="", help="other settings of cloudckpt's pull to time beside its defaults: "
                   "RANGE_MIBxCONCURRENCY,... (e.g. 4x16,8x16)")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("cloudckpt", "botocore", "boto3", "s3transfer", "urllib3", "google", "gcsfs", "azure"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    scratch = Path(tempfile.mkdtemp(prefix="cloudckpt-shaped-"))
    started = {"s3": lambda: servers.start_moto(ranges=not args.stock_moto), "gcs": servers.start_fake_gcs,
               "az": servers.start_azurite}
    env = {"s3": servers.s3_env, "gcs": servers.gcs_env, "az": servers.azure_env}
    rows: list[dict] = []
    try:
        big = make_file(scratch / "big" / "model.bin", args.size_mib * MiB)
        small = scratch / "small"
        for i in range(args.files):
            make_file(small / f"shard-{i:03d}.bin", args.file_mib * MiB)
        for kind in args.stores.split(","):
            proxy_port = servers.free_port()
            server = started[kind]()
            shaped = _gcs_behind(proxy_port) if kind == "gcs" else server
            servers.apply_env(env[kind](server.endpoint))
            proxy = ShapingProxyProcess(shaped.endpoint, rate=args.rate_mbps * 1e6, latency=args.latency_ms / 1e3,
                                 port=proxy_port).start()
            try:
                if args.grid:
                    with clients.env(**({"STORAGE_EMULATOR_HOST": shaped.endpoint} if kind == "gcs" else {})):
                        rows += grid(kind, shaped, big, proxy, scratch)
                    continue
                networks = {n: s for n, s in (("raw", server), ("shaped", shaped)) if n in args.networks.split(",")}
                srcs = (big, small) if args.files else (big,)
                if args.push:
                    for src in srcs:
                        rows += measure_push(kind, networks, src, proxy, args.reps)
                    continue
                if args.repull:
                    for src in srcs:
                        rows += measure_repull(kind, networks, src, proxy, args.reps, scratch)
                    continue
                ours = tuple((int(v.split("x")[0]), int(v.split("x")[1])) for v in args.ours.split(",") if v)
                for src in srcs:
                    rows += measure(kind, networks, src, proxy, args.reps, scratch, ours)
            finally:
                proxy.stop()
                for s in {server.proc.pid: server, shaped.proc.pid: shaped}.values():
                    s.proc.kill()
                    s.proc.wait()
                    if s.argv and "--location" in s.argv:  # Azurite's data: a throw-away directory
                        shutil.rmtree(s.argv[s.argv.index("--location") + 1], ignore_errors=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    doc = {"s3_server": "stock moto" if args.stock_moto else "moto, ranges served alone (tests/support/moto_ranges.py)",
           "rate_MBps_per_connection": args.rate_mbps, "latency_ms": args.latency_ms, "reps": args.reps,
           "started": time.strftime("%Y-%m-%dT%H:%M:%SZ"), "load": os.getloadavg(), "rows": rows}
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        name = "grid.json" if args.grid else "push.json" if args.push else "repull.json" if args.repull \
            else "results.json"
        (args.out / name).write_text(json.dumps(doc, indent=1))
    print(json.dumps(doc, indent=1) if args.grid else markdown(rows))
    return 0


def markdown(rows: list[dict]) -> str:
    lines = ["| store | checkpoint | network | cloudckpt (s) | others (s) | ratio vs fastest client |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        ours = r.get("ours", CKPT)
        others = "; ".join(f"{n} {t:.2f}" for n, t in r["medians_s"].items() if n != ours)
        lines.append(f"| {r['store']} | {r['what']} | {r['network']} | {r['medians_s'][ours]:.2f} | {others} | "
                     f"**{r['ratio']:.2f}×** ({r['fastest_client']}) |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
