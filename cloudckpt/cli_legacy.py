"""The run URL's deprecated spellings on the command line, still accepted with a warning until they are removed.

Before the one rule (``--remote URL`` on every command), ``ls``, ``prune`` and ``gc`` took the URL as a positional
argument, ``show`` and ``pull`` as ``--from``, ``push`` and ``sync`` as ``--to``, and ``verify`` as an optional first
argument told from a selector by its spelling (``verify URL SELECTOR`` and ``verify URL --all`` are still read; a
lone argument without ``--all`` is now always the SELECTOR). To drop them, delete this module and its uses in
:mod:`cloudckpt.cli`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])
_KEY = "cloudckpt.legacy_url"  # in click's ctx.meta


def accept(ctx: click.Context, spelling: str, url: str) -> None:
    """Take ``url``, given as ``spelling``, as the run's URL, and warn (one line on stderr) that it is deprecated."""
    click.echo(f"cloudckpt: warning: `{ctx.info_name} {spelling}` is deprecated; name the run with --remote URL",
               err=True)
    ctx.meta[_KEY] = url


def or_given(ctx: click.Context, url: str | None) -> str | None:
    """``url`` (from ``--remote``), else the run URL given in a deprecated spelling; both given is a usage error."""
    if url and ctx.meta.get(_KEY):
        raise click.UsageError("the run is given twice: keep --remote URL only")
    return url or ctx.meta.get(_KEY)


def verify_selectors(ctx: click.Context, args: tuple[str, ...], *, all_: bool = False,
                     remote: str | None = None) -> tuple[str, ...]:
    """``verify``'s positional arguments: two are the old ``URL SELECTOR``, and one with ``--all`` and no
    ``--remote`` the old ``URL --all`` (both accepted, deprecated); else selectors."""
    if len(args) == 1 and all_ and not remote:
        accept(ctx, "URL --all", args[0])
        return ()
    if len(args) != 2:
        return args
    accept(ctx, "URL SELECTOR", args[0])
    return args[1:]


def _callback(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    if value is not None:
        accept(ctx, f"{param.opts[0]} URL" if isinstance(param, click.Option) else "URL", value)


def legacy_url(spelling: str) -> Callable[[F], F]:
    """A command's old spelling of its run URL, hidden from ``--help``: ``--from``/``--to`` (an option) or ``URL``
    (an optional positional argument)."""
    if spelling == "URL":
        return click.argument("legacy_url", required=False, metavar="", expose_value=False, callback=_callback)
    return click.option(spelling, "legacy_url", hidden=True, expose_value=False, callback=_callback)
