"""The key catalogue of the LLaMA-Factory that ``train.llamafactory_cli`` runs, so a spec is checked against the
keys that version accepts, not the ones of the copy ftmllm shipped with.

* Which version: the first time a cli is used (and again whenever its file changes: pip rewrites the script on
  an upgrade), the python of its venv answers ``keygen.py --probe`` (~0.2 s): LLaMA-Factory's and
  transformers' versions, and whether TensorBoard is installed there.
* The shipped copy (llamafactory_keys.json) is used as is when it was generated from those same versions.
* Any other version: its catalogue is generated from its own argument dataclasses by running keygen.py with
  that venv's python, as a child process (LLaMA-Factory is never imported into the daemon: 15-40 s and all of
  torch), and cached in ``<state_dir>/llamafactory/`` per version (written to a temporary file, then renamed).
  Generating takes longer than a client waits for an answer, so a submit waits up to :data:`WAIT_S` and then
  is told to submit again; the generation goes on.
* If the probe or the generation fails, the shipped copy is used, with one warning line in the daemon's log.

The methods block (child processes): the daemon calls :meth:`Catalogues.current` in a worker thread.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import subprocess
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from daemon.train.launch import LaunchError, resolve_cli
from daemon.train.validate import DEFAULT_CATALOG, KeyCatalog, load_catalog

log = logging.getLogger(__name__)

KEYGEN = Path(__file__).resolve().parent / "keygen.py"
CACHE_DIR = "llamafactory"  # under the state dir
WAIT_S = 5.0  # below ftctl's default answer timeout (10 s): the submit is answered either way
PROBE_TIMEOUT_S = 60.0
GENERATE_TIMEOUT_S = 900.0
# Runs keygen.py by path without putting its folder first on sys.path (where daemon/train/datasets.py would
# shadow Hugging Face's `datasets`); the cwd is the cache folder.
_RUNNER = "import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]")


class CatalogueNotReady(Exception):
    """The catalogue of this version is still being generated; the message says to submit again."""


@dataclass(frozen=True)
class Installed:
    """What ``keygen.py --probe`` said about a cli's venv."""

    python: str
    llamafactory: str
    transformers: str
    tensorboard: bool


@dataclass
class _Generation:
    installed: Installed
    path: Path
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    error: str = ""


class Catalogues:
    def __init__(self, cache_dir: Path, *, shipped: Path = DEFAULT_CATALOG, wait_s: float = WAIT_S) -> None:
        self.cache_dir = cache_dir
        self.shipped_path = shipped
        self.wait_s = wait_s
        self._shipped: KeyCatalog | None = None
        self._lock = threading.Lock()
        self._known: dict[tuple[str, int, int], KeyCatalog] = {}  # (cli, mtime, size) → its catalogue
        self._probed: dict[tuple[str, int, int], Installed] = {}
        self._running: dict[Path, _Generation] = {}

    def shipped(self) -> KeyCatalog:
        if self._shipped is None:
            self._shipped = load_catalog(self.shipped_path)
        return self._shipped

    def current(self, cli: str, env: Mapping[str, str]) -> KeyCatalog:
        """The catalogue of the LLaMA-Factory ``cli`` runs (``train.llamafactory_cli``), with ``env`` (the
        trainer's environment). Raises CatalogueNotReady while a new version's catalogue is generated."""
        try:
            path = resolve_cli(cli)
            st = os.stat(path)
        except (LaunchError, OSError):
            return self.shipped()  # the submit is refused for the missing cli itself (kind.py)
        key = (os.path.realpath(path), st.st_mtime_ns, st.st_size)
        with self._lock:
            known = self._known.get(key)
            if known is not None:
                return known
            installed = self._probed.get(key)
            if installed is None:
                try:
                    installed = probe(python_of(path), env)
                except RuntimeError as exc:
                    return self._fallback(key, f"cannot ask {path}'s python for its version ({exc})")
                self._probed[key] = installed
            shipped = self.shipped()
            if (installed.llamafactory, installed.transformers) == (shipped.llamafactory_version,
                                                                    shipped.transformers_version):
                return self._remember(key, shipped, installed)
            cache = self.cache_path(installed)
            if cache.is_file():
                try:
                    return self._remember(key, load_catalog(cache), installed)
                except (OSError, ValueError, KeyError, TypeError) as exc:
                    log.warning("LLaMA-Factory key catalogue %s is unreadable (%s); generating it again", cache, exc)
            gen = self._running.get(cache)
            if gen is None:
                gen = self._running[cache] = _Generation(installed=installed, path=cache)
                threading.Thread(target=self._generate, args=(gen, dict(env)), name="lf-keygen", daemon=True).start()
        if not gen.done.wait(self.wait_s):
            raise CatalogueNotReady(
                f"the key catalogue of LLaMA-Factory {installed.llamafactory} (train.llamafactory_cli {cli}) is "
                f"being generated from its argument dataclasses, first use of this version (about a minute); "
                f"submit again shortly")
        with self._lock:
            self._running.pop(cache, None)
            if gen.error:
                return self._fallback(key, f"cannot generate the key catalogue of LLaMA-Factory "
                                           f"{installed.llamafactory} with {installed.python} ({gen.error})", installed)
            try:
                return self._remember(key, load_catalog(cache), installed)
            except (OSError, ValueError, KeyError, TypeError) as exc:
                return self._fallback(key, f"the generated key catalogue {cache} is unreadable ({exc})", installed)

    def cache_path(self, installed: Installed) -> Path:
        name = (f"keys-llamafactory-{_UNSAFE.sub('_', installed.llamafactory)}"
                f"-transformers-{_UNSAFE.sub('_', installed.transformers)}.json")
        return self.cache_dir / name

    def _remember(self, key: tuple[str, int, int], catalog: KeyCatalog, installed: Installed) -> KeyCatalog:
        catalog = dataclasses.replace(catalog, tensorboard=installed.tensorboard)
        self._known[key] = catalog
        return catalog

    def _fallback(self, key: tuple[str, int, int], why: str, installed: Installed | None = None) -> KeyCatalog:
        shipped = self.shipped()
        log.warning("%s; checking specs against the key catalogue shipped for LLaMA-Factory %s instead, which may "
                    "refuse keys of the configured version or accept removed ones: fix that venv and restart "
                    "ftmllmd", why, shipped.llamafactory_version)
        catalog = dataclasses.replace(shipped, tensorboard=installed.tensorboard if installed else None)
        self._known[key] = catalog  # one warning per cli, not one per submit
        return catalog

    def _generate(self, gen: _Generation, env: dict[str, str]) -> None:
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            r = subprocess.run([gen.installed.python, "-c", _RUNNER, str(KEYGEN), str(gen.path)], env=env,
                               cwd=self.cache_dir, capture_output=True, text=True, timeout=GENERATE_TIMEOUT_S)
            if r.returncode != 0:
                gen.error = f"exit status {r.returncode}: {_last_line(r.stderr) or _last_line(r.stdout)}"
            else:
                log.info("generated the key catalogue of LLaMA-Factory %s into %s", gen.installed.llamafactory,
                         gen.path)
        except (OSError, subprocess.SubprocessError) as exc:
            gen.error = str(exc)
        finally:
            gen.done.set()


def python_of(cli: str) -> str:
    """The interpreter of the venv ``cli`` lives in: its bin/python, else the cli script's ``#!`` line."""
    sibling = Path(cli).parent / "python"
    if sibling.is_file() and os.access(sibling, os.X_OK):
        return str(sibling)
    try:
        with open(cli, "rb") as fh:
            first = fh.readline(4096)
    except OSError as exc:
        raise RuntimeError(f"cannot read {cli}: {exc.strerror}") from None
    words = first[2:].decode(errors="replace").split() if first.startswith(b"#!") else []
    if not words or not os.path.isabs(words[0]):
        raise RuntimeError(f"{cli} has no bin/python beside it and no #! line naming one")
    return words[0]


def probe(python: str, env: Mapping[str, str]) -> Installed:
    try:
        r = subprocess.run([python, "-c", _RUNNER, str(KEYGEN), "--probe"], env=dict(env), capture_output=True,
                           text=True, timeout=PROBE_TIMEOUT_S, cwd="/")
    except (OSError, subprocess.SubprocessError) as exc:
        raise RuntimeError(str(exc)) from None
    if r.returncode != 0:
        raise RuntimeError(f"exit status {r.returncode}: {_last_line(r.stderr)}")
    try:
        data = json.loads(r.stdout.strip().splitlines()[-1])
        return Installed(python=python, llamafactory=str(data["llamafactory"]),
                         transformers=str(data["transformers"]), tensorboard=bool(data["tensorboard"]))
    except (ValueError, KeyError, IndexError, TypeError):
        raise RuntimeError(f"unexpected answer {_last_line(r.stdout)!r}") from None


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""
