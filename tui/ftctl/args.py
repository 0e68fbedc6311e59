"""The command-line pieces that several command modules share."""

from __future__ import annotations

import argparse
from typing import TypeAlias

# what add_subparsers() returns: each command module adds its commands to it
Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def add_submit_flags(sp: argparse.ArgumentParser) -> None:
    """The flags every submitting command takes."""
    sp.add_argument("--name", help="a name to show in job lists")
    sp.add_argument("--wait", action="store_true", help="wait for the job to end; exit 0 only if it succeeded")
    sp.add_argument("--json", action="store_true")
