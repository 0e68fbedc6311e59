from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.daemon_proc import DaemonProc


@pytest.fixture
def daemon() -> Iterator[DaemonProc]:
    """A real ftmllmd subprocess on a fresh temp dir, stopped and removed afterwards."""
    d = DaemonProc().start()
    try:
        yield d
    finally:
        d.close()
