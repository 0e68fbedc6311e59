"""The wheel says what licence it is under and carries the texts: a distributor (a Debian packager, an admin who
copies the wheel to an offline server) gets LICENSE and NOTICE with it, as the AGPL asks (README "Licence").

Built offline from a copy of the sources with the test venv's setuptools (the `test` extra pins one >= 77, as
[build-system] requires), so the test needs no index and leaves no build/ in the checkout."""

from __future__ import annotations

import email
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

from tests.daemon_proc import ROOT

SOURCES = ("pyproject.toml", "README.md", "LICENSE", "NOTICE", "daemon", "shared", "tui")


def _build_wheel(tmp: Path) -> Path:
    src = tmp / "src"
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            src.mkdir(exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    out = tmp / "whl"
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "-w", str(out), "--no-deps",
                        "--no-build-isolation", "--no-index", "-q"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    [wheel] = out.glob("ftmllm-*.whl")
    return wheel


def test_the_wheel_carries_the_licence_expression_and_the_licence_files(tmp_path: Path) -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wheel = _build_wheel(tmp_path)
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        [meta_name] = [n for n in names if n.endswith(".dist-info/METADATA")]
        meta = email.message_from_bytes(z.read(meta_name))
        dist_info = meta_name.rsplit("/", 1)[0]
        licence = z.read(f"{dist_info}/licenses/LICENSE").decode()
        notice = z.read(f"{dist_info}/licenses/NOTICE").decode()
    assert meta["License-Expression"] == project["license"] == "AGPL-3.0-or-later"
    assert sorted(meta.get_all("License-File") or []) == ["LICENSE", "NOTICE"]
    assert meta["License"] is None  # the old free-text field would contradict the expression
    assert licence == (ROOT / "LICENSE").read_text()
    assert licence.lstrip().startswith("GNU AFFERO GENERAL PUBLIC LICENSE") and "Version 3, 19 November 2007" in licence
    assert "PyMuPDF" in notice and "Artifex" in notice and "AGPL" in notice
    # an installed daemon generates the key catalogue of its LLaMA-Factory with these (daemon/train/catalogue.py)
    assert {"daemon/train/keygen.py", "daemon/train/llamafactory_keys.json"} <= set(names)


def test_the_build_system_asks_for_a_setuptools_that_reads_an_spdx_licence() -> None:
    # setuptools 76 rejects `license = "…"` as a plain string; 77 reads it as an SPDX expression
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    assert requires == ["setuptools>=77"]
