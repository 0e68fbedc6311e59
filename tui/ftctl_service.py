"""``ftctl install-service [--user]``: write the systemd unit for this installation and say what to run."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from daemon.system.install import InstallError, install
from tui.ftctl import EXIT_FAILED, EXIT_OK, err, out


def cmd_install_service(args: argparse.Namespace) -> int:
    try:
        result = install(args.user, Path(args.dest) if args.dest else None,
                         config=Path(args.config_file).resolve() if args.config_file else None,
                         read_write_paths=[Path(p).resolve() for p in args.rw or []])
    except InstallError as exc:
        err.print(f"ftctl: {exc}")
        return EXIT_FAILED
    for path in result.written:
        out.print(f"wrote {path}")
    for warning in result.warnings:
        err.print(f"[yellow]warning:[/] {warning}")
    out.print("now run:")
    for cmd in result.commands:
        out.print(f"  {cmd}")
    return EXIT_OK


def extend(kinds: Any, commands: Any) -> None:
    sp = commands.add_parser(
        "install-service", help="write the systemd unit for this installation (system, or --user)",
        description="Write ftmllmd.service with ExecStart pointing at this venv's ftmllmd, plus (system "
        "service) sysusers.d/tmpfiles.d snippets and /etc/ftmllm/ftmllm.toml if missing; prints the "
        "systemctl commands to run. Needs no running daemon.")
    sp.set_defaults(local=cmd_install_service)
    sp.add_argument("--user", action="store_true", help="a unit for `systemctl --user` instead of the system")
    sp.add_argument("--dest", help="write everything into this directory instead (for packaging or review)")
    sp.add_argument("--config-file", dest="config_file", help="the config the service should use")
    sp.add_argument("--rw", action="append", metavar="PATH",
                    help="extra paths the service may write (model dirs, another hot folder)")
