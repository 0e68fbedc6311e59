from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator

import pytest
from textual.pilot import Pilot


@pytest.fixture
def utc() -> Iterator[None]:
    """Clock strings ("08:53:20") in the snapshots must not depend on the machine's time zone."""
    old = os.environ.get("TZ")
    os.environ["TZ"] = "UTC"
    time.tzset()
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TZ", None)
        else:
            os.environ["TZ"] = old
        time.tzset()


async def wait_until(pilot: Pilot[object], condition: Callable[[], object], what: str,
                     timeout: float = 15.0) -> None:
    """Let the app run until ``condition`` holds (a deadline, not a sleep as synchronisation)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await pilot.pause(0.02)
