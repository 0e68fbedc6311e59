"""Landlock confinement of a child (daemon/children/landlock.py), with real children on this kernel: what it may
read, write and run, its own TMPDIR, and the wrapper's one-line refusals. Root is confined too: Landlock is not
a file-permission check, so these hold for the test process as for the daemon's user."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from daemon.children.landlock import abi_version, wrap

pytestmark = pytest.mark.skipif(abi_version() <= 0, reason="this kernel has no Landlock")
# the probe's interpreter: the venv and the installation it was made from
PYTHON = [Path(sys.prefix), Path(sys.base_prefix)]

PROBE = r"""
import json, os, subprocess, sys, tempfile
def can(fn):
    try:
        fn()
        return True
    except OSError:
        return False
reads, writes = sys.argv[1].split(","), sys.argv[2].split(",")
out = {"read": {p: can(lambda p=p: open(p).read()) for p in reads},
       "write": {p: can(lambda p=p: open(p, "w").write("x")) for p in writes},
       "tmpdir": tempfile.gettempdir(),
       "ls": can(lambda: subprocess.run(["ls", "/usr"], check=True, capture_output=True))}
print(json.dumps(out))
"""


def _probe(tmp_path: Path, reads: list[Path], writes: list[Path], **rules: object) -> dict[str, object]:
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    rules["read"] = [*PYTHON, *rules.get("read", ())]  # type: ignore[misc]
    argv = wrap([sys.executable, "-I", str(probe), ",".join(map(str, reads)), ",".join(map(str, writes))],
                **rules)  # type: ignore[arg-type]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)  # type: ignore[no-any-return]


def test_a_confined_child_reads_only_its_folders_and_writes_only_its_own(tmp_path: Path) -> None:
    for name in ("shared", "own", "store", "other"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "f").write_text(name)
    (tmp_path / "one.txt").write_text("a single file")
    seen = _probe(tmp_path, reads=[tmp_path / n / "f" for n in ("shared", "own", "store", "other")]
                  + [tmp_path / "one.txt"],
                  writes=[tmp_path / "own" / "new", tmp_path / "shared" / "new", tmp_path / "new"],
                  read=[tmp_path / "shared", tmp_path / "one.txt", tmp_path / "probe.py", tmp_path / "missing"],
                  write=[tmp_path / "own"], tmp=tmp_path / "own" / "tmp")
    assert seen["read"] == {str(tmp_path / "shared" / "f"): True, str(tmp_path / "own" / "f"): True,
                            str(tmp_path / "store" / "f"): False, str(tmp_path / "other" / "f"): False,
                            str(tmp_path / "one.txt"): True}
    assert seen["write"] == {str(tmp_path / "own" / "new"): True, str(tmp_path / "shared" / "new"): False,
                             str(tmp_path / "new"): False}
    assert seen["tmpdir"] == str(tmp_path / "own" / "tmp") and seen["ls"] is True
    assert not (tmp_path / "shared" / "new").exists() and (tmp_path / "store" / "f").read_text() == "store"


def test_a_link_in_an_allowed_folder_does_not_lead_out_of_it(tmp_path: Path) -> None:
    (tmp_path / "shared").mkdir()
    (tmp_path / "secret").write_text("s")
    (tmp_path / "shared" / "link").symlink_to(tmp_path / "secret")
    seen = _probe(tmp_path, reads=[tmp_path / "shared" / "link"], writes=[],
                  read=[tmp_path / "shared", tmp_path / "probe.py"], tmp=tmp_path / "tmp")
    assert seen["read"] == {str(tmp_path / "shared" / "link"): False}


def test_the_wrapper_says_in_one_line_why_it_did_not_start_a_child(tmp_path: Path) -> None:
    wrapper = wrap(["true"])[:3]
    for args, expected in (([], "no command after --"), (["--bogus", "x", "--", "true"], "usage: landlock.py"),
                           (["--", str(tmp_path / "nosuch")], f"cannot start {tmp_path / 'nosuch'}")):
        r = subprocess.run([*wrapper, *args], capture_output=True, text=True, timeout=60, check=False)
        assert r.returncode == 126 and expected in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
