"""Logging to stderr, journald-friendly: under systemd (JOURNAL_STREAM set) no timestamps of our own and
a ``<N>`` syslog priority prefix, which journald turns into the entry's priority.

journald reads a stream line by line and takes the prefix of each line alone, so every line of a multi-line
record (a traceback, a child's quoted output) carries it: otherwise ``journalctl -p err`` shows the first line
of a traceback and files the rest at the stream's default priority (info).
"""

from __future__ import annotations

import logging
import os
import sys

_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


class _JournalFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{_PRIORITY.get(record.levelno, 6)}>"
        first, *rest = f"{record.name}: {super().format(record)}".splitlines() or [""]
        return "\n".join([prefix + first, *(prefix + line for line in rest)])


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if os.environ.get("JOURNAL_STREAM"):
        handler.setFormatter(_JournalFormatter("%(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
