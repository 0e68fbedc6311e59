"""ftui's OCR scores screen against a real ftmllmd: two ocr_eval runs of the cpu engine compared in the chart and
the metric table, and the worst page opened as truth and output side by side."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from shared.protocol import OcrEvalResult, OcrEvalResultReply
from tests.daemon_proc import ROOT, DaemonProc
from tests.fixtures import pdfs
from tests.tui.conftest import wait_until
from tests.tui.test_live_daemon import connected, make_app
from tui.screens.ocr_eval import DiffScreen, OcrEvalScreen, WorstPages
from tui.widgets.chart import LineChart


def truth(pages: int, wrong_word: str = "") -> str:
    """What numbered() writes; with ``wrong_word``, the last page's word is replaced (a truth the engine
    cannot match there)."""
    out = []
    for k in range(1, pages + 1):
        word = wrong_word if wrong_word and k == pages else pdfs.page_word(k)
        out.append(f"<!-- page {k} -->\n\nPage {k} of {pages}\n\nThis is the body of page {k}; its word is {word}.\n")
    return "\n".join(out)


def ocr_eval(daemon: DaemonProc, folder: Path) -> int:
    r = subprocess.run([sys.executable, "-m", "tui.ftctl", "--home", str(daemon.home), "--timeout", "60",
                        "ocr-eval", str(folder), "--engine", "cpu", "--wait", "--json"],
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr + daemon.log_text()[-2000:]
    return int(json.loads(r.stdout)["job_id"])


async def test_scores_screen_compares_runs_and_opens_the_worst_page_as_a_diff(daemon: DaemonProc,
                                                                             tmp_path: Path) -> None:
    right, wrong = tmp_path / "right", tmp_path / "wrong"
    for folder, text in ((right, truth(2)), (wrong, truth(2, wrong_word="Zanzibarian"))):
        pdfs.numbered(folder / "doc.pdf", 2)
        (folder / "doc.md").write_text(text, encoding="utf-8")
    good, bad = ocr_eval(daemon, right), ocr_eval(daemon, wrong)
    bad_scores = daemon.client().call(OcrEvalResult(job_id=bad), OcrEvalResultReply)
    assert bad_scores.pages[1]["cer"] > bad_scores.pages[0]["cer"]

    app = make_app(daemon.paths, start_mode="ocr")
    async with app.run_test(size=(140, 44)) as pilot:
        await wait_until(pilot, lambda: connected(app), "ftui to load the daemon's snapshot")
        await pilot.press("e")
        await wait_until(pilot, lambda: isinstance(app.screen, OcrEvalScreen), "the scores screen")
        screen = app.screen
        assert isinstance(screen, OcrEvalScreen)
        await wait_until(pilot, lambda: {good, bad} <= set(screen.results), "both runs' scores")
        await wait_until(pilot, lambda: len(screen.query_one(LineChart).series) == 2, "two runs in the chart")
        table = str(screen.query_one("#eval-table").render())
        assert f"job {good}: cpu" in table and f"job {bad}: cpu" in table
        cer_row = next(line for line in table.splitlines() if line.startswith("CER %")).split()
        assert f"{bad_scores.totals['cer'] * 100:.2f}" in cer_row
        # the newest run is highlighted: its pages worst first
        pages = screen.query_one(WorstPages)
        await wait_until(pilot, lambda: screen.job_id == bad and pages.order == [2, 1], "the bad run's pages")
        pages.focus()
        await pilot.press("enter")
        await wait_until(pilot, lambda: isinstance(app.screen, DiffScreen), "the side-by-side diff")
        diff = app.screen
        left, right_side = str(diff.query_one("#diff-truth").render()), str(diff.query_one("#diff-output").render())
        assert "Zanzibarian" in left and "Zanzibarian" not in right_side
        assert pdfs.page_word(2) in right_side
        await pilot.press("escape")
        await wait_until(pilot, lambda: isinstance(app.screen, OcrEvalScreen), "back on the scores screen")
