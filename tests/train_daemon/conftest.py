"""Fixtures for the training tests through the real daemon (helpers in support.py)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.train_daemon.support import Box, build_box


@pytest.fixture(scope="session")
def box() -> Iterator[Box]:
    """The tiny model and dataset, built once for every test here."""
    root = Path(tempfile.mkdtemp(prefix="ftlf", dir="/tmp"))
    try:
        yield build_box(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
