"""``ftmllmd install-service [--user] [--dest DIR]`` (what ``ftctl install-service`` runs): write the systemd
unit for this venv and say what to run.

The templates live in the source tree's ``systemd/`` folder. Rendering replaces ``@FTMLLMD@`` with the
``ftmllmd`` next to the running interpreter (quoted for systemd), so the service runs exactly the code this
command came from. Everything is written atomically (temp file + rename): a half-written unit never exists.

Nothing here calls systemctl: installing a service is the administrator's decision, so the commands are
returned for ``ftmllmd install-service`` to print.
"""

from __future__ import annotations

import os
import stat
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from daemon.core.atomic import write_atomic

UNIT_NAME = "ftmllmd.service"
SERVICE_USER = "ftmllm"
SYSTEM_CONFIG = Path("/etc/ftmllm/ftmllm.toml")
SYSTEM_UNIT_DIR = Path("/etc/systemd/system")
SYSUSERS_DIR = Path("/etc/sysusers.d")
TMPFILES_DIR = Path("/etc/tmpfiles.d")
PLACEHOLDER = "@FTMLLMD@"


class InstallError(Exception):
    """One line: what could not be done and what to do instead."""


@dataclass(frozen=True)
class InstallResult:
    unit_path: Path
    written: list[Path]
    commands: list[str]
    # Problems that will make the service fail to start, phrased with the fix (empty when none are known).
    warnings: list[str] = field(default_factory=list)


def templates_dir() -> Path:
    """``systemd/`` of the source tree this module was imported from."""
    return Path(__file__).resolve().parents[2] / "systemd"


def default_exec_path() -> Path:
    """The ``ftmllmd`` console script of the venv whose interpreter runs this code."""
    # Not resolve(): the venv's bin/python is usually a symlink to the base interpreter, whose bin/ has no
    # ftmllmd.
    return Path(sys.executable).absolute().parent / "ftmllmd"


def systemd_quote(word: str, *, executable: bool = False) -> str:
    """Quote one command-line word for ExecStart= (systemd.service(5), "Command lines")."""
    # "%" starts a specifier anywhere on the line; "$" starts a variable only in the arguments (systemd does
    # not expand the executable's path). Both are doubled where they would be expanded.
    escaped = word.replace("%", "%%")
    if not executable:
        escaped = escaped.replace("$", "$$")
    if escaped and not any(c in escaped for c in " \t\"'\\;"):
        return escaped
    return '"' + escaped.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _template(user: bool) -> str:
    path = templates_dir() / ("user" if user else "") / UNIT_NAME
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InstallError(
            f"{path}: cannot read the unit template ({exc.strerror}); run ftctl from a source checkout "
            "installed with `pip install -e .`, which keeps the systemd/ folder next to the code"
        ) from None


def render_unit(user: bool, exec_path: Path, config: Path | None = None,
                read_write_paths: Sequence[Path] = ()) -> str:
    """The unit text with ExecStart= pointing at ``exec_path``.

    ``config`` replaces the unit's default ``--config`` (system: /etc/ftmllm/ftmllm.toml; user: none).
    ``read_write_paths`` (system unit only) are added as ReadWritePaths= lines, e.g. a hot folder or a model
    directory outside /srv/ftmllm.
    """
    if not exec_path.is_absolute():
        raise InstallError(f"ExecStart needs an absolute path, got {exec_path}; pass the full path of ftmllmd")
    out: list[str] = []
    for line in _template(user).splitlines():
        if line.startswith("ExecStart=" + PLACEHOLDER):
            rest = line[len("ExecStart=" + PLACEHOLDER):]
            if config is not None:
                rest = " --config " + systemd_quote(str(config.absolute()))
            line = "ExecStart=" + systemd_quote(str(exec_path), executable=True) + rest
        out.append(line)
        if line.startswith("ReadWritePaths=") and not user:
            out.extend("ReadWritePaths=" + systemd_quote(str(p.absolute())) for p in read_write_paths)
    text = "\n".join(out) + "\n"
    if PLACEHOLDER in text:
        raise InstallError(f"{templates_dir()}: template still contains {PLACEHOLDER} after rendering; "
                           "its ExecStart= line must start with ExecStart=@FTMLLMD@")
    return text


def user_unit_dir() -> Path:
    config_home = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config_home) / "systemd" / "user"


def unreachable_for_others(path: Path) -> Path | None:
    """The first directory on the way to ``path`` (symlinks followed) that other users cannot enter, or
    ``path`` itself if it is not executable by others; None if a stranger could run it."""
    resolved = path.resolve()
    for parent in reversed(resolved.parents):
        try:
            if not os.stat(parent).st_mode & stat.S_IXOTH:
                return parent
        except OSError:
            return parent
    try:
        return None if os.stat(resolved).st_mode & stat.S_IXOTH else resolved
    except OSError:
        return resolved


def _interpreter(script: Path) -> Path | None:
    try:
        with script.open("rb") as fh:
            first = fh.readline(4096)
    except OSError:
        return None
    if not first.startswith(b"#!"):
        return None
    words = first[2:].decode(errors="replace").split()
    return Path(words[0]) if words else None


def _reachability_warnings(exec_path: Path) -> list[str]:
    # The system unit runs as user ftmllm, which is neither root nor the installing user: a venv under a
    # private home (or an interpreter under /root/.pyenv) fails at start with status 203/EXEC.
    warnings = []
    checks = (("ftmllmd", exec_path), ("its Python interpreter", _interpreter(exec_path)),
              # an editable install runs the code from the checkout, which must be reachable too
              ("the ftmllm code", Path(__file__).resolve().parents[1]))
    for what, path in checks:
        if path is None:
            continue
        blocked = unreachable_for_others(path)
        if blocked is not None:
            warnings.append(
                f"{what} {path} is not reachable for user {SERVICE_USER} ({blocked} is not open to others), so "
                "the service would fail with status 203/EXEC; install ftmllm into a venv outside private "
                "homes (e.g. /opt/ftmllm/venv, built from a Python outside /root) and run install-service "
                "from there"
            )
    return warnings


def install(user: bool, dest: Path | None = None, *, exec_path: Path | None = None,
            config: Path | None = None, read_write_paths: Sequence[Path] = ()) -> InstallResult:
    """Write the unit (and for the system service the sysusers.d/tmpfiles.d snippets and, when missing, a
    config file) and return the commands that enable it.

    ``dest`` (a directory) receives everything instead of the standard places, for packaging or review: the
    unit as ``DEST/ftmllmd.service``, the snippets as ``DEST/sysusers.d/ftmllm.conf`` and
    ``DEST/tmpfiles.d/ftmllm.conf``; no config file is written then.
    """
    exe = exec_path if exec_path is not None else default_exec_path()
    if not os.access(exe, os.X_OK):
        raise InstallError(f"{exe}: no ftmllmd executable there; install ftmllm into this venv "
                           "(`pip install -e .`) or pass exec_path")
    unit_text = render_unit(user, exe, config, read_write_paths)
    written: list[Path] = []
    warnings: list[str] = []
    unit_dir = dest if dest is not None else (user_unit_dir() if user else SYSTEM_UNIT_DIR)
    unit_path = unit_dir / UNIT_NAME
    try:
        write_atomic(unit_path, unit_text)
        written.append(unit_path)
        if user:
            commands = _user_commands(unit_path, dest is not None)
        else:
            warnings += _reachability_warnings(exe)
            sysusers = (dest / "sysusers.d" if dest else SYSUSERS_DIR) / "ftmllm.conf"
            tmpfiles = (dest / "tmpfiles.d" if dest else TMPFILES_DIR) / "ftmllm.conf"
            for target, name in ((sysusers, "sysusers.d"), (tmpfiles, "tmpfiles.d")):
                write_atomic(target, (templates_dir() / name / "ftmllm.conf").read_text(encoding="utf-8"))
                written.append(target)
            config_path = config if config is not None else SYSTEM_CONFIG
            if dest is None and config is None and not config_path.exists():
                write_atomic(config_path, (templates_dir() / "ftmllm-system.toml").read_text(encoding="utf-8"))
                written.append(config_path)
            commands = _system_commands(unit_path, sysusers, tmpfiles, dest is not None)
    except PermissionError as exc:
        # exc.filename is the temp file; the directory is what the user can act on
        where = Path(exc.filename).parent if exc.filename else unit_dir
        raise InstallError(
            f"{where}: permission denied; run `sudo ftctl install-service` for the system service, add --user "
            "for your own, or write elsewhere with --dest DIR"
        ) from None
    except OSError as exc:  # e.g. --dest under a read-only or missing mount
        where = Path(exc.filename) if exc.filename else unit_dir
        if where.name.endswith(".tmp"):  # write_atomic's temp file: the directory is what matters
            where = where.parent
        raise InstallError(f"{where}: cannot write there ({exc.strerror}); write elsewhere with --dest DIR") from None
    return InstallResult(unit_path=unit_path, written=written, commands=commands, warnings=warnings)


def _system_commands(unit: Path, sysusers: Path, tmpfiles: Path, custom_dest: bool) -> list[str]:
    sudo = "" if os.geteuid() == 0 else "sudo "
    cmds = [
        f"{sudo}systemd-sysusers {sysusers}",
        f"{sudo}systemd-tmpfiles --create {tmpfiles}",
    ]
    if custom_dest:
        cmds.append(f"{sudo}systemctl link {unit}")
    cmds += [
        f"{sudo}systemctl daemon-reload",
        f"{sudo}systemctl enable --now {UNIT_NAME}",
        f"{sudo}usermod -aG {SERVICE_USER} \"$USER\"   # then log in again: members of {SERVICE_USER} may connect",
        f"journalctl -u {UNIT_NAME} -f",
    ]
    return cmds


def _user_commands(unit: Path, custom_dest: bool) -> list[str]:
    cmds = [f"systemctl --user link {unit}"] if custom_dest else []
    cmds += [
        "systemctl --user daemon-reload",
        f"systemctl --user enable --now {UNIT_NAME}",
        'loginctl enable-linger "$USER"   # keeps it running after you log out',
        f"journalctl --user -u {UNIT_NAME} -f",
    ]
    return cmds
