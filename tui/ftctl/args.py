"""The command-line pieces that several command modules share. Imports nothing heavy: ``ftctl status`` builds
its parser from here and must start fast."""

from __future__ import annotations

import argparse
from typing import TypeAlias

# what add_subparsers() returns: each command module adds its commands to it
Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"

JSON_HELP = "print the reply as JSON, every field included (schemas: `ftctl --help`)"
SET_HELP = ("set a key (repeatable): KEY=VALUE, the value read as YAML (JSON is YAML too): 3, 1e-4, true, "
            "'a b', [1, 2]; KEY= or KEY=null removes the key so its default applies")
PRIORITY_HELP = ("higher starts first, -100..100 (default 0); jobs of equal priority start in submit order; "
                 "change it later with `ftctl priority ID N`")
ID_HELP = "a job id (`ftctl jobs`)"


def add_json_flag(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--json", action="store_true", help=JSON_HELP)


def add_submit_flags(sp: argparse.ArgumentParser) -> None:
    """The flags every submitting command takes."""
    sp.add_argument("--name", help="a name to show in job lists")
    sp.add_argument("--priority", type=int, default=0, metavar="N", help=PRIORITY_HELP)
    sp.add_argument("--wait", action="store_true", help="wait for the job to end; exit 0 only if it succeeded")
    add_json_flag(sp)
