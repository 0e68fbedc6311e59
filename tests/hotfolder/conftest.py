from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemon_proc import DaemonProc

FAST = """
[hotfolder]
settle_s = 0.3
rescan_s = 2.0
[ocr]
workers = 2
page_timeout_s = 60.0
"""


def hot_daemon(extra: str = "") -> DaemonProc:
    d = DaemonProc()
    cfg = d.home / "ftmllm.toml"
    cfg.write_text(FAST + extra)
    d.config = cfg
    return d


@pytest.fixture
def hot() -> Iterator[DaemonProc]:
    """A real daemon whose hot folder settles quickly (0.3 s) — still a real watchdog observer."""
    d = hot_daemon().start()
    try:
        yield d
    finally:
        d.close()


def landed(d: DaemonProc, name: str) -> Path | None:
    """Where a dropped file ended: done/… or failed/…, else None."""
    for where in (d.paths.done, d.paths.failed):
        hits = [p for p in where.rglob(name) if p.is_file()]
        if hits:
            return hits[0]
    return None
