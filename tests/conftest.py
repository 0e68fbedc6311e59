from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemon_proc import DaemonProc
from tests.train_daemon.support import Box, build_box


@pytest.fixture
def daemon() -> Iterator[DaemonProc]:
    """A real ftmllmd subprocess on a fresh temp dir, stopped and removed afterwards."""
    d = DaemonProc().start()
    try:
        yield d
    finally:
        d.close()


@pytest.fixture(scope="session")
def box() -> Iterator[Box]:
    """The tiny model and dataset, built once for every training test (local and on Ray)."""
    root = Path(tempfile.mkdtemp(prefix="ftlf", dir="/tmp"))
    try:
        yield build_box(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
