"""The metric table of OCR scoring runs (`ftctl ocr-compare`, ftui's scores screen): one row per metric, one
column per ``ocr_eval`` run. Plain text, no Textual: ftctl prints it as it is."""

from __future__ import annotations

from collections.abc import Sequence

from shared.protocol import OcrEvalResultReply
from shared.text_table import text_table

# (row label, key in the totals, format): fractions shown as percent, agreement scores as 0..1
METRICS = (
    ("CER %", "cer", "{:.2f}", 100.0),
    ("WER %", "wer", "{:.2f}", 100.0),
    ("heading recall", "heading_recall", "{:.3f}", 1.0),
    ("table-cell F1", "table_f1", "{:.3f}", 1.0),
    ("reading order", "reading_order", "{:.3f}", 1.0),
)


def compare_table(runs: Sequence[OcrEvalResultReply]) -> str:
    """Plain text: metric rows × runs, '-' where a run has no such content (no table in the truth)."""
    header = ["metric", *(r.title for r in runs)]
    rows = [header, ["pages", *(str(len(r.pages)) for r in runs)]]
    for label, key, fmt, scale in METRICS:
        cells = []
        for r in runs:
            v = r.totals.get(key)
            cells.append("-" if v is None else fmt.format(v * scale))
        rows.append([label, *cells])
    return text_table(rows)
