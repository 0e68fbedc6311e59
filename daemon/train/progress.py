"""Follow LLaMA-Factory's ``output_dir/trainer_log.jsonl`` and turn its lines into typed loss points.

The file is appended one JSON line per logging step by a writer thread in the trainer, so a read can end
in the middle of a line; it may not exist yet (imports and preprocessing take a while); and after a resume
from checkpoint-N it is appended again from step N+1, repeating steps already seen. Two schemas exist:
LLaMA-Factory's LogCallback (``current_steps``, ``total_steps``, ``loss``, ``lr``, ``eval_loss``,
``percentage``, ``elapsed_time``/``remaining_time`` as "H:MM:SS") and the v1 trainer (``step``,
``total_steps``, ``loss``, ``learning_rate``). Each (step, kind) is reported once: a train line and an eval
line of the same step are two points; the repeat of a step after a resume is dropped.

Polling, not inotify: a stat() every ``interval`` s is cheap, works on NFS, and needs no thread; at 0.1 s the
delay from write to event is far under the 500 ms goal.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

TRAINER_LOG = "trainer_log.jsonl"

PointKind = Literal["train", "eval", "progress"]

_TIME_RE = re.compile(r"^(?:(\d+) days?, )?(\d+):(\d{1,2}):(\d{1,2})(?:\.\d+)?$")


@dataclass(frozen=True)
class LossPoint:
    step: int
    total_steps: int
    loss: float | None = None
    lr: float | None = None
    eval_loss: float | None = None
    epoch: float | None = None
    percentage: float | None = None
    elapsed_s: float | None = None
    remaining_s: float | None = None

    @property
    def kind(self) -> PointKind:
        return point_kind(self.loss, self.eval_loss)


def point_kind(loss: float | None, eval_loss: float | None) -> PointKind:
    """train (has loss), eval (has eval_loss only) or progress (a predict step or the closing line)."""
    if loss is not None:
        return "train"
    return "eval" if eval_loss is not None else "progress"


def seen_keys(points: Iterable[Any]) -> set[tuple[int, PointKind]]:
    """The (step, kind) pairs of stored points (anything with step/loss/eval_loss, e.g. protocol.TrainPoint),
    for :class:`TrainerLogTail` after a daemon restart."""
    keys: set[tuple[int, PointKind]] = set()
    for p in points:  # a stored point may hold a step's training loss and its eval loss together
        if p.loss is not None:
            keys.add((p.step, "train"))
        if p.eval_loss is not None or p.loss is None:
            keys.add((p.step, point_kind(None, p.eval_loss)))
    return keys


def parse_duration(text: Any) -> float | None:
    """ "0:01:05" or "1 day, 2:03:04" (str(timedelta)) → seconds."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return float(text)
    if not isinstance(text, str):
        return None
    m = _TIME_RE.match(text.strip())
    if not m:
        return None
    days, h, mi, s = (int(g) if g else 0 for g in m.groups())
    return float(((days * 24 + h) * 60 + mi) * 60 + s)


def parse_line(record: dict[str, Any]) -> LossPoint | None:
    """One trainer_log.jsonl record (either schema) → a LossPoint; None if it has no step."""
    step = record.get("current_steps", record.get("step"))
    if not isinstance(step, int) or isinstance(step, bool):
        return None
    total = record.get("total_steps")
    total = total if isinstance(total, int) and not isinstance(total, bool) else 0
    pct = _num(record.get("percentage"))
    if pct is None and total > 0:
        pct = round(step / total * 100, 2)
    return LossPoint(
        step=step,
        total_steps=total,
        loss=_num(record.get("loss")),
        lr=_num(record.get("lr", record.get("learning_rate"))),
        eval_loss=_num(record.get("eval_loss")),
        epoch=_num(record.get("epoch")),
        percentage=pct,
        elapsed_s=parse_duration(record.get("elapsed_time")),
        remaining_s=parse_duration(record.get("remaining_time")),
    )


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


class TrainerLogTail:
    """Incremental reader of one trainer_log.jsonl. Not thread-safe; one owner (the job's task)."""

    def __init__(self, path: Path, seen: Iterable[tuple[int, PointKind]] = ()) -> None:
        """``seen``: (step, kind) pairs already stored (after a daemon restart), so they are not repeated."""
        self.path = path
        self._seen: set[tuple[int, PointKind]] = set(seen)
        self._offset = 0
        self._ino: int | None = None
        self._partial = b""
        self.bad_lines = 0  # lines that were not JSON (counted, skipped)

    def poll(self) -> list[LossPoint]:
        """New points since the last call; [] when the file does not exist (yet) or has nothing new."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return []
        try:
            st = os.fstat(fd)
            if st.st_ino != self._ino or st.st_size < self._offset:
                # a new file (removed and re-created) or a truncated one: read it again from the start;
                # the (step, kind) set keeps the repeated lines out
                self._ino, self._offset, self._partial = st.st_ino, 0, b""
            if st.st_size == self._offset:
                return []
            chunk = os.pread(fd, st.st_size - self._offset, self._offset)
        finally:
            os.close(fd)
        self._offset += len(chunk)
        data = self._partial + chunk
        lines = data.split(b"\n")
        self._partial = lines.pop()  # b"" after a complete last line; else the start of the next one
        points: list[LossPoint] = []
        for raw in lines:
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except ValueError:
                self.bad_lines += 1
                continue
            point = parse_line(record) if isinstance(record, dict) else None
            if point is None:
                continue
            key = (point.step, point.kind)
            if key in self._seen:
                continue
            self._seen.add(key)
            points.append(point)
        return points

    async def follow(self, *, interval: float = 0.1,
                     until: Callable[[], bool] | None = None) -> AsyncIterator[LossPoint]:
        """Yield points as they are written. Stops after a last read once ``until()`` is true (e.g. the
        trainer process exited), so the lines written just before the exit are not lost."""
        while True:
            done = until() if until is not None else False
            for point in self.poll():
                yield point
            if done:
                return
            await asyncio.sleep(interval)

