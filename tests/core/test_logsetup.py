"""Logging under systemd: journald takes each line's ``<N>`` prefix alone, so every line of a record has it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

RAISE_AND_LOG = """
import logging
from daemon.core.logsetup import setup_logging
setup_logging("info")
log = logging.getLogger("ftmllmd.test")
log.info("one line\\nand a second")
try:
    {}["missing"]
except KeyError:
    log.exception("the job failed")
log.warning("after")
"""


def test_every_line_of_a_traceback_carries_the_error_priority_under_journald() -> None:
    env = {**os.environ, "JOURNAL_STREAM": "8:12345"}
    r = subprocess.run([sys.executable, "-c", RAISE_AND_LOG], capture_output=True, text=True, timeout=60,
                       cwd=ROOT, env=env)
    assert r.returncode == 0, r.stderr
    lines = r.stderr.splitlines()
    assert lines[:2] == ["<6>ftmllmd.test: one line", "<6>and a second"]
    error = [line for line in lines if line.startswith("<3>")]
    # the message, "Traceback (most recent call last):", at least one frame, and the exception itself
    assert error[0] == "<3>ftmllmd.test: the job failed"
    assert "<3>Traceback (most recent call last):" in error
    assert error[-1] == "<3>KeyError: 'missing'"
    assert lines[lines.index(error[-1]) + 1] == "<4>ftmllmd.test: after"
    assert all(line[:3] in ("<6>", "<3>", "<4>") for line in lines), lines


def test_without_journald_lines_have_timestamps_and_no_priority_prefix() -> None:
    env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
    r = subprocess.run([sys.executable, "-c", RAISE_AND_LOG], capture_output=True, text=True, timeout=60,
                       cwd=ROOT, env=env)
    assert r.returncode == 0, r.stderr
    assert "ERROR   ftmllmd.test: the job failed" in r.stderr and "<3>" not in r.stderr
