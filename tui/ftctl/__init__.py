"""``ftctl``: the scriptable client of ftmllmd. Rich tables for people, ``--json`` for scripts.

:mod:`~tui.ftctl.main` holds the parser and the core commands, :mod:`~tui.ftctl.queue` the queue commands
(jobs, wait, cancel, rm, clean, priority); each other group of commands lives in its own module
(:mod:`~tui.ftctl.ocr`, :mod:`~tui.ftctl.train`, :mod:`~tui.ftctl.engine`, :mod:`~tui.ftctl.service`,
:mod:`~tui.ftctl.completion`), added by ``main.add_module_commands``, on top of :mod:`~tui.ftctl.output`
(exit codes, consoles, ``--json``) and :mod:`~tui.ftctl.follow` (the one loop that follows a job for
``--wait`` and ``--follow``). A core command imports none of the other modules: ``ftctl status`` starts fast.
"""
