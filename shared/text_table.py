"""A plain-text table with aligned columns, for the metric tables that ftctl prints and ftui shows (eval jobs'
BLEU/ROUGE, ocr_eval runs' CER/WER). Hand-written: a dozen lines, where Rich's tables would put a console and its
start-up into the daemon, which builds one of these tables itself."""

from __future__ import annotations

from collections.abc import Sequence


def text_table(rows: Sequence[Sequence[str]]) -> str:
    """``rows[0]`` is the header, ruled off below; the first column is left-aligned, the others right-aligned."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for n, row in enumerate(rows):
        cells = [row[0].ljust(widths[0]), *(cell.rjust(w) for cell, w in zip(row[1:], widths[1:], strict=True))]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
