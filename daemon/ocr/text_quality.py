"""Is a page's PDF text layer good enough to convert, or must the page be OCR'd?

Pure functions: the worker measures the page (text, how much of it images cover) and calls these.
Thresholds were chosen on the generated fixtures and the pdf.js corpus (scans, CJK, fuzzed files): a text
layer is usable when it has some substance and is mostly real characters. Fonts without a ToUnicode map
yield U+FFFD or private-use code points; those pages go to OCR.
"""

from __future__ import annotations

import re
import unicodedata

MIN_CHARS = 16  # fewer visible characters than this: a page number or a stamp, not the page's content
MIN_SCORE = 0.9  # fraction of visible characters that are real text
SCAN_COVERAGE = 0.6  # images cover this much of the page ...
SCAN_MIN_CHARS = 200  # ... and the text layer is this thin: a scan with a header line, OCR it
NO_IMAGES = 0.05  # image coverage below this: no picture that could hold text

_SURROGATE = re.compile("[\ud800-\udfff]")


def clean_text(text: str) -> str:
    """Text safe to encode as UTF-8: UTF-16 surrogate pairs joined, lone surrogates replaced by U+FFFD.

    MuPDF hands out warning strings and, for broken fonts, text with lone surrogates; encoding those raises
    far away from where they came from (in a JSON event or a file write).
    """
    if not _SURROGATE.search(text):
        return text
    return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


def _is_bad(ch: str) -> bool:
    if ch == "\ufffd":
        return True
    cat = unicodedata.category(ch)
    # Co: private use (glyph names without Unicode), Cc: control codes, Cs: surrogates, Cn: unassigned.
    return cat in ("Co", "Cc", "Cs", "Cn")


def text_score(text: str) -> tuple[int, float]:
    """(visible character count, fraction of them that are real characters)."""
    visible = [ch for ch in text if not ch.isspace()]
    if not visible:
        return 0, 0.0
    bad = sum(1 for ch in visible if _is_bad(ch))
    return len(visible), 1.0 - bad / len(visible)


def text_layer_usable(text: str, image_coverage: float, has_annotations: bool = False) -> tuple[bool, float]:
    """(usable, score) for a page whose text layer is ``text`` and whose area is ``image_coverage`` images.

    ``has_annotations``: the page has form fields or annotations, whose visible text is not in the text layer.
    """
    chars, score = text_score(text)
    if score < MIN_SCORE:
        return False, score
    if chars < MIN_CHARS:
        # A short text with nothing else on the page ("Hello world") is all there is: OCR would add nothing.
        return chars > 0 and image_coverage < NO_IMAGES and not has_annotations, score
    if image_coverage >= SCAN_COVERAGE and chars < SCAN_MIN_CHARS:
        return False, score
    return True, score
