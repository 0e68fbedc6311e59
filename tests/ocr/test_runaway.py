"""The repetition guard: loops are caught early, ordinary Markdown is not, the cut keeps what came first."""

from __future__ import annotations

import random

from daemon.engines.vlm.runaway import MIN_CHARS, RepetitionGuard, cut_loop, describe, find_loop

TABLE = "| Region | Units | Revenue |\n| --- | --- | --- |\n" + "".join(
    f"| r{i} | {i * 7} | {i * 40} |\n" for i in range(60))


def feed(text: str, chunk: int = 3) -> RepetitionGuard:
    g = RepetitionGuard()
    for i in range(0, len(text), chunk):
        if g.feed(text[i:i + chunk]) is not None:
            break
    return g


def test_single_character_loop_is_caught_at_the_threshold() -> None:
    g = feed(" one an" + "%" * 2000, chunk=1)
    assert g.loop is not None and g.loop.period == 1 and g.loop.unit == "%"
    assert len(g.text) <= MIN_CHARS + 7 + g.check_every


def test_phrase_loop_is_caught_and_cut_after_one_repetition() -> None:
    text = "# Title\n\nSome real text first.\n" + " oneure" * 200
    loop = find_loop(text)
    assert loop is not None and loop.period == 7
    assert cut_loop(text, loop).startswith("# Title\n\nSome real text first.\n")
    assert cut_loop(text, loop).count("oneure") <= 2


def test_repeated_table_row_is_a_loop() -> None:
    g = feed("| a | b |\n|---|---|\n" + "| 1 | 2 |\n" * 100)
    assert g.loop is not None and g.loop.period == 10 and "| 1 | 2 |" in g.loop.unit * 2


def test_ordinary_markdown_and_noise_do_not_trip_it() -> None:
    rnd = random.Random(7)
    noise = "".join(rnd.choice("abcdefgh ij%7'") for _ in range(20000))
    assert feed(noise).loop is None
    assert feed(TABLE).loop is None
    assert feed("| " + " | ".join(["---"] * 40) + " |\n").loop is None  # a 40-column separator line
    assert feed("Chapter 1 " + "." * 120 + " 5\n").loop is None  # a dotted leader


def test_long_period_loops_up_to_the_limit() -> None:
    para = "".join(random.Random(1).choice("abcdefghij ") for _ in range(300)) + "\n"
    assert find_loop("intro\n" + para * 5) is not None
    assert find_loop("intro\n" + para * 2) is None  # two copies are not yet a loop


def test_describe_names_temperature_and_what_went_wrong() -> None:
    loop = find_loop("x" + "%" * 400)
    assert describe("loop", loop, 0.0, 400).startswith("temperature 0: repeated '%'")
    assert "max_tokens (340 tokens)" in describe("length", None, 0.5, 340)
