"""The ``cloudckpt pull`` command: restore a checkpoint, re-using what this machine already holds, or say with
``--dry-run`` where each file would come from (:mod:`cloudckpt.pull_plan`). Registered on :data:`cloudckpt.cli.cli`.
"""

from __future__ import annotations

from typing import Any

import click

from . import cli_legacy
from . import cli_output as out
from .cache import DIR_ENV, SIZE_ENV, parse_size
from .cli import _store, cli, json_flag, remote
from .errors import ConfigurationError
from .pull_plan import summary


def _size(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    try:
        return None if value is None else parse_size(value)
    except ConfigurationError as e:
        raise click.BadParameter(str(e)) from None


def _plan_text(r: dict[str, Any]) -> str:
    lines = [f"{r['id']}: would fetch {r['fetch']['files']} files ({out.human_size(r['fetch']['bytes'])}) from "
             f"{r['url']} into {r['path']}"]
    for source, what in (("partial", "re-use from the interrupted pull"), ("target", "re-use from the target"),
                         ("cache", "copy from the cache"), ("store", "fetch from the store")):
        used = r["sources"][source]
        if used["files"]:
            lines.append(f"  {what}: {used['files']} files ({out.human_size(used['bytes'])})")
    lines += [f"  {f['source']:8} {f['path']}  {out.human_size(f['size'])}" for f in r["files"]]
    return "\n".join(lines)


@cli.command("pull")
@click.argument("selector")
@remote
@cli_legacy.legacy_url("--from")
@click.option("--to", "to", default="checkpoint", show_default=True, type=click.Path(file_okay=False),
              help="Local directory to restore into (replaced only once everything verified).")
@click.option("--fallback", is_flag=True,
              help="If the chosen checkpoint fails verification, take the newest older one that verifies.")
@click.option("--dry-run", is_flag=True,
              help="Say where each file would come from (re-used here, the cache, the store) and fetch nothing.")
@click.option("--cache-dir", type=click.Path(file_okay=False),
              help=f"The node's pull cache: files pulled once are copied from there (default: ${DIR_ENV}; none).")
@click.option("--cache-size", callback=_size, metavar="BYTES",
              help=f"The cache's bound, e.g. 50G; least recently used files go first (default: ${SIZE_ENV}, 20G).")
@json_flag
@click.pass_context
def pull_cmd(ctx: click.Context, selector: str, url: str | None, to: str, fallback: bool, dry_run: bool,
             cache_dir: str | None, cache_size: int | None, as_json: bool) -> None:
    """Download a checkpoint, verified: SELECTOR is best, latest, latest-model, an epoch number, a checkpoint id or
    a tag. Files already here (an earlier or interrupted pull, the cache) that verify are re-used."""
    with _store(ctx, url, cache_dir=cache_dir, cache_size=cache_size) as store:
        if dry_run:
            entry, steps = store.plan_pull(selector, to=to)
            sources = summary(steps)
            plan = {"dry_run": True, "id": entry.id, "url": store.url, "path": str(click.format_filename(to)),
                    "fetch": sources["store"], "sources": sources,
                    "files": [{"path": s.path, "size": s.size, "source": s.source} for s in steps]}
            out.emit(plan, as_json, _plan_text)
            return
        result = store.pull(selector, to=to, fallback=fallback)
        row = result.entry.summary(store.keeper.read_existing().tags(result.entry.id))
        row.update(path=str(result.path), skipped=list(result.skipped), sources=result.sources,
                   local_files=[str(result.path.joinpath(*f.path.split("/"))) for f in result.entry.files])
        if not result.entry.holds_model:
            click.echo(f"cloudckpt: note: {result.entry.id} holds resume state (cloudckpt_state/) but no model file "
                       f"(Keras wrote none at that save point); `cloudckpt pull latest-model` gets the newest "
                       f"checkpoint with one", err=True)
        out.emit(row, as_json, lambda r: f"pulled {r['id']} (epoch {r['epoch']}, {out.human_size(r['size'])}) into "
                 f"{r['path']}" + _reused(r["sources"]))


def _reused(sources: dict[str, dict[str, int]]) -> str:
    """``; fetched 1 files (2.00MB), re-used 3 (40.0MB)`` when anything was re-used, else nothing."""
    kept = [v for k, v in sources.items() if k != "store"]
    files, size = sum(v["files"] for v in kept), sum(v["bytes"] for v in kept)
    if not files:
        return ""
    return (f"; fetched {sources['store']['files']} files ({out.human_size(sources['store']['bytes'])}), re-used "
            f"{files} ({out.human_size(size)})")
