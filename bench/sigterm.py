"""Measurement 6: SIGTERM to committed checkpoint. A training subprocess (``python -m bench.sigterm_child``) with
CloudCheckpoint gets SIGTERM mid-epoch; we time until the index lists a checkpoint past the step it had reached, and
until the process exits."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

from .common import ROOT, Ctx, Section, log


def section(ctx: Ctx) -> Section:
    from cloudckpt import CheckpointStore

    t_start = time.monotonic()
    mb = ctx.sizes.sigterm_mb
    sec = Section("sigterm", f"6. SIGTERM to committed checkpoint, ~{mb} MB model", "s", target="<= 10 s")
    reps = 1 if ctx.quick else 2
    for r in range(reps):
        url = f"s3://{ctx.bucket('s3')}/run"
        workdir = ctx.scratch / "sigterm" / str(r)
        workdir.mkdir(parents=True)
        proc = subprocess.Popen([sys.executable, "-m", "bench.sigterm_child", url, str(workdir), str(mb)],
                                stdout=subprocess.PIPE, stderr=open(workdir / "stderr.log", "wb"), text=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"}, cwd=ROOT)
        step = None
        for line in proc.stdout:  # the child says when it is mid-epoch, after its first checkpoint committed
            if line.startswith("READY"):
                step = int(line.split()[1])
                break
        if step is None:
            proc.wait()
            err = (workdir / "stderr.log").read_text()[-3000:]
            raise RuntimeError(f"sigterm child exited {proc.returncode} before it was ready: {err}")
        t0 = time.perf_counter()
        proc.send_signal(signal.SIGTERM)
        store = CheckpointStore(url)
        committed: list[float] = []

        def watch() -> None:
            while proc.poll() is None or not committed:
                try:
                    if any((c.step or 0) > step for c in store.list()):
                        committed.append(time.perf_counter() - t0)
                        return
                except Exception:
                    pass
                if proc.poll() is not None and time.perf_counter() - t0 > 5 + (proc_exit[0] if proc_exit else 0):
                    return
                time.sleep(0.02)

        proc_exit: list[float] = []
        th = threading.Thread(target=watch, daemon=True)
        th.start()
        code = proc.wait(timeout=300)
        proc_exit.append(time.perf_counter() - t0)
        th.join(timeout=15)
        latest = store.latest()
        store.close()
        v = sec.variant("CloudCheckpoint (s3)")
        v.samples.append(round(committed[0], 3) if committed else float("nan"))
        v.extra.setdefault("exit_s", []).append(round(proc_exit[0], 2))
        v.extra.setdefault("exit_code", []).append(code)
        v.extra.setdefault("step_at_signal", []).append(step)
        v.extra.setdefault("committed_step", []).append(latest.step)
        log.info("  sigterm rep %d: committed after %s s, exit %s after %.2f s (step %s -> %s)", r + 1,
                 committed[0] if committed else None, code, proc_exit[0], step, latest.step)
    v = sec.variant("CloudCheckpoint (s3)")
    sec.ratio = v.median
    sec.ratio_desc = "seconds from SIGTERM to the checkpoint listed in the index"
    sec.met = sec.add_target(
        "sigterm", f"SIGTERM to committed checkpoint <= 10 s (~{mb} MB model)",
        f"median {v.median:.2f} s of {len(v.samples)}; exit {sorted(set(v.extra['exit_code']))} after "
        f"{'/'.join(str(x) for x in v.extra['exit_s'])} s", value=v.median, limit=10.0)["met"]
    sec.params = {"model_MB": mb, "how": "SIGTERM sent mid-epoch; the index is polled every 20 ms from this process"}
    sec.seconds = round(time.monotonic() - t_start, 1)
    return sec
