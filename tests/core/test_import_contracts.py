"""The import rules of pyproject.toml ([tool.importlinter]) hold, and breaking one makes `lint-imports` fail.

The check runs on a temp copy of the packages, so the throwaway import never touches the checkout."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def _copy_tree(dest: Path) -> Path:
    for pkg in ("daemon", "shared", "tui"):
        shutil.copytree(ROOT / pkg, dest / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", dest / "pyproject.toml")
    return dest


def _lint(tree: Path) -> subprocess.CompletedProcess[str]:
    # the copy comes first on the path, ahead of the editable install of the checkout
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=tree, env=env, capture_output=True, text=True,
                          timeout=300, check=False)


def test_the_tree_keeps_every_contract_and_a_forbidden_import_breaks_one(tmp_path: Path) -> None:
    tree = _copy_tree(tmp_path)
    kept = _lint(tree)
    assert kept.returncode == 0, kept.stdout + kept.stderr
    assert "0 broken" in kept.stdout

    atomic = tree / "daemon" / "core" / "atomic.py"
    atomic.write_text(atomic.read_text() + "\nimport daemon.jobs.manager  # noqa: E402,F401\n")
    broken = _lint(tree)
    assert broken.returncode != 0
    assert "daemon.core is not allowed to import daemon.jobs" in broken.stdout
    assert "daemon.core.atomic -> daemon.jobs.manager" in broken.stdout


def test_shared_importing_tui_breaks_the_client_contract(tmp_path: Path) -> None:
    tree = _copy_tree(tmp_path)
    overrides = tree / "shared" / "overrides.py"
    overrides.write_text(overrides.read_text() + "\nimport tui.format  # noqa: E402,F401\n")
    broken = _lint(tree)
    assert broken.returncode != 0
    assert "shared is not allowed to import tui" in broken.stdout
