"""``ftctl``: the scriptable client of ftmllmd. Rich tables for people, ``--json`` for scripts.

:mod:`~tui.ftctl.main` holds the whole command list; each group of commands lives in its own module
(:mod:`~tui.ftctl.ocr`, :mod:`~tui.ftctl.train`, :mod:`~tui.ftctl.engine`, :mod:`~tui.ftctl.service`), on top
of :mod:`~tui.ftctl.output` (exit codes, consoles, ``--json``) and :mod:`~tui.ftctl.follow` (the one loop that
follows a job for ``--wait`` and ``--follow``).
"""
