"""``ftctl completion bash|zsh``: the shell completion script, generated from the parser with shtab.

Why shtab and not argcomplete: shtab writes a plain shell script once, so pressing Tab on a command, an option
or a fixed choice runs no Python at all; argcomplete starts ftctl (imports and all) on every Tab. Only what
lives in the daemon (job ids, templates, datasets) calls back into ``ftctl __complete WHAT``, which asks
the daemon with a one-second timeout and prints nothing when it is down.

Which arguments complete what is read from their ``dest`` (:data:`DYNAMIC`), so commands other modules add
(an ``id``, a ``template``, a ``--dataset``) complete without code of their own.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from tui.ftctl.output import EXIT_OK

# dest of an argument → what `ftctl __complete` lists for it
DYNAMIC = {"id": "jobs", "ids": "jobs", "job": "jobs", "jobs": "jobs",
           "template": "templates", "dataset": "datasets"}
# commands whose ids are of jobs not yet ended
ACTIVE_ONLY = frozenset({"cancel", "wait", "priority"})

_BASH = """
_ftctl_complete_{what}() {{
  compgen -W "$(command ftctl __complete {what} 2>/dev/null)" -- "$1"
}}
"""
_ZSH = """
_ftctl_complete_{what}() {{
  local -a words
  words=(${{(f)"$(command ftctl __complete {what} 2>/dev/null)"}})
  compadd -a words
}}
"""


def mark_dynamic(parser: argparse.ArgumentParser) -> None:
    """Give every argument named in :data:`DYNAMIC` (in every subcommand) its completion function."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in set(action.choices.values()):
                mark_dynamic(sub)
        elif action.dest in DYNAMIC and not action.choices:
            what = DYNAMIC[action.dest]
            if what == "jobs" and parser.prog.split()[-1] in ACTIVE_ONLY:
                what = "active"
            fn = f"_ftctl_complete_{what}"
            action.complete = {"bash": fn, "zsh": fn}  # type: ignore[attr-defined]


def script(parser: argparse.ArgumentParser, shell: str) -> str:
    import shtab

    mark_dynamic(parser)
    whats = sorted({*DYNAMIC.values(), "active"})
    preamble = "".join((_BASH if shell == "bash" else _ZSH).format(what=w) for w in whats)
    return str(shtab.complete(parser, shell=shell, preamble=preamble))


def cmd_completion(args: argparse.Namespace, build: Callable[[], argparse.ArgumentParser]) -> int:
    sys.stdout.write(script(build(), args.shell))
    return EXIT_OK


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser],
               build: Callable[[], argparse.ArgumentParser]) -> None:
    """``build``: makes ftctl's whole parser, the one the script completes."""
    sp = commands.add_parser(
        "completion", help="print the shell completion script (bash or zsh)",
        description="Print the completion script for bash or zsh: commands, options, choices, and job ids, "
        "templates and datasets from the running daemon. bash: `ftctl completion bash > "
        "~/.local/share/bash-completion/completions/ftctl`; zsh: `ftctl completion zsh > "
        "\"${fpath[1]}/_ftctl\"` (then start a new shell).")
    sp.set_defaults(local=lambda args: cmd_completion(args, build))
    sp.add_argument("shell", choices=("bash", "zsh"), help="the shell to complete in")
