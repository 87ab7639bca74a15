"""The ``cloudckpt pin``, ``unpin``, ``tag`` and ``untag`` commands: labels on a run's checkpoints.

Each is one index update through the store (:meth:`~cloudckpt.store.CheckpointStore.pin` and the others: the same
compare-and-swap as a commit) and prints the checkpoint as ``show`` does. Registered on :data:`cloudckpt.cli.cli`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import click

from . import cli_output as out
from .cli import _store, cli, json_flag, remote

if TYPE_CHECKING:
    from .manifest import CheckpointEntry
    from .store import CheckpointStore


def _label(ctx: click.Context, url: str | None, as_json: bool, done: str,
           act: Callable[[CheckpointStore], CheckpointEntry]) -> None:
    with _store(ctx, url) as store:
        entry = act(store)
        row = out.row(entry, store.keeper.read_existing())
    out.emit(row, as_json, lambda r: f"{done} {r['id']}" + (f"  [{','.join(r['tags'])}]" if r["tags"] else ""))


def _tag_name(ctx: click.Context, param: click.Parameter, value: str) -> str:
    from .labels import tag_problem

    problem = tag_problem(value)
    if problem:
        raise click.BadParameter(problem, param_hint="NAME")
    return value


@cli.command("pin")
@click.argument("selector")
@remote
@json_flag
@click.pass_context
def pin_cmd(ctx: click.Context, selector: str, url: str | None, as_json: bool) -> None:
    """Pin a checkpoint: retention never prunes it."""
    _label(ctx, url, as_json, "pinned", lambda store: store.pin(selector))


@cli.command("unpin")
@click.argument("selector")
@remote
@json_flag
@click.pass_context
def unpin_cmd(ctx: click.Context, selector: str, url: str | None, as_json: bool) -> None:
    """Unpin a checkpoint: retention decides for it again."""
    _label(ctx, url, as_json, "unpinned", lambda store: store.unpin(selector))


@cli.command("tag")
@click.argument("selector")
@click.argument("name", callback=_tag_name)
@remote
@json_flag
@click.pass_context
def tag_cmd(ctx: click.Context, selector: str, name: str, url: str | None, as_json: bool) -> None:
    """Name a checkpoint NAME (moved from any other); `pull NAME` restores it. A tag does not keep it: pin it."""
    _label(ctx, url, as_json, f"tagged {name}:", lambda store: store.tag(selector, name))


@cli.command("untag")
@click.argument("selector")
@click.argument("name")
@remote
@json_flag
@click.pass_context
def untag_cmd(ctx: click.Context, selector: str, name: str, url: str | None, as_json: bool) -> None:
    """Take the tag NAME off a checkpoint."""
    _label(ctx, url, as_json, f"untagged {name}:", lambda store: store.untag(selector, name))
