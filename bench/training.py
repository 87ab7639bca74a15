"""Measurements 1, 2 and 6: what checkpointing costs training (Keras, TensorFlow CPU).

1. Stall per checkpoint (:mod:`bench.stall`), for each model size.
2. Epoch time with a checkpoint every epoch vs no checkpoint at all (:mod:`bench.epoch_overhead`).
6. SIGTERM to committed checkpoint (:mod:`bench.sigterm`): a training subprocess with CloudCheckpoint gets SIGTERM
   mid-epoch; we time until the index lists a checkpoint past the step it had reached, and until the process exits.

Everything here needs ``cloudckpt.keras``; without it the sections are reported as skipped.
"""

from __future__ import annotations

from . import epoch_overhead, sigterm, stall
from .common import Ctx, Section, guarded, log
from .model import keras_available

OVERHEAD = ("epoch_overhead", "2. Epoch-time overhead of a checkpoint every epoch")


def run(ctx: Ctx) -> list[Section]:
    why = keras_available()
    ids = [(f"stall_{mb}MB", f"1. Training stall per checkpoint, ~{mb} MB of weights") for mb in ctx.sizes.models_mb]
    ids += [OVERHEAD, ("sigterm", "6. SIGTERM to committed checkpoint")]
    if why:
        return [Section(i, t, "s", skipped=why) for i, t in ids]
    out = []
    for (sid, title), mb in zip(ids, ctx.sizes.models_mb):
        log.info("stall, %d MB model", mb)
        out.append(guarded(sid, title, lambda mb=mb: stall.section(ctx, mb)))
    for mb in ctx.sizes.models_mb[-2:] if not ctx.quick else ctx.sizes.models_mb[:1]:  # ~100 MB and ~1 GB
        log.info("stall of the background capture, %d MB model", mb)
        out.append(guarded(f"stall_async_{mb}MB", f"1. Training stall, background capture, ~{mb} MB",
                           lambda mb=mb: stall.formats_section(ctx, mb)))
    log.info("epoch overhead")
    out.append(guarded(*ids[-2], lambda: epoch_overhead.section(ctx)))
    log.info("sigterm")
    out.append(guarded(*ids[-1], lambda: sigterm.section(ctx)))
    return out


class overhead:  # noqa: N801  (a group of bench.run, like a module: ``--only overhead``)
    """Measurement 2 alone (it is also part of ``training``): ~25 min in a full run instead of ~50."""

    @staticmethod
    def run(ctx: Ctx) -> list[Section]:
        why = keras_available()
        sid, title = OVERHEAD
        if why:
            return [Section(sid, title, "s", skipped=why)]
        log.info("epoch overhead")
        return [guarded(sid, title, lambda: epoch_overhead.section(ctx))]
