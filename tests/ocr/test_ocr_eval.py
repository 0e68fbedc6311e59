"""`ftctl ocr-eval`, `ocr-compare` and `ocr-review` against a real daemon converting with the cpu engine.

The stored scores must be the scorer's (daemon/ocr/scoring.py) on the very output the engine wrote: each page's
metrics and the totals are recomputed here from the truth and output the daemon sends back.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pymupdf
import pytest

from daemon.ocr.scoring import aggregate, score_page
from daemon.ocr.signals import page_signals, text_layer_cer
from shared.client import Client, RemoteError
from shared.protocol import TERMINAL_STATES, JobDetail, OcrEvalResult, OcrEvalResultReply, PageInfo, ShowJob
from tests.daemon_proc import ROOT, DaemonProc, wait_for
from tests.fixtures import pdfs
from tests.ocr.submit import submit_ocr

METRICS = ("cer", "wer", "heading_recall", "table_f1", "reading_order")


def ftctl(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tui.ftctl", "--home", str(home), "--timeout", "60", *args],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)


def _table(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows[1:]])


BORN_TRUTH = f"""<!-- page 1 -->

# {pdfs.TITLE}

{pdfs.INTRO}

## {pdfs.SECTION_SALES}

{_table(pdfs.TABLE)}

## {pdfs.SECTION_CJK}

{pdfs.CJK_TEXT}

<!-- page 2 -->

## {pdfs.OUTLOOK}

{pdfs.OUTLOOK_TEXT}
"""

SCAN_TRUTH = f"""<!-- page 1 -->

# {pdfs.SCAN_TITLE}

{pdfs.SCAN_LINES[0]}

{pdfs.SCAN_LINES[1]}

{_table(pdfs.SCAN_TABLE)}

{pdfs.SCAN_CJK}
"""


@pytest.fixture(scope="module")
def served() -> Iterator[DaemonProc]:
    """One daemon for the module: its PDF workers (seconds to start) serve every test here."""
    d = DaemonProc().start()
    try:
        yield d
    finally:
        d.close()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ocreval")
    both, born = root / "both", root / "born"
    pdfs.born_digital(both / "report.pdf")
    (both / "report.md").write_text(BORN_TRUTH, encoding="utf-8")
    pdfs.scanned(both / "letter.pdf")
    (both / "letter.md").write_text(SCAN_TRUTH, encoding="utf-8")
    pdfs.numbered(both / "no-truth.pdf", 1)  # no .md beside it: not part of the evaluation
    pdfs.born_digital(born / "report.pdf")
    (born / "report.md").write_text(BORN_TRUTH, encoding="utf-8")
    return {"both": both, "born": born}


def _ended(c: Client, job_id: int) -> str:
    state = c.call(ShowJob(job_id=job_id), JobDetail).job.state
    return state if state in TERMINAL_STATES else ""


def _eval(served: DaemonProc, folder: Path) -> dict:
    r = ftctl(served.home, "ocr-eval", str(folder), "--engine", "cpu", "--wait", "--json")
    assert r.returncode == 0, r.stderr + served.log_text()[-3000:]
    return json.loads(r.stdout)


@pytest.fixture(scope="module")
def runs(served: DaemonProc, corpus: dict[str, Path]) -> tuple[dict, dict]:
    return _eval(served, corpus["both"]), _eval(served, corpus["born"])


def test_ocr_eval_stores_the_scorers_values_per_page_and_in_total(served: DaemonProc, runs: tuple[dict, dict]) -> None:
    result = runs[0]
    c = served.client(timeout=30)
    assert [(p["doc"], p["page"]) for p in result["pages"]] == [("letter.pdf", 1), ("report.pdf", 1),
                                                                ("report.pdf", 2)]
    recomputed = {}
    for p in result["pages"]:
        page = c.call(OcrEvalResult(job_id=result["job_id"], page=p["index"]), OcrEvalResultReply)
        assert page.output.strip(), f"{p['doc']} page {p['page']} came out empty"
        score = score_page(page.truth, page.output)
        recomputed[p["index"]] = score
        for key in (*METRICS, "truth_chars", "char_edits", "word_edits", "cells_matched"):
            assert p[key] == getattr(score, key), (p["doc"], p["page"], key)
    total = aggregate(recomputed)
    assert result["totals"] == {k: getattr(total, k) for k in METRICS}
    # what the engine gets right on these pages, so that a score of 0 everywhere cannot pass
    by_doc = {(p["doc"], p["page"]): p for p in result["pages"]}
    assert by_doc["report.pdf", 1]["cer"] < 0.05 and by_doc["report.pdf", 1]["table_f1"] > 0.9
    assert by_doc["report.pdf", 1]["method"] == "text_layer" and by_doc["letter.pdf", 1]["method"] == "ocr"
    assert total.cer < 0.05 and total.table_f1 is not None and total.table_f1 > 0.9


def test_ocr_compare_prints_both_runs_with_their_numbers(served: DaemonProc, runs: tuple[dict, dict]) -> None:
    first, second = runs
    r = ftctl(served.home, "ocr-compare", str(first["job_id"]), str(second["job_id"]))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert f"job {first['job_id']}: cpu" in lines[0] and f"job {second['job_id']}: cpu" in lines[0]
    cer_row = next(line for line in lines if line.startswith("CER %")).split()
    assert cer_row[2:] == [f"{first['totals']['cer'] * 100:.2f}", f"{second['totals']['cer'] * 100:.2f}"]
    assert "different pages" in r.stdout  # the runs scored different documents
    # the training side's compare command gives ocr_eval runs the same table
    assert ftctl(served.home, "eval-compare", str(first["job_id"]), str(second["job_id"])).stdout == r.stdout
    as_json = json.loads(ftctl(served.home, "ocr-compare", str(first["job_id"]), "--json").stdout)
    assert as_json == [{"job_id": first["job_id"], "title": f"job {first['job_id']}: cpu", "pages": 3,
                        "metrics": first["totals"]}]


def test_ocr_eval_refuses_a_folder_without_pairs_and_results_of_other_jobs(served: DaemonProc, tmp_path: Path) -> None:
    pdfs.numbered(tmp_path / "only.pdf", 1)
    r = ftctl(served.home, "ocr-eval", str(tmp_path))
    assert r.returncode == 2 and "no x.pdf with an x.md beside it" in r.stderr
    job = submit_ocr(served.client(), tmp_path / "only.pdf").job
    with pytest.raises(RemoteError) as exc:
        served.client().call(OcrEvalResult(job_id=job.id), OcrEvalResultReply)
    assert exc.value.code == "bad_request" and "only ocr_eval jobs" in exc.value.message


def test_ocr_review_lists_the_empty_page_first(served: DaemonProc, tmp_path: Path) -> None:
    doc = pymupdf.open()
    doc.new_page().insert_text((72, 72), "A page with words on it, and enough of them to be read.", fontsize=12)
    doc.new_page()  # nothing on it: it converts to no text
    doc.save(tmp_path / "half-empty.pdf")
    doc.close()
    c = served.client(timeout=30)
    for pdf in (pdfs.numbered(tmp_path / "fine.pdf", 2), tmp_path / "half-empty.pdf"):
        job = submit_ocr(c, pdf, force=True).job
        ended = wait_for(functools.partial(_ended, c, job.id), 120, f"OCR job {job.id} to end")
        assert ended == "succeeded", served.log_text()[-2000:]
    r = ftctl(served.home, "ocr-review", str(served.paths.outbox), "--json")
    assert r.returncode == 0, r.stderr
    listed = [(Path(p["markdown"]).name, p["page"]) for p in json.loads(r.stdout)]
    assert listed[0] == ("half-empty.md", 2)
    assert set(listed) >= {("fine.md", 1), ("fine.md", 2), ("half-empty.md", 1)}
    first = json.loads(r.stdout)[0]
    assert first["empty"] is True and first["risk"] == 1.0
    text = ftctl(served.home, "ocr-review", str(served.paths.outbox))
    assert text.stdout.splitlines()[1].split()[:3] == ["1.00", "half-empty.md", "2"]
    assert ftctl(served.home, "ocr-review", str(served.paths.outbox), "--since", "yesterday").returncode == 2


def test_signals_add_up_to_the_risk_a_page_is_sorted_by() -> None:
    done = PageInfo(job_id=1, page_no=1, state="done", method="vlm", timings={"attempts": 3.0})
    s = page_signals(done, "hello w0rld", "hello world")
    assert s["aborted_attempts"] == 2 and s["text_layer_cer"] == round(1 / 11, 4)
    assert s["risk"] == round(0.2 * 2 + 1 / 11, 4)
    fallback = PageInfo(job_id=1, page_no=2, state="done", method="fallback", timings={"attempts": 4.0})
    assert page_signals(fallback, "text", None) | {} == {"text_layer_cer": None, "attempts": 4,
                                                          "aborted_attempts": 4, "fallback": True, "empty": False,
                                                          "risk": round(0.5 + 4 * 0.2, 4)}
    assert page_signals(PageInfo(job_id=1, page_no=3, state="failed"), "", "words")["risk"] == 1.0
    assert text_layer_cer("", "anything") is None


def test_ocr_eval_scores_the_validation_documents_of_a_from_pages_dataset(served: DaemonProc,
                                                                         corpus: dict[str, Path]) -> None:
    r = ftctl(served.home, "dataset", "from-pages", "pages", str(corpus["both"]), "--val", "0.5")
    assert r.returncode == 0, r.stderr
    result = _eval(served, Path("pages"))  # a name, not a folder: the daemon's kept validation documents
    docs = {p["doc"] for p in result["pages"]}
    assert len(docs) == 1 and docs <= {"report.pdf", "letter.pdf"}  # one of the two documents, never both
    assert len(result["pages"]) == (2 if docs == {"report.pdf"} else 1)
    assert result["totals"]["cer"] < 0.05
    r = ftctl(served.home, "ocr-eval", "no-such-dataset", "--engine", "cpu")
    assert r.returncode == 2 and "no dataset 'no-such-dataset'" in r.stderr
