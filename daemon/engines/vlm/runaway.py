"""Runaway output: a VLM that starts repeating itself goes on until ``max_tokens`` and wastes the batch.

:class:`RepetitionGuard` watches a page's stream as it arrives and says when its tail has become periodic:
the last ``max(min_chars, min_repeats × p)`` characters repeat with a period ``p`` of up to ``max_period``
characters ("%%%%…", " oneure oneure …", a table row over and over). The thresholds are set so that
ordinary Markdown (a table's ``|---|---|`` line, a dotted leader, a few empty form rows) does not trip it.

Cost: a check runs every ``check_every`` new characters; candidate periods come from earlier occurrences of
the last few characters (``str.rfind``, in C), and each candidate costs one slice comparison. A 16,000
character page costs about a millisecond in all.

:data:`LADDER` is the retry schedule (temperatures) after a runaway or a cut answer; :func:`describe` puts
an attempt's outcome in words for the page's ``detail``.
"""

from __future__ import annotations

from dataclasses import dataclass

# Temperatures of the retries after the first attempt (which uses the configured temperature).
LADDER: tuple[float, ...] = (0.1, 0.1, 0.2, 0.3, 0.5, 0.8)

MIN_CHARS = 320
MIN_REPEATS = 4
MAX_PERIOD = 512
CHECK_EVERY = 16
_PROBE = 6  # characters whose earlier occurrences propose a period


@dataclass(frozen=True)
class Loop:
    period: int  # characters in one repetition
    start: int  # index in the text where the repetition begins
    unit: str  # one repetition, for the message


class RepetitionGuard:
    def __init__(self, min_chars: int = MIN_CHARS, min_repeats: int = MIN_REPEATS, max_period: int = MAX_PERIOD,
                 check_every: int = CHECK_EVERY) -> None:
        self.min_chars = min_chars
        self.min_repeats = min_repeats
        self.max_period = max_period
        self.check_every = check_every
        self._parts: list[str] = []
        self._length = 0
        self._since_check = 0
        self.loop: Loop | None = None

    @property
    def text(self) -> str:
        if len(self._parts) > 1:
            self._parts = ["".join(self._parts)]
        return self._parts[0] if self._parts else ""

    def feed(self, delta: str) -> Loop | None:
        """Add streamed text; return the loop once the tail repeats (and keep returning it)."""
        if self.loop is not None or not delta:
            return self.loop
        self._parts.append(delta)
        self._length += len(delta)
        self._since_check += len(delta)
        if self._since_check >= self.check_every and self._length >= self.min_chars:
            self._since_check = 0
            self.loop = find_loop(self.text, self.min_chars, self.min_repeats, self.max_period)
        return self.loop


def find_loop(text: str, min_chars: int = MIN_CHARS, min_repeats: int = MIN_REPEATS,
              max_period: int = MAX_PERIOD) -> Loop | None:
    """The shortest period p ≤ max_period with which the last max(min_chars, min_repeats·p) chars repeat."""
    n = len(text)
    if n < min_chars:
        return None
    probe = text[n - _PROBE:] if n >= _PROBE else text
    k = len(probe)
    # every earlier occurrence of the tail's last characters proposes a period: its distance from the end
    lo = max(0, n - k - max_period)
    hi = n - 1  # a match must end before the last character: period ≥ 1
    for _ in range(256):
        pos = text.rfind(probe, lo, hi)
        if pos < 0:
            return None
        p = n - k - pos
        need = max(min_chars, min_repeats * p)
        if need <= n:
            window = text[n - need:]
            if window[p:] == window[:-p]:
                return Loop(period=p, start=_run_start(text, p, n - need), unit=text[n - p:])
        hi = pos + k - 1
    return None


def _run_start(text: str, p: int, known: int) -> int:
    """Where the p-periodic run that covers text[known:] begins."""
    i = known
    while i > 0 and text[i - 1] == text[i - 1 + p]:
        i -= 1
    return i


def cut_loop(text: str, loop: Loop) -> str:
    """The text up to the loop and one repetition of it: what the model meant before it got stuck."""
    return text[: loop.start + loop.period]


def describe(outcome: str, loop: Loop | None, temperature: float, tokens: int) -> str:
    """One attempt's failure in words: "attempt at temperature 0.1: repeated '%' …"."""
    if outcome == "loop" and loop is not None:
        unit = loop.unit if len(loop.unit) <= 24 else loop.unit[:21] + "…"
        return f"temperature {temperature:g}: repeated {unit!r} (period {loop.period} chars), stopped"
    if outcome == "length":
        return f"temperature {temperature:g}: cut at max_tokens ({tokens} tokens) without finishing"
    return f"temperature {temperature:g}: {outcome}"
