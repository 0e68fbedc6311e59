"""``ftmllmd``: the daemon's entry point (argument parsing, lock, signals, the event loop)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import time
from pathlib import Path

from daemon import __version__
from daemon.core.lock import AlreadyRunning, StateLock
from daemon.core.logsetup import setup_logging
from daemon.core.sdnotify import Notifier
from daemon.system.install import InstallError, install
from shared.config import ConfigError, Settings, load_settings
from shared.private_dir import UnsafePath

log = logging.getLogger("ftmllmd")

EXIT_FAILED = 1
EXIT_CONFIG = 2
EXIT_RUNNING = 4


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ftmllmd",
        description="The ftmllm daemon: owns the GPUs, the vLLM engine, the job queue and the hot folder. "
        "Clients: ftctl (CLI) and ftui (terminal UI).",
        epilog="Without --config or --home it uses XDG dirs: state ~/.local/state/ftmllm, sockets "
        "$XDG_RUNTIME_DIR/ftmllm (else /run/user/UID/ftmllm, else the state dir's run/), hot folder "
        "~/ftmllm/inbox. Every config key and its default: configs/ftmllm.toml (or `ftmllmd --print-config`).",
    )
    p.add_argument("--config", help="TOML config file (default: $FTMLLM_CONFIG, else "
                   "$XDG_CONFIG_HOME/ftmllm/ftmllm.toml when present, else built-in defaults)")
    p.add_argument("--home", help="keep everything (state, sockets, hot folder) under this dir "
                                  "(default: $FTMLLM_HOME)")
    p.add_argument("--print-config", action="store_true", help="print every key with its default and exit")
    p.add_argument("--check-config", action="store_true", help="validate the config and exit")
    p.add_argument("--version", action="version", version=f"ftmllmd {__version__}")
    commands = p.add_subparsers(dest="command", metavar="COMMAND", help="without one: run the daemon")
    sp = commands.add_parser(
        "install-service", help="write the systemd unit for this installation (system, or --user)",
        description="Write ftmllmd.service with ExecStart pointing at this ftmllmd, plus (system service) "
        "sysusers.d/tmpfiles.d snippets and /etc/ftmllm/ftmllm.toml if missing; prints the systemctl "
        "commands to run. `ftctl install-service` runs this.")
    sp.add_argument("--user", action="store_true", help="a unit for `systemctl --user` instead of the system")
    sp.add_argument("--dest", help="write everything into this directory instead (for packaging or review)")
    sp.add_argument("--config-file", dest="config_file", help="the config the service should use")
    sp.add_argument("--rw", action="append", metavar="PATH",
                    help="extra paths the service may write (model dirs, another hot folder)")
    return p


def install_service(args: argparse.Namespace) -> int:
    try:
        result = install(args.user, Path(args.dest) if args.dest else None,
                         config=Path(args.config_file).resolve() if args.config_file else None,
                         read_write_paths=[Path(p).resolve() for p in args.rw or []])
    except InstallError as exc:
        print(f"ftmllmd: {exc}", file=sys.stderr)
        return EXIT_FAILED
    # flushed line by line: stdout and stderr keep their order when both go to one file
    for path in result.written:
        print(f"wrote {path}", flush=True)
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    print("now run:")
    for cmd in result.commands:
        print(f"  {cmd}")
    return 0


async def run_daemon(settings: Settings, notifier: Notifier, ready_t0: float) -> int:
    # imported only here: the other commands (--print-config, install-service) need none of the parts and
    # their libraries
    from daemon.assemble import assemble

    daemon = assemble(settings, notifier)
    daemon.bind()
    await daemon.start()
    # pinged from this loop, so a loop that hangs stops the pings and systemd restarts us
    watchdog = asyncio.get_running_loop().create_task(notifier.run_watchdog(), name="watchdog")
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, daemon.reload)
    notifier.ready(daemon.status_line())
    log.info("ready in %.2fs: sockets in %s, state in %s, hot folder %s (engine: %s)",
             time.monotonic() - ready_t0, settings.paths.runtime_dir, settings.paths.state_dir,
             settings.paths.inbox, daemon.engine.kind)
    await stop.wait()
    notifier.stopping("stopping: no new work; running jobs stop so they can resume at the next start")
    log.info("stopping: no new work; running jobs will resume at the next start")
    await daemon.stop(timeout=settings.config.train.graceful_stop_s)
    watchdog.cancel()
    log.info("stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    t0 = time.monotonic()
    # first, before any thread or child exists: no child may inherit NOTIFY_SOCKET
    notifier = Notifier.from_environ(unset=True)
    args = build_parser().parse_args(argv)
    if args.command == "install-service":
        return install_service(args)
    if args.print_config:
        from shared.config import default_config_toml

        print(default_config_toml())
        return 0
    try:
        settings = load_settings(args.config, args.home)
    except ConfigError as exc:
        print(f"ftmllmd: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.check_config:
        print(f"ftmllmd: {settings.source}: config OK")
        return 0
    setup_logging(settings.config.daemon.log_level)
    lock = StateLock(settings.paths.state_dir)
    try:
        lock.acquire()
    except AlreadyRunning as exc:
        print(f"ftmllmd: {exc}", file=sys.stderr)
        return EXIT_RUNNING
    try:
        return asyncio.run(run_daemon(settings, notifier, t0))
    except (ConfigError, UnsafePath) as exc:  # found while binding: a socket group or the runtime dir
        print(f"ftmllmd: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    finally:
        lock.release()


if __name__ == "__main__":
    sys.exit(main())
