"""Where the ``cloudckpt`` command takes its options: the global ones on either side of the command.

``aws``, ``hf`` and ``gsutil`` users type ``-o``/``--progress``/``-v`` after the command and ``-r URL``/``--json``
before it; click accepts a group's options only before the command and a command's only after it. :func:`arrange`
moves each to its side before click parses the line (nothing after ``--`` moves; a value of the command's own
options is never taken for an option). :func:`misplaced_url` names a run URL given where a positional argument
belongs, so the usage error can say to pass it as ``--remote``.
"""

from __future__ import annotations

import os

import click

from .layout import INDEX_NAME

GROUP_VALUE = ("-o", "--storage-option")  # the group's options that take a value
GROUP_FLAGS = ("--progress", "--no-progress", "-v", "-vv", "-vvv", "--verbose")
COMMAND_VALUE = ("-r", "--remote")  # options every command has, given before it
COMMAND_FLAGS = ("--json",)


def _takes_value(arg: str, names: tuple[str, ...]) -> bool:
    return arg in names


def _is_joined(arg: str, names: tuple[str, ...]) -> bool:
    """``--storage-option=K=V``, ``-oK=V``, ``--remote=URL``, ``-rURL``: an option and its value in one word."""
    return any(arg.startswith(n + "=") or (not n.startswith("--") and arg.startswith(n) and len(arg) > len(n))
               for n in names)


def _value_options(command: click.Command) -> set[str]:
    """The command's own options that take a value (their next word is a value, never moved)."""
    return {name for p in command.params if isinstance(p, click.Option) and not p.is_flag and not p.count
            for name in (*p.opts, *p.secondary_opts)}


def arrange(group: click.Group, args: list[str]) -> list[str]:
    """``args`` with the group's options before the command and the command's ``-r``/``--json`` after it."""
    before: list[str] = []
    i = 0
    moved: list[str] = []  # -r URL / --json given before the command
    while i < len(args):
        arg = args[i]
        if arg == "--" or not arg.startswith("-"):
            break
        if _takes_value(arg, GROUP_VALUE) and i + 1 < len(args):
            before += args[i:i + 2]
            i += 2
        elif _takes_value(arg, COMMAND_VALUE) and i + 1 < len(args):
            moved += args[i:i + 2]
            i += 2
        elif arg in COMMAND_FLAGS or _is_joined(arg, COMMAND_VALUE):
            moved.append(arg)
            i += 1
        else:
            before.append(arg)
            i += 1
    if i >= len(args) or args[i] == "--":
        return args  # no command: click says what is missing
    name, rest = args[i], args[i + 1:]
    command = group.commands.get(name)
    if command is None:
        return args
    values = _value_options(command)
    after: list[str] = []
    j = 0
    while j < len(rest):
        arg = rest[j]
        if arg == "--":
            after += rest[j:]
            break
        if _takes_value(arg, GROUP_VALUE) and j + 1 < len(rest):
            before += rest[j:j + 2]
            j += 2
        elif arg in GROUP_FLAGS or _is_joined(arg, GROUP_VALUE):
            before.append(arg)
            j += 1
        elif arg in values and j + 1 < len(rest):
            after += rest[j:j + 2]
            j += 2
        else:
            after.append(arg)
            j += 1
    return [*before, name, *moved, *after]


def misplaced_url(group: click.Group, args: list[str]) -> str | None:
    """A run URL (``scheme://...``, or a local directory holding a run) given as a positional argument after the
    command, or None."""
    arranged = arrange(group, args)
    names = [a for a in arranged if not a.startswith("-")]
    command = next((group.commands[a] for a in names if a in group.commands), None)
    if command is None:
        return None
    values = _value_options(command) | set(GROUP_VALUE)
    start = arranged.index(command.name or "") + 1
    k = start
    while k < len(arranged):
        arg = arranged[k]
        if arg in values:
            k += 2
            continue
        if not arg.startswith("-") and ("://" in arg or os.path.isfile(os.path.join(arg, INDEX_NAME))):
            return arg  # a store URL, or a local directory that holds a run
        k += 1
    return None
