"""A second LLaMA-Factory "version" for the catalogue tests, built in seconds without a download.

This is a recorded-fixture stand-in for a LLaMA-Factory release we cannot download here (the test machines
reach no network): a folder laid out like a venv whose ``bin/python`` runs the real LLaMA-Factory venv's
interpreter with a stub ``llamafactory`` package first on its path. The stub is the installed package (its
modules are found through the stub's ``__path__``) except that ``hparams/generating_args.py`` adds one field,
:data:`NEW_KEY`, to ``GeneratingArguments``, and the distribution metadata says version :data:`VERSION`. That
is what a newer release looks like to the daemon: another version, the same dataclass modules, one more
key. ``bin/llamafactory-cli`` only says what it is and exits 3 (the tests check submits, not training).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

VERSION = "0.9.99"
NEW_KEY = "added_in_next_release"  # not a key of the real LLaMA-Factory 0.9.5
STUB_EXIT = 3


def real_package_dir(real_python: Path) -> Path:
    """Where the real ``llamafactory`` package lies (found without importing it)."""
    r = subprocess.run([str(real_python), "-c", "import importlib.util as u; "
                        "print(list(u.find_spec('llamafactory').submodule_search_locations)[0])"],
                       capture_output=True, text=True, timeout=60, check=True)
    return Path(r.stdout.strip())


def build_stub(root: Path, real_python: Path, *, tensorboard: bool = False) -> Path:
    """The stub under ``root``; returns its ``bin/llamafactory-cli`` (what ``train.llamafactory_cli`` names).
    ``tensorboard``: an empty ``tensorboard`` module beside it, so the probe finds one."""
    real = real_package_dir(real_python)
    site = root / "site"
    pkg = site / "llamafactory"
    (pkg / "hparams").mkdir(parents=True)
    dist = site / f"llamafactory-{VERSION}.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: llamafactory\nVersion: {VERSION}\n")
    (pkg / "__init__.py").write_text(
        f'"""Stub of a newer LLaMA-Factory (tests/train/lf_stub.py)."""\n'
        f"__path__.append({str(real)!r})  # what the stub does not replace comes from the installed package\n"
        f"__version__ = {VERSION!r}\n")
    (pkg / "hparams" / "__init__.py").write_text(
        f"__path__.append({str(real / 'hparams')!r})\n"
        f"_real = {str(real / 'hparams' / '__init__.py')!r}\n"
        "exec(compile(open(_real).read(), _real, 'exec'))\n")
    (pkg / "hparams" / "generating_args.py").write_text(
        f"_real = {str(real / 'hparams' / 'generating_args.py')!r}\n"
        "exec(compile(open(_real).read(), _real, 'exec'))\n"
        "_Released = GeneratingArguments\n\n\n"
        "@dataclass\n"
        "class GeneratingArguments(_Released):\n"
        f"    {NEW_KEY}: int = field(default=0, metadata={{'help': 'a key the next release adds'}})\n")
    if tensorboard:
        (site / "tensorboard").mkdir()
        (site / "tensorboard" / "__init__.py").write_text("")
    bin_dir = root / "bin"
    bin_dir.mkdir()
    python = bin_dir / "python"
    python.write_text(f'#!/bin/sh\nPYTHONPATH="{site}${{PYTHONPATH:+:$PYTHONPATH}}" exec "{real_python}" "$@"\n')
    cli = bin_dir / "llamafactory-cli"
    cli.write_text(f"#!{python}\nimport sys\nprint('stub llamafactory-cli {VERSION} (tests/train/lf_stub.py): no "
                   f"trainer here', file=sys.stderr)\nsys.exit({STUB_EXIT})\n")
    for exe in (python, cli):
        os.chmod(exe, 0o755)
    return cli
