"""Following trainer_log.jsonl: partial lines, a file that appears late, a resume that repeats steps."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

from daemon.train.progress import LossPoint, TrainerLogTail, parse_duration, parse_line, seen_keys

# Lines as LLaMA-Factory 0.9.5's LogCallback writes them (seen in a real run on the tiny model).
LF_LINES = [
    {"current_steps": 1, "total_steps": 4, "loss": 6.2011, "lr": 0.0, "epoch": 0.12, "percentage": 25.0,
     "elapsed_time": "0:00:01", "remaining_time": "0:00:03"},
    {"current_steps": 2, "total_steps": 4, "loss": 6.18, "lr": 0.00097, "epoch": 0.25, "percentage": 50.0,
     "elapsed_time": "0:00:02", "remaining_time": "0:00:02"},
    {"current_steps": 2, "total_steps": 4, "eval_loss": 6.05, "epoch": 0.25, "percentage": 50.0,
     "elapsed_time": "0:00:03", "remaining_time": "0:00:03"},
    {"current_steps": 4, "total_steps": 4, "epoch": 0.5, "percentage": 100.0, "elapsed_time": "0:00:05",
     "remaining_time": "0:00:00"},
]


def _append(path: Path, text: str) -> None:
    with path.open("a", encoding="utf-8") as fh:
        fh.write(text)


def test_both_schemas_become_the_same_point() -> None:
    lf = parse_line({"current_steps": 3, "total_steps": 10, "loss": 1.5, "lr": 1e-4, "epoch": 0.3,
                     "percentage": 30.0, "elapsed_time": "1 day, 0:00:10", "remaining_time": "0:01:05"})
    v1 = parse_line({"step": 3, "total_steps": 10, "loss": 1.5, "learning_rate": 1e-4, "epoch": 0.3,
                     "grad_norm": 0.7})
    assert lf == LossPoint(step=3, total_steps=10, loss=1.5, lr=1e-4, epoch=0.3, percentage=30.0,
                           elapsed_s=86410.0, remaining_s=65.0)
    assert v1 == LossPoint(step=3, total_steps=10, loss=1.5, lr=1e-4, epoch=0.3, percentage=30.0)
    assert parse_line({"loss": 1.0}) is None
    assert parse_duration("bogus") is None


def test_missing_file_then_partial_line_then_rest(tmp_path: Path) -> None:
    path = tmp_path / "trainer_log.jsonl"
    tail = TrainerLogTail(path)
    assert tail.poll() == []  # not written yet: imports take a while
    first = json.dumps(LF_LINES[0]) + "\n"
    second = json.dumps(LF_LINES[1])
    _append(path, first + second[:17])
    assert [p.step for p in tail.poll()] == [1]  # the half line waits
    _append(path, second[17:] + "\n")
    got = tail.poll()
    assert [(p.step, p.loss) for p in got] == [(2, 6.18)]
    assert tail.poll() == []


def test_eval_line_of_the_same_step_is_its_own_point_and_closing_line_is_progress(tmp_path: Path) -> None:
    path = tmp_path / "trainer_log.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in LF_LINES))
    points = TrainerLogTail(path).poll()
    assert [(p.step, p.kind) for p in points] == [(1, "train"), (2, "train"), (2, "eval"), (4, "progress")]
    assert points[2].eval_loss == 6.05 and points[3].percentage == 100.0


def test_resume_appends_repeated_steps_which_are_reported_once(tmp_path: Path) -> None:
    path = tmp_path / "trainer_log.jsonl"
    tail = TrainerLogTail(path)
    _append(path, "".join(json.dumps({**LF_LINES[0], "current_steps": s, "loss": 5.0 - s / 10}) + "\n"
                          for s in range(1, 13)))
    assert len(tail.poll()) == 12
    # killed after step 12, resumed from checkpoint-10: steps 11.. are written again
    _append(path, "".join(json.dumps({**LF_LINES[0], "current_steps": s, "loss": 4.0}) + "\n"
                          for s in range(11, 21)))
    assert [p.step for p in tail.poll()] == list(range(13, 21))


def test_daemon_restart_skips_points_already_stored(tmp_path: Path) -> None:
    path = tmp_path / "trainer_log.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in LF_LINES))
    stored = [LossPoint(step=1, total_steps=4, loss=6.2), LossPoint(step=2, total_steps=4, loss=6.18)]
    tail = TrainerLogTail(path, seen=seen_keys(stored))
    assert [(p.step, p.kind) for p in tail.poll()] == [(2, "eval"), (4, "progress")]


def test_rewritten_file_is_read_again_from_the_start(tmp_path: Path) -> None:
    path = tmp_path / "trainer_log.jsonl"
    path.write_text(json.dumps(LF_LINES[0]) + "\n" + json.dumps(LF_LINES[1]) + "\n")
    tail = TrainerLogTail(path)
    assert len(tail.poll()) == 2
    replacement = tmp_path / "new.jsonl"  # a new file in its place (overwrite_output_dir run)
    replacement.write_text(json.dumps({**LF_LINES[0], "current_steps": 3}) + "\n")
    os.replace(replacement, path)
    assert [p.step for p in tail.poll()] == [3]


def test_garbage_lines_are_counted_not_fatal(tmp_path: Path) -> None:
    path = tmp_path / "trainer_log.jsonl"
    path.write_text("not json\n[1,2]\n" + json.dumps(LF_LINES[0]) + "\n")
    tail = TrainerLogTail(path)
    assert [p.step for p in tail.poll()] == [1]
    assert tail.bad_lines == 1


async def test_follow_yields_points_as_written_and_drains_after_until(tmp_path: Path) -> None:
    path = tmp_path / "trainer_log.jsonl"
    finished = asyncio.Event()
    got: list[int] = []

    async def writer() -> None:
        for step in range(1, 6):
            _append(path, json.dumps({**LF_LINES[0], "current_steps": step}) + "\n")
            while len(got) < step and step < 5:  # wait for the reader to see it (event, not a sleep)
                await asyncio.sleep(0.01)
        finished.set()  # the last line is written just before the "process" ends

    task = asyncio.create_task(writer())
    async for point in TrainerLogTail(path).follow(interval=0.02, until=finished.is_set):
        got.append(point.step)
    await task
    assert got == [1, 2, 3, 4, 5]


def test_a_steps_eval_loss_joins_its_training_loss_in_the_store(tmp_path: Path) -> None:
    # LLaMA-Factory logs a step's eval line after its training line: both must reach the curve.
    from daemon.core.store import Store
    from shared.protocol import TrainPoint

    store = Store(tmp_path / "state.sqlite")
    try:
        job, _, _ = store.create_job("train", "alice", "sft", {})
        train = TrainPoint(job_id=job, step=2, total_steps=4, loss=6.18, ts=1.0)
        evaluation = TrainPoint(job_id=job, step=2, total_steps=4, eval_loss=6.05, ts=2.0)
        assert len(store.add_train_points([train])) == 1
        merged = store.add_train_points([evaluation])
        assert [p for _, p in merged] == [TrainPoint(job_id=job, step=2, total_steps=4, loss=6.18, eval_loss=6.05,
                                                     ts=1.0)]
        assert store.add_train_points([train, evaluation]) == []  # a resume repeats lines: nothing new
        assert store.train_points(job) == [p for _, p in merged]
        assert seen_keys(store.train_points(job)) == {(2, "train"), (2, "eval")}
    finally:
        store.close()
