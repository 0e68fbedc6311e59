"""``ftctl install-service``: runs ``ftmllmd install-service`` of this venv with the same arguments.

The installer is the daemon's (daemon/system/install.py), and the unit it writes starts the ftmllmd that
wrote it: the one beside this interpreter, so the service runs exactly the code this ftctl came from.
ftctl passes its output and exit code through.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from tui.ftctl.args import Subparsers
from tui.ftctl.output import EXIT_FAILED, err


def ftmllmd_beside_python() -> Path:
    # Not resolve(): the venv's bin/python is usually a symlink to the base interpreter, whose bin/ has no
    # ftmllmd.
    return Path(sys.executable).absolute().parent / "ftmllmd"


def cmd_install_service(args: argparse.Namespace) -> int:
    exe = ftmllmd_beside_python()
    if not os.access(exe, os.X_OK):
        err.print(f"ftctl: {exe}: no ftmllmd executable there; install ftmllm into this venv (`pip install -e .`)",
                  markup=False)
        return EXIT_FAILED
    argv = [str(exe), "install-service"]
    if args.user:
        argv.append("--user")
    if args.dest:
        argv += ["--dest", args.dest]
    if args.config_file:
        argv += ["--config-file", args.config_file]
    for path in args.rw or []:
        argv += ["--rw", path]
    rc = subprocess.run(argv, check=False).returncode
    return rc if rc >= 0 else 128 - rc  # killed by a signal: the shell's convention


def add_parser(commands: Subparsers) -> None:
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
