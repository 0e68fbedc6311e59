"""Subcommands of ftctl contributed by the other parts; each entry is ``extend(submit_kinds, commands)``.

Kept apart from tui/ftctl.py so the OCR, training, engine and service parts each add their own commands
in their own module without editing the core CLI.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tui import ftctl_engine, ftctl_ocr, ftctl_service, ftctl_train

EXTENSIONS: list[Callable[[Any, Any], None]] = [ftctl_ocr.extend, ftctl_service.extend, ftctl_train.extend,
                                                  ftctl_engine.extend]
