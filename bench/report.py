"""Turning sections into the three outputs: a Markdown table (printed, and pasted into docs/benchmarks.md), a JSON
document with every sample, and a PNG plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .common import Section

EXTRA_KEYS = ("MBps", "verify_s", "GBps", "s_per_GB", "idle_MiB", "push_MiB", "server_cpu_s", "stall_ms",
              "own_stall_ms", "keras_save_ms", "own_part_ms", "capture_ms", "backup_ms", "state_write_ms",
              "state_write_threads", "train_end_s", "framework_write_ms", "trainer_save_ms",
              "first_save_ms", "commit_ms", "overhead_pct", "paired_median_pct", "paired_pct",
              "cpu_overhead_pct", "fit_s", "index_bytes", "exit_s", "exit_code", "step_at_signal", "committed_step")


def _num(x: float | None, unit: str) -> str:
    if x is None:
        return "—"
    if unit == "s":
        return f"{x * 1000:.1f} ms" if x < 1 else f"{x:.2f} s"
    return f"{x:.1f} {unit}"


def _extra(extra: dict[str, Any]) -> str:
    parts = []
    for k in EXTRA_KEYS:
        if k in extra:
            v = extra[k]
            if isinstance(v, list):
                v = "/".join(f"{x:g}" if isinstance(x, (int, float)) else str(x) for x in v)
            parts.append(f"{k}={v}")
    return ", ".join(parts)


def verdict(sec: Section) -> str:
    if sec.error:
        return "ERROR"
    if sec.skipped:
        return "skipped"
    return {True: "met", False: "MISSED", None: "—"}[sec.met]


def table(sections: list[Section]) -> str:
    """One Markdown table: a row per variant, then the section's ratio, target and verdict."""
    lines = ["| Measurement | Variant | Median | Samples | Detail |", "|---|---|---|---|---|"]
    for sec in sections:
        if sec.skipped or sec.error:
            why = f"skipped: {sec.skipped}" if sec.skipped else f"ERROR: {sec.error}"
            lines.append(f"| {sec.title} | — | — | — | {why.replace('|', '/')} |")
            continue
        for i, v in enumerate(sec.variants):
            samples = " ".join(_num(s, sec.unit).replace(" ", "\u00a0") for s in v.samples)
            lines.append(f"| {sec.title if i == 0 else ''} | {v.name} | {_num(v.median, sec.unit)} | {samples} | "
                         f"{_extra(v.extra)} |")
        r = f"{sec.ratio:.3g}" if sec.ratio is not None else "—"
        lines.append(f"| | **{sec.ratio_desc or 'result'}: {r}** | | | target {sec.target}: **{verdict(sec)}** |")
        for desc, value in sec.other_ratios.items():
            lines.append(f"| | **{desc}: {value:.3g}** | | | (no target) |")
    return "\n".join(lines)


def targets(sections: list[Section]) -> list[dict[str, Any]]:
    """Every section's verdicts (``Section.targets``), in run order: what "Targets at a glance" shows."""
    return [dict(t, section=t.get("section", sec.id)) for sec in sections for t in getattr(sec, "targets", [])]


def _cell(text: object) -> str:
    return str(text).replace("|", "/").replace("\n", " ")


def targets_table(sections: list[Section]) -> str:
    """"Targets at a glance": one row per verdict of every group, then a row per section that errored or was
    skipped (its verdicts could not be computed)."""
    lines = ["| # | Target | Measured | Verdict | Section |", "|---|---|---|---|---|"]
    for t in targets(sections):
        lines.append(f"| {_cell(t['id'])} | {_cell(t['target'])} | {_cell(t['measured'])} | "
                     f"**{'met' if t['met'] else 'MISSED'}** | {t['section']} |")
    for sec in sections:
        if sec.error or sec.skipped:
            why = f"ERROR: {sec.error}" if sec.error else f"skipped: {sec.skipped}"
            lines.append(f"| — | {_cell(sec.target or sec.title)} | {_cell(why)} | **not measured** | {sec.id} |")
    return "\n".join(lines)


def markdown(sections: list[Section]) -> str:
    """results.md: the targets at a glance, then every measurement."""
    return (f"## Targets at a glance\n\n{targets_table(sections)}\n\n## Every measurement\n\n{table(sections)}\n")


def summary(sections: list[Section]) -> str:
    """One line per section: ratio, target, verdict (the headline of a run)."""
    out = []
    for sec in sections:
        r = f"{sec.ratio:.3g}" if sec.ratio is not None else "—"
        out.append(f"{verdict(sec):8s} {sec.id:18s} {sec.ratio_desc}: {r}  (target {sec.target})")
        out.extend(f"{'':8s} {'':18s} {desc}: {value:.3g}" for desc, value in sec.other_ratios.items())
    return "\n".join(out)


def write_json(path: Path, doc: dict[str, Any], sections: list[Section]) -> None:
    doc = {**doc, "targets": targets(sections), "sections": [s.to_json() for s in sections]}
    path.write_text(json.dumps(doc, indent=1, default=str))


def plot(path: Path, sections: list[Section], title: str) -> None:
    """A grid of small bar/line charts, one per kind of measurement (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_id = {s.id: s for s in sections if not s.skipped and not s.error}
    panels = [p for p in (_transfer_panel, _stall_panel, _overhead_panel, _memory_panel, _index_panel,
                          _checksum_panel, _frameworks_panel) if p(None, by_id)]
    cols = 3
    rows = max(1, (len(panels) + cols - 1) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 4.2 * rows), squeeze=False)
    for ax, panel in zip(axes.flat, panels):
        panel(ax, by_id)
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)


def _bars(ax, labels: list[str], values: list[float], colors: list[str] | None = None) -> None:
    ax.barh(range(len(values)), values, color=colors)
    ax.set_yticks(range(len(values)), labels, fontsize=7)
    ax.invert_yaxis()
    for i, v in enumerate(values):
        ax.text(v, i, f" {v:.3g}", va="center", fontsize=7)


def _color(name: str) -> str:
    return "tab:orange" if name.startswith("cloudckpt") or name.startswith("CloudCheckpoint") else "tab:blue"


def _transfer_panel(ax, by_id) -> bool:
    ids = [i for i in ("push_s3", "push_gcs", "restore_s3", "restore_gcs") if i in by_id]
    if ax is None:
        return bool(ids)
    labels, vals = [], []
    for i in ids:
        for v in by_id[i].variants:
            if "MBps" in v.extra:
                labels.append(f"{i}: {v.name}")
                vals.append(v.extra["MBps"])
    _bars(ax, labels, vals, [_color(lbl.split(": ", 1)[1]) for lbl in labels])
    ax.set_xlabel("MB/s (median, higher is better)")
    ax.set_title("3-4. Push and verified restore throughput", fontsize=9)
    return True


def _stall_panel(ax, by_id) -> bool:
    ids = [i for i in by_id if i.startswith("stall_")]
    if ax is None:
        return bool(ids)
    labels, vals = [], []
    for i in ids:
        for v in by_id[i].variants:
            labels.append(f"{i[6:]}: {v.name}")
            vals.append((v.median or 0) * 1000)
    _bars(ax, labels, vals, [_color(lbl.split(": ", 1)[1]) for lbl in labels])
    ax.set_xscale("log")
    ax.set_xlabel("ms the training thread is blocked per save (median, log)")
    ax.set_title("1. Training stall per checkpoint", fontsize=9)
    return True


def _overhead_panel(ax, by_id) -> bool:
    sec = by_id.get("epoch_overhead")
    if ax is None:
        return sec is not None
    vals = [(v.median or 0) for v in sec.variants]
    _bars(ax, [v.name for v in sec.variants], vals, [_color(v.name) for v in sec.variants])
    ax.set_xlabel("seconds per epoch (median)")
    ax.set_title("2. Epoch time with a checkpoint every epoch", fontsize=9)
    return True


def _memory_panel(ax, by_id) -> bool:
    sec = by_id.get("memory")
    if ax is None:
        return sec is not None
    _bars(ax, [v.name for v in sec.variants], [v.median or 0 for v in sec.variants],
          [_color(v.name) for v in sec.variants])
    ax.axvline(128, color="red", ls="--", lw=1)
    ax.set_xlabel("MiB of RSS added over an idle process (target: 128)")
    ax.set_title("5. Peak memory of a push", fontsize=9)
    return True


def _index_panel(ax, by_id) -> bool:
    ids = [i for i in ("index_local", "index_s3", "index_gcs") if i in by_id]
    if ax is None:
        return bool(ids)
    for i in ids:
        sec = by_id[i]
        for what, style in (("ls", "--"), ("commit", "-")):
            pts = [(int(v.name.split("@ ")[1]), v.median) for v in sec.variants if v.name.startswith(what)]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", label=f"{i[6:]} {what}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("checkpoints in the index")
    ax.set_ylabel("seconds (median)")
    ax.legend(fontsize=7)
    ax.set_title("7. Index scale", fontsize=9)
    return True


def _checksum_panel(ax, by_id) -> bool:
    sec = by_id.get("checksum")
    if ax is None:
        return sec is not None
    _bars(ax, [v.name for v in sec.variants], [v.extra.get("GBps", 0) for v in sec.variants],
          [_color(v.name) for v in sec.variants])
    ax.set_xlabel("GB/s on one core (higher is better)")
    ax.set_title("8. Checksum throughput", fontsize=9)
    return True


def _frameworks_panel(ax, by_id) -> bool:
    ids = [i for i in by_id if i.startswith("fw_")]
    if ax is None:
        return bool(ids)
    labels, vals = [], []
    for i in ids:
        for v in by_id[i].variants:
            labels.append(f"{i[3:]}: {v.name}")
            vals.append((v.median or 0) * 1000)
    _bars(ax, labels, vals, [_color(lbl.split(": ", 1)[1]) for lbl in labels])
    ax.set_xscale("log")
    ax.set_xlabel("ms the training thread is held per save (median, log)")
    ax.set_title("9. PyTorch, Lightning, HF: stall per checkpoint", fontsize=9)
    return True
