"""The runaway guard against a real vLLM: the tiny random-weight model loops at temperature 0 ("7777…",
" one an%%%…") and produces noise up to max_tokens at any temperature above; nothing stops it but the guard,
the ladder and the text-layer fallback.

How the aborts show: vLLM 0.32 aborts a request whose client closed the stream ("Request … aborted." in its
log with --enable-log-requests) but does not count such aborts in
vllm:request_success_total{finished_reason="abort"} (only engine-side aborts reach that counter: the output
processor drops a client abort before its statistics). So the test counts them where they do show: in
vLLM's log, and as requests missing from request_success_total.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.protocol import TextDelta
from tests.fixtures import pdfs
from tests.ocr.submit import fetch, submit_ocr
from tests.vllm.conftest import VllmDaemon, finished_total, follow, start_vllm_daemon

pytestmark = pytest.mark.vllm

LADDER = (0.1, 0.1, 0.2, 0.3, 0.5, 0.8)
FINISH_REASONS = ("stop", "length", "abort", "error", "repetition")


@pytest.fixture(scope="module")
def vd() -> Iterator[VllmDaemon]:
    # max_tokens just above what the guard needs to see a loop (320 characters, one per token here)
    d = start_vllm_daemon(max_tokens=340, max_pixels=200_000, max_in_flight=8,
                          extra_args=["--enforce-eager", "--skip-mm-profiling", "--enable-log-requests",
                                      "--max-log-len", "16"])
    try:
        yield d
    finally:
        d.proc.close()


def test_repetition_guard_aborts_the_loop_then_the_ladder_then_the_text_layer(vd: VllmDaemon) -> None:
    work = Path(tempfile.mkdtemp(prefix="ftr", dir="/tmp"))
    try:
        pages = 2
        pdf = pdfs.numbered(work / "loops.pdf", pages)
        before = vd.metrics()
        finished_before = sum(finished_total(before, r) for r in FINISH_REASONS)
        log_before = vd.vllm_log.read_text(errors="replace")
        c = vd.proc.client(timeout=60)
        trace = follow(c, lambda: submit_ocr(c, pdf).job, 900)
        assert trace.job is not None and trace.job.state == "succeeded", f"{trace.job}\n{vd.logs()}"
        fetch(c, trace.job.id, work)
        side = json.loads((work / "loops.json").read_text())
        md = (work / "loops.md").read_text()
        for k, page in enumerate(side["page_results"], start=1):
            assert page["method"] == "fallback", page
            detail = page["detail"]
            assert f"{1 + len(LADDER)} attempts failed" in detail, detail
            assert "temperature 0: repeated" in detail, detail  # the guard caught the greedy loop
            for t in sorted(set(LADDER)):
                assert f"temperature {t:g}:" in detail, detail
            assert "used the page's text layer" in detail
            assert page["timings"]["attempts"] == 1 + len(LADDER)
            assert pdfs.page_word(k) in md
        # each page was started over in the preview once per retry, and ended with its text layer
        resets = [d for d in trace.deltas() if d.reset]
        assert len(resets) >= pages * len(LADDER), len(resets)
        for n in range(1, pages + 1):
            assert pdfs.page_word(n) in last_text(trace.deltas(), n)
        # the guard closed the looping streams and vLLM aborted those requests: they are in its log, and they
        # are the requests that never finished (every other attempt ran to max_tokens: "length")
        aborted = len(re.findall(r"Request \S+ aborted\.", vd.vllm_log.read_text(errors="replace")[len(log_before):]))
        loops = sum(page["detail"].count(": repeated ") for page in side["page_results"])
        assert aborted == loops >= pages, (aborted, loops)
        after = vd.metrics()
        finished = sum(finished_total(after, r) for r in FINISH_REASONS) - finished_before
        assert finished == pages * (1 + len(LADDER)) - aborted, (finished, aborted)
        assert finished_total(after, "length") - finished_total(before, "length") == finished
    finally:
        shutil.rmtree(work, ignore_errors=True)


def last_text(deltas: list[TextDelta], page_no: int) -> str:
    """The preview of a page as a client shows it: text since the last reset."""
    text = ""
    for d in deltas:
        if d.page_no == page_no:
            text = d.text if d.reset else text + d.text
    return text
