"""ftui's pure parts: filters, form parsing, smoothing, streamed text, state ordering, the chart."""

from __future__ import annotations

from pathlib import Path

import pytest
from textual.app import App, ComposeResult

from shared.client import Mirror
from shared.overrides import absolutize
from shared.overrides import parse_override_text as parse_overrides
from shared.protocol import HistoryEntry, JobInfo, Progress, TextDelta
from tui.screens.jobs import job_matches
from tui.state import MAX_TEXT_CHARS, Changes, State, TextStream
from tui.widgets.chart import LineChart, Series, ema, fmt_num


def job(id: int, state: str = "running", kind: str = "ocr", owner: str = "alice", name: str = "doc.pdf",
        created: float = 100.0, finished: float | None = None) -> JobInfo:
    return JobInfo(id=id, kind=kind, owner=owner, state=state, name=name, spec={}, created=created,  # type: ignore[arg-type]
                   finished=finished, progress=Progress())


def test_filter_words_must_all_match_and_field_prefix_narrows_to_that_field() -> None:
    j = job(12, state="failed", kind="train", owner="bob", name="invoices lora")
    assert job_matches(j, "")
    assert job_matches(j, "invoices")
    assert job_matches(j, "BOB lora")  # case-insensitive, every word
    assert job_matches(j, "state:fail kind:train")
    assert not job_matches(j, "invoices alice")
    assert not job_matches(j, "owner:lora")  # 'lora' is in the name, not the owner
    assert job_matches(j, "id:12") and not job_matches(j, "id:13")


def test_overrides_read_json_values_and_name_the_bad_line() -> None:
    got = parse_overrides("learning_rate=1e-4 lora_rank=16\nbf16=true\n# a comment\ntemplate=qwen2_vl  # why")
    assert got == {"learning_rate": 1e-4, "lora_rank": 16, "bf16": True, "template": "qwen2_vl"}
    with pytest.raises(ValueError, match="line 2: 'epochs' is not key=value"):
        parse_overrides("lora_rank=8\nepochs")


def test_absolutize_makes_local_paths_absolute_and_leaves_hub_names(tmp_path: Path) -> None:
    (tmp_path / "ckpt").mkdir()
    got = absolutize({"model_name_or_path": "Qwen/Qwen2-VL-2B-Instruct", "adapter_name_or_path": "ckpt",
                      "deepspeed": "./ds.json", "lora_rank": 8}, tmp_path)
    assert got["model_name_or_path"] == "Qwen/Qwen2-VL-2B-Instruct"
    assert got["adapter_name_or_path"] == str(tmp_path / "ckpt")
    assert got["deepspeed"] == str(tmp_path / "ds.json")
    assert got["lora_rank"] == 8


def test_ema_is_debiased_so_it_starts_at_the_first_value_and_follows_a_step() -> None:
    values = [2.0] * 5 + [1.0] * 50
    smooth = ema(values, 0.9)
    assert smooth[0] == pytest.approx(2.0)  # no pull toward zero at the start
    assert smooth[4] == pytest.approx(2.0)
    assert 1.0 < smooth[10] < 2.0
    assert smooth[-1] == pytest.approx(1.0, abs=0.02)
    assert ema(values, 0.0) == values


def test_text_stream_hands_out_only_the_new_part_and_asks_for_a_redraw_after_a_reset() -> None:
    s = TextStream(key="7:1")
    s.append(TextDelta(key="7:1", text="# Title\n"))
    seen, gen = s.total, s.generation
    s.append(TextDelta(key="7:1", text="body"))
    assert s.since(seen, gen) == "body"
    assert s.since(s.total, gen) == ""
    s.append(TextDelta(key="7:1", text="again", reset=True))  # the engine retried the page
    assert s.text == "again"
    assert s.since(seen, gen) is None  # the reader must redraw from s.text
    assert s.since(s.total, s.generation) == ""


def test_text_stream_keeps_a_bounded_tail_and_says_when_the_reader_fell_behind() -> None:
    s = TextStream(key="7:1")
    s.append(TextDelta(key="7:1", text="x" * 10))
    s.append(TextDelta(key="7:1", text="y" * MAX_TEXT_CHARS))
    assert len(s.text) == MAX_TEXT_CHARS and s.total == MAX_TEXT_CHARS + 10
    assert s.since(5, 0) is None  # what came after char 5 is partly gone
    assert s.since(s.total - 3, 0) == "yyy"


def test_jobs_by_recency_puts_running_then_queued_oldest_first_then_finished_newest_first() -> None:
    m = Mirror()
    for j in (job(1, "succeeded", finished=10), job(2, "queued"), job(3, "running"), job(4, "queued"),
              job(5, "failed", finished=20)):
        m.jobs[j.id] = j
    assert [j.id for j in State(m).jobs_by_recency()] == [3, 2, 4, 5, 1]


def test_live_stream_of_job_is_the_page_still_being_decoded() -> None:
    st = State(Mirror())
    st.add_text(TextDelta(key="9:1", text="one", job_id=9, page_no=1, final=True))
    st.add_text(TextDelta(key="9:2", text="two", job_id=9, page_no=2))
    st.add_text(TextDelta(key="8:5", text="other job", job_id=8, page_no=5))
    live = st.live_stream_of_job(9)
    assert live is not None and live.page_no == 2


def test_history_merges_fetched_lines_with_newer_event_lines_once() -> None:
    st = State(Mirror())
    fetched = [HistoryEntry(seq=1, ts=1, what="queued"), HistoryEntry(seq=4, ts=2, what="started")]
    st.add_history(3, HistoryEntry(seq=4, ts=2, what="started"))
    st.add_history(3, HistoryEntry(seq=9, ts=3, what="page 1 done"))
    assert [h.what for h in st.merged_history(3, fetched)] == ["queued", "started", "page 1 done"]


def test_changes_merge_and_truthiness() -> None:
    a = Changes(jobs={1})
    a.merge(Changes(text={"1:1"}, engine=True, events=3))
    assert a.jobs == {1} and a.text == {"1:1"} and a.engine and a.events == 3
    assert not Changes(events=5)  # counting alone is no reason to redraw


def test_fmt_num_is_short_for_losses_and_learning_rates() -> None:
    assert fmt_num(0.8123) == "0.812"
    assert fmt_num(2e-4) == "2.0e-04"
    assert fmt_num(1234) == "1234"
    assert fmt_num(0) == "0"


class ChartApp(App[None]):
    def compose(self) -> ComposeResult:
        yield LineChart(id="c")


async def test_chart_draws_each_series_in_its_colour_with_axis_labels() -> None:
    app = ChartApp()
    async with app.run_test(size=(60, 12)) as pilot:
        chart = app.query_one(LineChart)
        chart.set_series([Series([(0, 1.0), (10, 2.0)], "red"), Series([(0, 2.0), (10, 1.0)], "blue")])
        await pilot.pause()
        lines = [chart.render_line(y) for y in range(chart.size.height)]
        text = "\n".join(line.text for line in lines)
        assert "2.04" in text.splitlines()[0]  # the top label (max plus a little headroom)
        assert "10" in text.splitlines()[-1] and "0" in text.splitlines()[-1]
        colours = {seg.style.color.name for line in lines for seg in line if seg.style and seg.style.color}
        assert {"red", "blue"} <= colours
        assert any(0x2800 < ord(ch) <= 0x28FF for ch in text)  # braille dots were drawn


async def test_chart_without_points_says_so() -> None:
    app = ChartApp()
    async with app.run_test(size=(60, 12)) as pilot:
        chart = app.query_one(LineChart)
        chart.set_series([], empty="no loss points yet")
        await pilot.pause()
        assert any("no loss points yet" in chart.render_line(y).text for y in range(chart.size.height))


class ScrollApp(App[None]):
    def compose(self) -> ComposeResult:
        from textual.widgets import Static

        from tui.widgets.follow_scroll import FollowScroll

        with FollowScroll(id="s"):
            yield Static("line\n" * 3, id="body")


async def test_follow_scroll_keeps_the_end_in_view_until_the_reader_scrolls_up() -> None:
    from textual.widgets import Static

    app = ScrollApp()
    async with app.run_test(size=(40, 10)) as pilot:
        scroll = app.query_one("#s")
        body = app.query_one("#body", Static)
        assert scroll.scroll_y == 0  # short content starts at the top
        body.update("line\n" * 30)
        await pilot.pause()
        await pilot.pause()
        assert scroll.scroll_y == scroll.max_scroll_y > 0
        scroll.scroll_to(y=0, animate=False, immediate=True)
        body.update("line\n" * 60)
        await pilot.pause()
        await pilot.pause()
        assert scroll.scroll_y == 0  # the reader scrolled up: left where they are
