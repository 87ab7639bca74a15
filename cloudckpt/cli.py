"""The ``cloudckpt`` command: a thin layer over :class:`cloudckpt.CheckpointStore`.

Every command names its run with ``--remote URL`` (``-r``; default ``$CLOUDCKPT_REMOTE``); positional arguments are
only what it acts on (SELECTOR, PATH, WATCH_DIR). Each command checks its flags, calls the library, and prints
through :func:`cloudckpt.cli_output.emit` (text, or ``--json`` on stdout).
Errors are turned into one line on stderr and an exit code in :func:`main` only; ``CLOUDCKPT_DEBUG=1`` shows the
traceback. Exit codes: 0 ok, 1 other error, 2 usage, 3 nothing matches, 4 integrity failure, 5 access or
configuration error, 6 fenced (a newer writer took over the run), 130 interrupted (Ctrl-C), 143 stopped by SIGTERM.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from . import cancel, cli_args, cli_legacy
from . import cli_output as out
from .errors import CheckpointNotFoundError, CloudCkptError, IntegrityError
from .redact import Redactor, ScrubFilter, is_secret_name, url_secrets

if TYPE_CHECKING:
    from .store import CheckpointStore

URL_ENV = "CLOUDCKPT_REMOTE"
EXAMPLES = """
\b
Examples:
  cloudckpt push ./ckpt -r s3://bucket/runs/r1 --epoch 3 --metric val_loss=0.31 --monitor val_loss
  cloudckpt ls --remote s3://bucket/runs/r1
  cloudckpt pull best --remote gs://bucket/runs/r1 --to ./checkpoint
  CLOUDCKPT_REMOTE=./store cloudckpt pull latest --json
  cloudckpt verify ckpt-e000003-s0000000900-1a2b3c4d -r s3://bucket/runs/r1
  cloudckpt prune -r s3://bucket/runs/r1 --keep-best 2 --keep-last 3 --dry-run
  cloudckpt repair -r s3://bucket/runs/r1 --dry-run
  cloudckpt sync ./checkpoints -r s3://bucket/runs/r1 --monitor val_loss --keep-last 3
\b
Exit codes: 0 ok, 1 other error, 2 usage, 3 nothing matches, 4 integrity failure,
            5 access or configuration error, 6 fenced writer, 130 Ctrl-C, 143 SIGTERM.
"""


def _parse_value(text: str) -> Any:
    """A ``-o KEY=VALUE`` value: a string as typed (``12e3``, ``null``, ``007`` stay strings: secrets are strings),
    except ``true``/``false`` (booleans) and JSON objects, lists and quoted strings (``{...}``, ``[...]``,
    ``"true"``)."""
    if text in ("true", "false"):
        return text == "true"
    if text[:1] in ("{", "[", '"'):
        try:
            return json.loads(text)
        except ValueError:
            raise click.BadParameter("a value starting with {, [ or \" must be valid JSON",
                                     param_hint="--storage-option") from None
    return text


def _pairs(values: tuple[str, ...], what: str, convert: Callable[[str], Any], *, secret: bool = False
           ) -> dict[str, Any]:
    out = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            shown = "an item without '=' (not shown: it may hold a credential)" if secret else repr(item)
            raise click.BadParameter(f"expected NAME=VALUE. Received: {shown}", param_hint=what)
        try:
            out[key] = convert(value)
        except ValueError:
            raise click.BadParameter(f"{key}: {value!r} is not a number", param_hint=what) from None
    return out


def _store(ctx: click.Context, url: str | None, **settings: Any) -> CheckpointStore:
    from .store import CheckpointStore

    url = cli_legacy.or_given(ctx, url) or os.environ.get(URL_ENV)
    if not url:
        raise click.UsageError(f"no run: pass --remote URL, or set ${URL_ENV}")
    obj = ctx.find_root().obj
    obj["redactor"].add_url(url)
    return CheckpointStore(url, progress=obj["progress"], **settings, **obj["storage_options"])


json_flag = click.option("--json", "as_json", is_flag=True, help="Machine-readable output on stdout.")
remote = click.option("--remote", "-r", "url", metavar="URL", help=f"The run's URL (default: ${URL_ENV}).")
keep_flags = [
    click.option("--keep-best", type=click.IntRange(min=0), help="Keep the K best by the run's monitor."),
    click.option("--keep-last", type=click.IntRange(min=0), help="Keep the N most recent."),
    click.option("--keep-every", type=click.IntRange(min=1),
                 help="Keep every checkpoint whose epoch is a multiple of N."),
]


F = TypeVar("F", bound=Callable[..., Any])


def with_keep(fn: F) -> F:
    for opt in reversed(keep_flags):
        fn = opt(fn)
    return fn


@click.group(epilog=EXAMPLES, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--storage-option", "-o", "storage_options", multiple=True, metavar="KEY=VALUE",
              help="Passed to the storage client (fsspec/boto3/google-cloud-storage), "
                   "e.g. endpoint_url=..., verify_readback=true.")
@click.option("--progress/--no-progress", default=None,
              help="Byte progress bars on stderr (default: only on a terminal).")
@click.option("-v", "--verbose", count=True, help="-v: one line per save/commit/prune; -vv: debug.")
@click.version_option(package_name="cloudckpt")
@click.pass_context
def cli(ctx: click.Context, storage_options: tuple[str, ...], progress: bool | None, verbose: int) -> None:
    """Keep deep-learning checkpoints safe in S3, GCS or a local directory."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    root, before = logging.getLogger(), set(logging.getLogger().handlers)
    logging.basicConfig(level=level, format="cloudckpt: %(levelname)s: %(message)s", stream=sys.stderr)
    obj = ctx.ensure_object(dict)
    redactor = obj.setdefault("redactor", Redactor.from_environ())
    for handler in set(root.handlers) - before:  # every log line, the SDKs' debug lines too, without credentials
        handler.addFilter(ScrubFilter(redactor))
    if verbose == 0:
        summary = out.RetrySummary(redactor)
        for handler in root.handlers:
            handler.addFilter(summary)
        ctx.call_on_close(summary.report)  # runs before main() prints the error line
    options = _pairs(storage_options, "--storage-option", _parse_value, secret=True)
    redactor.add_options(options)
    obj.update(storage_options=options, progress=progress)


@cli.command("ls")
@remote
@cli_legacy.legacy_url("URL")
@json_flag
@click.pass_context
def ls_cmd(ctx: click.Context, url: str | None, as_json: bool) -> None:
    """List the committed checkpoints of the run; at a prefix that holds runs (no run of its own), list the runs."""
    with _store(ctx, url) as store:
        try:
            index = store.index()
        except CheckpointNotFoundError:
            from .runs import find_runs

            runs = find_runs(store)
            if not runs:
                raise
            out.emit(runs, as_json, out.runs_table)
            return
        out.emit([out.row(c, index) for c in index.checkpoints], as_json, out.table)


@cli.command("show")
@click.argument("selector")
@remote
@cli_legacy.legacy_url("--from")
@json_flag
@click.pass_context
def show_cmd(ctx: click.Context, selector: str, url: str | None, as_json: bool) -> None:
    """Show one checkpoint: SELECTOR is best, latest, latest-model, an epoch number, a checkpoint id or a tag."""
    with _store(ctx, url) as store:
        index = store.index()
        row = out.row(index.resolve(selector), index)
        out.emit(row, as_json, lambda r: out.table([r]) + "\n" + "\n".join(
            f"  {f['path']}  {out.human_size(f['size'])}  crc32c={f['crc32c']}" for f in r["files"]))


@cli.command("push")
@click.argument("path", type=click.Path(exists=True))
@remote
@cli_legacy.legacy_url("--to")
@click.option("--epoch", type=click.IntRange(min=0))
@click.option("--step", type=click.IntRange(min=0))
@click.option("--metric", "metrics", multiple=True, metavar="NAME=VALUE",
              help="A metric of this checkpoint (repeatable).")
@click.option("--monitor", help="The metric that ranks checkpoints (becomes the run's policy).")
@click.option("--mode", type=click.Choice(["min", "max"]), help="Whether lower or higher --monitor is better.")
@with_keep
@click.option("--sha256", is_flag=True, help="Also record sha256 checksums (crc32c is always recorded).")
@json_flag
@click.pass_context
def push_cmd(ctx: click.Context, path: str, url: str | None, epoch: int | None, step: int | None,
             metrics: tuple[str, ...], monitor: str | None, mode: str | None, keep_best: int | None,
             keep_last: int | None, keep_every: int | None, sha256: bool, as_json: bool) -> None:
    """Commit a file or directory (any framework's checkpoint) to the run."""
    values = _pairs(metrics, "--metric", float)
    with _store(ctx, url) as store:
        entry = store.push(path, epoch=epoch, step=step, metrics=values, monitor=monitor, mode=mode,
                           keep_best=keep_best, keep_last=keep_last, keep_every=keep_every, sha256=sha256)
        out.emit(out.row(entry, store.keeper.read_existing()), as_json,
                 lambda r: f"committed {r['id']} ({len(r['files'])} files, {out.human_size(r['size'])})")


@cli.command("prune")
@remote
@cli_legacy.legacy_url("URL")
@with_keep
@click.option("--dry-run", is_flag=True, help="Say what would be deleted; delete nothing.")
@json_flag
@click.pass_context
def prune_cmd(ctx: click.Context, url: str | None, keep_best: int | None, keep_last: int | None,
              keep_every: int | None, dry_run: bool, as_json: bool) -> None:
    """Delete what retention doesn't keep (flags given, else the run's policy). Latest and best are always kept."""
    with _store(ctx, url) as store:
        pruned = store.prune(keep_best=keep_best, keep_last=keep_last, keep_every=keep_every, dry_run=dry_run)
        verb = "would prune" if dry_run else "pruned"
        out.emit({"dry_run": dry_run, "pruned": [c.summary() for c in pruned]}, as_json,
             lambda r: "\n".join(f"{verb} {c['id']}" for c in r["pruned"]) or "nothing to prune")


@cli.command("verify")
@click.argument("selectors", nargs=-1, metavar="[SELECTOR]")
@remote
@click.option("--all", "all_", is_flag=True, help="Verify every committed checkpoint.")
@json_flag
@click.pass_context
def verify_cmd(ctx: click.Context, selectors: tuple[str, ...], url: str | None, all_: bool, as_json: bool) -> None:
    """Download and check checkpoints' bytes against the index (default: latest). Exit 4 if any fails."""
    selectors = cli_legacy.verify_selectors(ctx, selectors, all_=all_, remote=url)
    if len(selectors) > 1 or (all_ and selectors):
        raise click.UsageError("give one SELECTOR or --all (the run is --remote URL)")
    with _store(ctx, url) as store:
        results = store.verify(selectors[0] if selectors else "latest", all=all_)
    rows = [{"id": r.id, "ok": r.ok, "error": r.error} for r in results]
    out.emit(rows, as_json, lambda rs: "\n".join(
        f"{'ok  ' if r['ok'] else 'FAIL'} {r['id']}" + (f": {r['error']}" if r["error"] else "") for r in rs))
    bad = [r for r in results if not r.ok]
    if bad:
        raise IntegrityError(f"{len(bad)} of {len(results)} checkpoints failed verification (first: {bad[0].id})")


@cli.command("gc")
@remote
@cli_legacy.legacy_url("URL")
@click.option("--dry-run", is_flag=True, help="Say what would be deleted; delete nothing.")
@click.option("--min-age", type=click.FloatRange(min=0), default=3600.0, show_default=True,
              help="Leave checkpoints and temporary files with an object younger than this many seconds alone (a "
                   "grace: gc is safe beside live writers whatever this is).")
@json_flag
@click.pass_context
def gc_cmd(ctx: click.Context, url: str | None, dry_run: bool, min_age: float, as_json: bool) -> None:
    """Remove leftovers of crashed commits: objects no committed checkpoint owns."""
    with _store(ctx, url) as store:
        report = store.gc(dry_run=dry_run, min_age=min_age)
    data = {"dry_run": dry_run, "deleted": report.deleted, "bytes": report.bytes, "checkpoints": report.checkpoints,
            "kept_young": report.kept_young, "young_objects": report.young_objects,
            "young_bytes": report.young_bytes, "condemned": report.condemned}
    out.emit(data, as_json, lambda r: f"{'would remove' if dry_run else 'removed'} {len(r['deleted'])} objects "
             f"({out.human_size(r['bytes'])}) of {len(r['checkpoints'])} uncommitted checkpoints" + out.young(r))


@cli.command("repair")
@remote
@click.option("--dry-run", is_flag=True, help="Say what would be fixed; write nothing.")
@json_flag
@click.pass_context
def repair_cmd(ctx: click.Context, url: str | None, dry_run: bool, as_json: bool) -> None:
    """Rewrite the index without malformed entries (their objects are left for gc) and null metrics."""
    with _store(ctx, url) as store:
        plan = store.repair(dry_run=dry_run)
    data = {"dry_run": dry_run, "rewritten": plan.index is not None and not dry_run,
            "problems": [{"where": p.where, "id": p.id, "fix": p.fix} for p in plan.problems]}
    verb = "would fix" if dry_run else "fixed"
    out.emit(data, as_json, lambda r: "\n".join([f"{verb}: {p}" for p in plan.problems]
                                                + [f"{verb} {len(plan.problems)} problems in the index"
                                                   if plan.problems else "the index has nothing to repair"]))


@cli.command("sync")
@click.argument("watch_dir", type=click.Path(exists=True, file_okay=False))
@remote
@cli_legacy.legacy_url("--to")
@click.option("--monitor", help="The metric that ranks checkpoints.")
@click.option("--mode", type=click.Choice(["min", "max"]))
@with_keep
@click.option("--name-pattern", help=r"Regex with named groups epoch, step and metrics, e.g. 'model-(?P<epoch>\d+)'.")
@click.option("--settle", type=click.FloatRange(min=0), default=5.0, show_default=True,
              help="Seconds a checkpoint must stay unchanged before it is committed.")
@click.option("--poll", type=click.FloatRange(min=0.05), default=2.0, show_default=True, help="Seconds between scans.")
@click.option("--exclusive", is_flag=True, help="Claim the run: fence out earlier writers.")
@click.pass_context
def sync_cmd(ctx: click.Context, watch_dir: str, url: str | None, monitor: str | None, mode: str | None,
             keep_best: int | None, keep_last: int | None, keep_every: int | None, name_pattern: str | None,
             settle: float, poll: float, exclusive: bool) -> None:
    """Watch WATCH_DIR and commit each finished checkpoint until stopped (SIGTERM finishes what is in flight)."""
    from .retention import Retention
    from .sync import SyncService

    policy = Retention(monitor=monitor, mode=mode, keep_best=keep_best, keep_last=keep_last,  # type: ignore[arg-type]
                       keep_every=keep_every)  # mode: click.Choice(["min", "max"])
    with _store(ctx, url) as store:
        service = SyncService(store, Path(watch_dir), settle=settle, poll=poll, name_pattern=name_pattern,
                              policy=policy, exclusive=exclusive)
        service.run_forever(ready=lambda: click.echo(f"cloudckpt sync: watching {watch_dir} -> {store.url}", err=True))
        click.echo("cloudckpt sync: stopped", err=True)


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the CLI and map every error to its exit code in this one place. Every message is scrubbed
    of credentials (:mod:`cloudckpt.redact`): secret options, URL user info, the environment's credentials."""
    redactor = Redactor.from_environ()
    args = sys.argv[1:] if argv is None else list(argv)
    redactor.add(_secret_args(args))
    try:
        with cancel.sigterm_interrupts():  # SIGTERM stops transfers like Ctrl-C does (exit 143; sync: its own)
            cli.main(args=cli_args.arrange(cli, args), prog_name="cloudckpt", standalone_mode=False,
                     obj={"redactor": redactor})
        return 0
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.UsageError as e:
        message = e.format_message()
        url = cli_args.misplaced_url(cli, args) if "unexpected extra argument" in message else None
        if url is not None:
            message = f"{url!r} is not an argument of this command: name the run with --remote {url}"
        click.echo(f"cloudckpt: usage error: {redactor.scrub(message)}", err=True)
        return 2
    except click.ClickException as e:
        click.echo(f"cloudckpt: error: {redactor.scrub(e.format_message())}", err=True)
        return e.exit_code
    except (click.Abort, KeyboardInterrupt) as e:
        code = cancel.exit_code(e)
        kept = cancel.kept()
        click.echo(f"cloudckpt: interrupted ({'SIGTERM' if code == cancel.EXIT_SIGTERM else 'Ctrl-C'})"
                   + "".join(f"; {redactor.scrub(line)}" for line in kept), err=True)
        cancel.exit_now_if_stuck(code)
        return code
    except CloudCkptError as e:
        return _fail(e, e.exit_code, redactor)
    except Exception as e:  # unexpected: still one line, traceback on request
        return _fail(e, 1, redactor)


def _secret_args(args: list[str]) -> list[str]:
    """Values of secret ``-o NAME=VALUE`` options and URL user info on the command line, known before parsing."""
    found: list[str] = []
    for i, arg in enumerate(args):
        item = arg
        for flag in ("--storage-option=", "-o"):
            if arg.startswith(flag) and len(arg) > len(flag):
                item = arg[len(flag):]
        if arg in ("-o", "--storage-option") and i + 1 < len(args):
            item = args[i + 1]
        name, sep, value = item.partition("=")
        if sep and is_secret_name(name):
            found.append(value)
        found += url_secrets(arg)
    return found


def _fail(exc: BaseException, code: int, redactor: Redactor) -> int:
    if os.environ.get("CLOUDCKPT_DEBUG"):
        click.echo(redactor.scrub("".join(traceback.format_exception(exc))), err=True, nl=False)
    message = " ".join(redactor.scrub(str(exc)).split()) or type(exc).__name__
    click.echo(f"cloudckpt: error: {message}", err=True)
    return code


from . import cli_labels, cli_pull  # noqa: E402,F401  (register pin, unpin, tag, untag, pull on `cli`)

if __name__ == "__main__":  # `python -m cloudckpt.cli`: the module as imported, with the commands registered on it
    from cloudckpt.cli import main as _main

    sys.exit(_main())
