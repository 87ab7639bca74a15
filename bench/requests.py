"""Measurement: requests per checkpoint per store, by method, counted at a real HTTP proxy in front of each server.

Two shapes, each pushed by one long-lived store that has claimed the run (as the Keras callback's uploader is) after
a warm-up push (the conditional-write probe runs once per store object, not per checkpoint): a Keras-shaped
checkpoint (a 1 MiB ``model.weights.h5`` and ``cloudckpt_state/state.json`` + ``variables.npz``, pushed with
``inline_small`` as the callback does) and a plain one-file push. S3 is moto, GCS fake-gcs-server, Azure Azurite
(skipped without node).
The local store makes no requests: its file writes (opened for writing) and renames are counted through Python's
audit hooks (``open``, ``os.rename`` events) instead.

fake-gcs-server answers object metadata with a media link to its own address (``-external-url``), so a media
download (of the index, when another writer changed it) would bypass the proxy; with one writer none happens.

The verdict per store: writes (PUT/POST; an Azure Put Block is a part of one object's write, as an S3 multipart part
would be) <= the user's files (those outside ``cloudckpt_state/``) + 2 (manifest, index), and no HEAD.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from urllib.parse import unquote

from .common import Ctx, Section, log

MiB = 2**20
_TALLIES = ("writes", "stored files", "user files", "files")  # counted per push beside the methods
PUSHES = 3  # measured pushes per shape and store (the counts are the same each time; the median is reported)


def _keras_shaped(root: Path) -> Path:
    (root / "cloudckpt_state").mkdir(parents=True)
    (root / "model.weights.h5").write_bytes(os.urandom(MiB))
    (root / "cloudckpt_state" / "state.json").write_bytes(b'{"format": 2, "epoch": 3}' * 40)
    (root / "cloudckpt_state" / "variables.npz").write_bytes(os.urandom(12 * 1024))
    return root


def _plain(root: Path) -> Path:
    root.mkdir(parents=True)
    (root / "model.weights.h5").write_bytes(os.urandom(MiB))
    return root / "model.weights.h5"


class _LocalWrites:
    """Counts file opens for writing and renames under one directory (audit hooks can't be removed: it stays off
    outside :meth:`watch`)."""

    _installed = False
    _active: _LocalWrites | None = None

    def __init__(self, root: Path) -> None:
        self.root = str(root)
        self.counts: Counter[str] = Counter()
        self._lock = threading.Lock()
        if not _LocalWrites._installed:
            sys.addaudithook(_LocalWrites._hook)
            _LocalWrites._installed = True

    @staticmethod
    def _hook(event: str, args: tuple) -> None:
        me = _LocalWrites._active
        if me is None:
            return
        if event == "open" and isinstance(args[0], (str, Path)) and str(args[0]).startswith(me.root) \
                and isinstance(args[1], str) and ("w" in args[1] or "a" in args[1]):
            with me._lock:
                me.counts["write (open)"] += 1
        elif event == "os.rename" and str(args[1]).startswith(me.root):
            with me._lock:
                me.counts["rename"] += 1

    def __enter__(self) -> _LocalWrites:
        self.counts.clear()
        _LocalWrites._active = self
        return self

    def __exit__(self, *exc: object) -> None:
        _LocalWrites._active = None


def _endpoint(kind: str, ctx: Ctx, azure) -> str:
    return {"s3": ctx.s3_endpoint, "gcs": ctx.gcs_endpoint}.get(kind) or azure.endpoint.rsplit("/", 1)[0]


def _point_at(kind: str, proxy_endpoint: str) -> dict[str, str | None]:
    """Point the client at the proxy; return the environment to restore."""
    from tests.support import servers

    env = {"s3": {"AWS_ENDPOINT_URL": proxy_endpoint, "AWS_ENDPOINT_URL_S3": proxy_endpoint},
           "gcs": {"STORAGE_EMULATOR_HOST": proxy_endpoint},
           "az": {"AZURE_STORAGE_CONNECTION_STRING":
                  servers.azure_connection_string(f"{proxy_endpoint}/{servers.AZURITE_ACCOUNT}")}}[kind]
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    return old


def _restore(old: dict[str, str | None]) -> None:
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _count(kind: str, url: str, scratch: Path, proxy_seen: list | None) -> dict[str, list[Counter]]:
    """Per shape: the requests (by method) of each measured push."""
    from cloudckpt import CheckpointStore

    out: dict[str, list[Counter]] = {"keras": [], "plain": []}
    with CheckpointStore(url) as store:
        store.claim()  # a fenced writer, as the Keras callback is
        store.push(_keras_shaped(scratch / "warm"), epoch=0, inline_small=True)
        for i in range(PUSHES):
            for shape, make in (("keras", _keras_shaped), ("plain", _plain)):
                src = make(scratch / f"{shape}-{i}")
                if proxy_seen is not None:
                    proxy_seen.clear()
                    entry = store.push(src, epoch=i + 1, inline_small=shape == "keras")
                    seen = list(proxy_seen)
                    counts = Counter(m for m, _ in seen)
                    parts = sum(1 for m, t in seen if m == "PUT" and "comp=block&" in t + "&")
                    counts["writes"] = sum(1 for m, _ in seen if m in ("PUT", "POST")) - parts
                else:
                    with _LocalWrites(Path(url)) as w:
                        entry = store.push(src, epoch=i + 1, inline_small=shape == "keras")
                    counts = Counter(w.counts)
                    counts["writes"] = counts["rename"]
                counts["stored files"] = sum(not f.inline for f in entry.files)
                counts["user files"] = sum(not f.path.startswith("cloudckpt_state/") for f in entry.files)
                counts["files"] = len(entry.files)
                out[shape].append(counts)
    return out


def run(ctx: Ctx) -> list[Section]:
    from tests.reliability.faultproxy import FaultProxy
    from tests.support import servers

    logging.getLogger("azure").setLevel(logging.WARNING)  # the SDK logs every request's headers at INFO
    t_start = time.monotonic()
    sec = Section("requests", "Requests per checkpoint per store (one long-lived writer, after a warm-up push)",
                  "requests", target="writes <= user files + 2, no HEAD")
    azure = None
    kinds = ["local", "s3", "gcs"]
    if servers.azurite_binary() is not None:
        azure = servers.start_azurite()
        servers.apply_env(servers.azure_env(azure.endpoint))
        kinds.append("az")
    else:
        sec.notes.append("Azure skipped: Azurite is not installed (make tools)")
    results: dict[str, dict[str, list[Counter]]] = {}
    try:
        for kind in kinds:
            scratch = ctx.scratch / "requests" / kind
            scratch.mkdir(parents=True)
            if kind == "local":
                results[kind] = _count(kind, str(scratch / "store"), scratch, None)
                continue
            if kind == "az":
                name = f"bench-{os.urandom(5).hex()}"
                servers.make_azure_container(name)
                url = f"az://{name}/run"
            else:
                url = f"{'s3' if kind == 's3' else 'gs'}://{ctx.bucket(kind)}/run"
            seen: list[tuple[str, str]] = []
            with FaultProxy(_endpoint(kind, ctx, azure), on_request=lambda m, t: seen.append((m, unquote(t)))) as p:
                old = _point_at(kind, p.endpoint)
                try:
                    results[kind] = _count(kind, url, scratch, seen)
                finally:
                    _restore(old)
    finally:
        if azure is not None:
            azure.proc.kill()
            azure.proc.wait()
    worst = 0
    for kind, shapes in results.items():
        for shape, pushes in shapes.items():
            last = pushes[-1]
            methods = {k: v for k, v in sorted(last.items()) if k not in _TALLIES}
            v = sec.variant(f"{kind} {shape}")
            v.samples.extend(float(c["writes"]) for c in pushes)
            v.extra.update({"by_method": methods, "stored_files": last["stored files"], "files": last["files"]})
            heads = max(c.get("HEAD", 0) for c in pushes)
            excess = max(c["writes"] - (c["user files"] + 2) for c in pushes)
            worst = max(worst, excess, heads)
            log.info("  %s %s: %s (files %d, stored %d)", kind, shape, methods, last["files"], last["stored files"])
            sec.notes.append(f"{kind} {shape}: {', '.join(f'{k} {n}' for k, n in methods.items())} "
                             f"({last['files']} files, {last['stored files']} stored as objects)")
    measured = "; ".join(
        f"{kind} {shape}: {int(pushes[-1]['writes'])} writes for {pushes[-1]['user files']} user file(s), "
        f"{pushes[-1].get('HEAD', 0)} HEAD" for kind, shapes in results.items() for shape, pushes in shapes.items())
    _verdict(sec, measured, worst)
    sec.met = worst <= 0
    sec.seconds = round(time.monotonic() - t_start, 1)
    return [sec]


def _verdict(sec: Section, measured: str, worst: int) -> None:
    """Target 4's verdict, from ``worst`` = the largest of (writes - (user files + 2)) and HEADs over every store
    and shape: met iff it is <= 0."""
    target = "writes <= user files + 2 (manifest, index) and no HEAD, per checkpoint, every store"
    add = getattr(sec, "add_target", None)
    if add is not None:
        add("4 requests", target, measured, value=worst, limit=0)
    else:  # a Section without verdict support: keep the entry in its params
        sec.params.setdefault("targets", []).append(
            {"id": "4 requests", "target": target, "measured": measured, "met": worst <= 0})
