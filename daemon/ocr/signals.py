"""Per-page quality signals for the sidecar: what says, without any truth, that a page is probably wrong.

Everything here was computed during the conversion already (method, ladder attempts, the detail of a fallback)
or is cheap: the text layer of a page OCR'd anyway (no rendering). The signals, per page of ``<name>.json``:

- ``text_layer_cer``: where the page has a usable text layer but was read by a VLM, the character
  error rate of the output against that layer, with the scorer's normalisation (daemon/ocr/scoring.py). A
  born-digital page read badly shows here; ``null`` where there is no layer to compare or the layer is what
  was written.
- ``attempts`` / ``aborted_attempts``: the VLM ladder: attempts sent, and how many of them were stopped (a
  repetition or max_tokens); 1 / 0 for engines without a ladder.
- ``fallback``: the page came from a lesser path (``method == "fallback"``).
- ``empty``: the page came out with no text.
- ``risk``: one number to sort a day's outbox by (`ftctl ocr-review`): a failed or empty page 1, plus 0.5 for a
  fallback, 0.2 per aborted attempt, plus ``text_layer_cer``. Pages at 0 gave no reason for doubt.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from rapidfuzz.distance import Levenshtein

from daemon.core.store import Store
from daemon.ocr.errors import OcrError
from daemon.ocr.pdfworker import PdfWorkerPool
from daemon.ocr.scoring import plain_text
from shared.protocol import PageInfo

log = logging.getLogger(__name__)

FAILED_RISK = 1.0
EMPTY_RISK = 1.0
FALLBACK_RISK = 0.5
ABORT_RISK = 0.2
# a text layer this much longer than the OCR output is compared on its first part only: the distance is
# quadratic in the worst case, and a page's signal needs no more
MAX_COMPARED_CHARS = 20_000


def text_layer_cer(text_layer: str, output_md: str) -> float | None:
    """CER of a page's output against its own text layer (None when the layer is empty)."""
    layer = plain_text(text_layer)[:MAX_COMPARED_CHARS]
    if not layer:
        return None
    out = plain_text(output_md)[:MAX_COMPARED_CHARS]
    return Levenshtein.distance(layer, out) / len(layer)


def page_signals(page: PageInfo, output_md: str, text_layer: str | None) -> dict[str, Any]:
    """The signals of one page; ``text_layer``: its usable text layer, None when it has none or was not read."""
    attempts = int(page.timings.get("attempts", 1) or 1)
    fallback = page.method == "fallback"
    aborted = attempts - (0 if fallback else 1) if "attempts" in page.timings else 0
    failed = page.state != "done"
    empty = not failed and not output_md.strip()
    cer = text_layer_cer(text_layer, output_md) if text_layer is not None and not failed else None
    risk = ((FAILED_RISK if failed else 0.0) + (EMPTY_RISK if empty else 0.0) + (FALLBACK_RISK if fallback else 0.0)
            + ABORT_RISK * max(0, aborted) + (cer or 0.0))
    return {"text_layer_cer": None if cer is None else round(cer, 4), "attempts": attempts,
            "aborted_attempts": max(0, aborted), "fallback": fallback, "empty": empty, "risk": round(risk, 4)}


def checks_layer(page: PageInfo) -> bool:
    """Whether a page's signals compare it with its text layer: the cpu engine OCRs only pages whose layer is
    unusable, so only a page a VLM read can have a usable layer to check."""
    return page.state == "done" and page.method == "vlm"


async def collect(pool: PdfWorkerPool, store: Store, job_id: int, pdf: Path, password: str | None,
                  timeout: float, known: dict[int, dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """Signals of every stored page (1-based) of a conversion. ``known``: those computed as their pages were
    converted in this run (the layer came with the rendering); the others (done in an earlier run) read the
    text layer again, only for pages a VLM wrote; a page whose layer cannot be read goes without that signal."""
    found: dict[int, dict[str, Any]] = {}
    for p in store.pages(job_id):
        if p.state == "done" and p.page_no in known:
            found[p.page_no] = known[p.page_no]
            continue
        layer: str | None = None
        text = store.page_text(job_id, p.page_no)[1] if p.state == "done" else ""
        if checks_layer(p):
            try:
                r = await pool.page_text(pdf, p.page_no - 1, password, timeout=timeout)
            except OcrError as exc:
                log.info("page %d of %s: no text layer for its signals (%s)", p.page_no, pdf.name, exc.message)
            else:
                layer = r.text if r.text_usable else None
        found[p.page_no] = page_signals(p, text, layer)
    return found
