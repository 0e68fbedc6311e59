"""How close is a converted page to its truth? Character/word error rate, headings, table cells, reading order.

Truth and output are Markdown in the outbox's form: pages start with a ``<!-- page N -->`` line (see
``daemon/ocr/kind.py``, which writes them; a failed page is ``<!-- page N: failed: reason -->``).

Normalisation (the same for truth and output):

- Unicode NFKC (full-width forms, ligatures such as "ﬁ" become their plain letters), HTML comments removed.
- For CER and WER, Markdown markup is stripped first: heading marks (``#``), list bullets and numbers
  (``-``, ``*``, ``+``, ``•``, ``1.``), block quotes (``>``), emphasis and code marks (``*``, ``__``, `````),
  links and images keep only their text, ``<br>`` (pymupdf4llm's line break in a table cell) is a space, table
  pipes become spaces and separator rows (``|---|``) disappear. Then all
  whitespace, line breaks included, collapses to one space, so a paragraph written as one line in the truth and
  as five lines by the engine compares equal; a space between two CJK characters (a line break inside a
  Chinese sentence) is dropped, since those scripts use none. Case and punctuation are kept: they are part of
  what was read.
- Heading and table metrics read the markup (``#`` lines, pipe tables) and compare the text inside it with the
  same normalisation, case-folded.

Metrics of one page (``PageScore``):

- ``cer``: Levenshtein distance between the normalised texts / truth characters (can exceed 1 when the output
  adds much text). ``wer``: the same over words; a CJK ideograph or kana counts as one word, since those scripts
  do not separate words with spaces.
- ``heading_recall``: share of truth headings (any level) that appear as a heading in the output with nearly
  the same text (rapidfuzz ratio >= 90); ``None`` when the truth has no heading.
- ``table_f1``: F1 of the multiset of non-empty table cells (pipe tables parsed to cells) of output against
  truth; ``None`` when the truth has no table. Output that reads a table as plain lines scores 0.
- ``reading_order``: the truth's blocks (paragraphs, headings, list items, table rows; at least 8 characters)
  are located in the output text (rapidfuzz partial-ratio alignment, score >= 80); the order in which they
  are found is compared with the truth order as a normalised Kendall tau (1 = same order, 0 = reversed).
  ``None`` when fewer than two blocks are found. Missing blocks do not count here: CER covers them.

Documents (``score_document``) are scored page by page; totals are weighted by truth length (summed edit
counts over summed truth counts), so a short page does not weigh as much as a full one. Distances come from
rapidfuzz, not from code here.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field

from rapidfuzz import fuzz
from rapidfuzz.distance import Levenshtein

HEADING_MATCH = 90.0  # rapidfuzz ratio (0..100) for an output heading to count as the truth heading
BLOCK_MATCH = 80.0  # partial-ratio score for a truth block to count as found in the output
BLOCK_MIN_CHARS = 8  # shorter blocks ("1", "Total") are found anywhere: they say nothing about order

PAGE_MARK = re.compile(r"^<!--\s*page\s+(\d+)\s*(?::[^\n]*?)?-->[ \t]*$", re.MULTILINE)
_COMMENT = re.compile(r"<!--.*?-->", re.DOTALL)
_HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
_LIST = re.compile(r"^\s*(?:[-*+•◦▪·]|\d{1,3}[.)])\s+")
_QUOTE = re.compile(r"^\s*>\s?")
_IMAGE = re.compile(r"!\[([^\]]*)\]\([^)]*\)")
_LINK = re.compile(r"\[([^\]]*)\]\([^)]*\)")
_EMPH = re.compile(r"(\*{1,3}|_{2,3}|`+|~~)")
_BR = re.compile(r"<br\s*/?>", re.IGNORECASE)
_SEP_CELL = re.compile(r"^:?-{1,}:?$")
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff"
_WORD = re.compile(rf"[{_CJK}]|[^\s{_CJK}]+")
_WS = re.compile(r"\s+")
_CJK_GAP = re.compile(rf"(?<=[{_CJK}\u3000-\u303f\uff00-\uffef]) (?=[{_CJK}\u3000-\u303f\uff00-\uffef])")


@dataclass(frozen=True)
class PageScore:
    cer: float
    wer: float
    heading_recall: float | None
    table_f1: float | None
    reading_order: float | None
    truth_chars: int  # normalised, the CER denominator
    output_chars: int
    char_edits: int
    truth_words: int
    word_edits: int
    headings_truth: int = 0
    headings_found: int = 0
    cells_truth: int = 0
    cells_output: int = 0
    cells_matched: int = 0
    blocks_found: int = 0  # truth blocks located in the output (reading-order sample size)


@dataclass(frozen=True)
class DocScore:
    pages: dict[int, PageScore]
    cer: float
    wer: float
    heading_recall: float | None
    table_f1: float | None
    reading_order: float | None
    truth_chars: int
    char_edits: int
    missing_pages: list[int] = field(default_factory=list)  # in the truth, absent from the output (scored as empty)
    extra_pages: list[int] = field(default_factory=list)  # in the output only: not scored


# ------------------------------------------------------------------------------------------- normalising

def _nfkc(text: str) -> str:
    return unicodedata.normalize("NFKC", _COMMENT.sub("", text))


def _is_table_line(line: str) -> bool:
    s = line.strip()
    return s.startswith("|") or (s.count("|") >= 2 and not s.startswith("#"))


def _cells(line: str) -> list[str]:
    s = line.strip()
    if s.startswith("|"):
        s = s[1:]
    if s.endswith("|") and not s.endswith("\\|"):
        s = s[:-1]
    return [c.strip() for c in re.split(r"(?<!\\)\|", s)]


def _is_separator(line: str) -> bool:
    cells = [c for c in _cells(line) if c]
    return bool(cells) and all(_SEP_CELL.match(c) for c in cells)


def _inline(text: str) -> str:
    text = _BR.sub(" ", _IMAGE.sub(r"\1", text))
    text = _LINK.sub(r"\1", text)
    return _EMPH.sub("", text).replace("\\|", "|")


def _plain_line(line: str) -> str | None:
    """One source line with its markup stripped; ``None`` for a table separator row."""
    if _is_table_line(line):
        if _is_separator(line):
            return None
        return " ".join(_inline(c) for c in _cells(line))
    m = _HEADING.match(line)
    return _inline(m.group(2) if m else _LIST.sub("", _QUOTE.sub("", line)))


def plain_lines(md: str) -> list[str]:
    """The page's text lines with Markdown markup stripped (not yet whitespace-collapsed)."""
    return [p for p in map(_plain_line, _nfkc(md).splitlines()) if p is not None]


def plain_text(md: str) -> str:
    """What CER and WER compare: markup stripped, whitespace collapsed to single spaces."""
    return _CJK_GAP.sub("", _WS.sub(" ", " ".join(plain_lines(md))).strip())


def words(text: str) -> list[str]:
    return _WORD.findall(text)


def _key(text: str) -> str:
    return _WS.sub(" ", _inline(text)).strip().casefold()


def headings(md: str) -> list[str]:
    """Heading texts (any level), normalised and case-folded."""
    found = []
    for line in _nfkc(md).splitlines():
        m = _HEADING.match(line)
        if m and m.group(2).strip():
            found.append(_key(m.group(2)))
    return found


def table_cells(md: str) -> list[list[list[str]]]:
    """Pipe tables as lists of rows of normalised cells. A table is a run of pipe lines with a separator row."""
    tables: list[list[list[str]]] = []
    run: list[str] = []

    def flush() -> None:
        if len(run) >= 2 and any(_is_separator(line) for line in run):
            tables.append([[_key(c) for c in _cells(line)] for line in run if not _is_separator(line)])
        run.clear()

    for line in _nfkc(md).splitlines():
        if _is_table_line(line):
            run.append(line)
        else:
            flush()
    flush()
    return tables


def _blocks(md: str) -> list[str]:
    """Units whose order reading-order compares: paragraphs, headings, list items, table rows."""
    blocks: list[str] = []
    para: list[str] = []

    def flush() -> None:
        text = _WS.sub(" ", " ".join(para)).strip()
        if len(text) >= BLOCK_MIN_CHARS:
            blocks.append(text)
        para.clear()

    for raw in _nfkc(md).splitlines():
        plain = _plain_line(raw)
        if plain is None or not raw.strip():
            flush()
        elif _HEADING.match(raw) or _LIST.match(raw) or _is_table_line(raw):
            flush()
            para.append(plain)
            flush()
        else:
            para.append(plain)
    flush()
    return blocks


# ------------------------------------------------------------------------------------------- metrics

def _kendall_agreement(positions: list[int]) -> float:
    n = len(positions)
    pairs = n * (n - 1) // 2
    discordant = sum(1 for i in range(n) for j in range(i + 1, n) if positions[i] > positions[j])
    return 1.0 - discordant / pairs


def _reading_order(truth_md: str, output_plain: str) -> tuple[float | None, int]:
    if not output_plain:
        return None, 0
    positions: list[int] = []
    for block in _blocks(truth_md):
        if len(block) > len(output_plain):
            continue
        al = fuzz.partial_ratio_alignment(block, output_plain, score_cutoff=BLOCK_MATCH)
        if al is not None:
            positions.append(al.dest_start)
    if len(positions) < 2:
        return None, len(positions)
    return _kendall_agreement(positions), len(positions)


def _rate(edits: int, total: int, produced: int) -> float:
    if total:
        return edits / total
    return 0.0 if not produced else 1.0


def score_page(truth_md: str, output_md: str) -> PageScore:
    """Score one page's output Markdown against its truth Markdown (see the module docstring for the rules)."""
    t_plain, o_plain = plain_text(truth_md), plain_text(output_md)
    char_edits = Levenshtein.distance(t_plain, o_plain)
    t_words, o_words = words(t_plain), words(o_plain)
    word_edits = Levenshtein.distance(t_words, o_words)

    t_heads, o_heads = headings(truth_md), headings(output_md)
    found = 0
    pool = list(o_heads)
    for h in t_heads:
        best = max(range(len(pool)), key=lambda i: fuzz.ratio(h, pool[i]), default=None)
        if best is not None and fuzz.ratio(h, pool[best]) >= HEADING_MATCH:
            found += 1
            pool.pop(best)
    heading_recall = found / len(t_heads) if t_heads else None

    t_cells = Counter(c for t in table_cells(truth_md) for row in t for c in row if c)
    o_cells = Counter(c for t in table_cells(output_md) for row in t for c in row if c)
    matched = sum((t_cells & o_cells).values())
    n_t, n_o = sum(t_cells.values()), sum(o_cells.values())
    table_f1 = _f1(matched, n_t, n_o) if n_t else None

    order, blocks_found = _reading_order(truth_md, o_plain)
    return PageScore(
        cer=_rate(char_edits, len(t_plain), len(o_plain)), wer=_rate(word_edits, len(t_words), len(o_words)),
        heading_recall=heading_recall, table_f1=table_f1, reading_order=order,
        truth_chars=len(t_plain), output_chars=len(o_plain), char_edits=char_edits,
        truth_words=len(t_words), word_edits=word_edits, headings_truth=len(t_heads), headings_found=found,
        cells_truth=n_t, cells_output=n_o, cells_matched=matched, blocks_found=blocks_found)


def _f1(matched: int, n_truth: int, n_output: int) -> float:
    if not matched:
        return 0.0
    precision, recall = matched / n_output, matched / n_truth
    return 2 * precision * recall / (precision + recall)


# ------------------------------------------------------------------------------------------- documents

def split_pages(md: str) -> dict[int, str]:
    """Page number → that page's Markdown, on the outbox's ``<!-- page N -->`` lines (failed-page markers too).

    Text without any marker is page 1. Text before the first marker is page 0 when it is not blank.
    """
    marks = list(PAGE_MARK.finditer(md))
    if not marks:
        return {1: md} if md.strip() else {}
    pages: dict[int, str] = {}
    head = md[:marks[0].start()]
    if head.strip():
        pages[0] = head
    for i, m in enumerate(marks):
        end = marks[i + 1].start() if i + 1 < len(marks) else len(md)
        n = int(m.group(1))
        pages[n] = pages.get(n, "") + md[m.end():end]
    return pages


def score_document(truth_md: str, output_md: str) -> DocScore:
    """Score every truth page; a truth page absent from the output is scored against empty output."""
    truth, output = split_pages(truth_md), split_pages(output_md)
    pages = {n: score_page(t, output.get(n, "")) for n, t in sorted(truth.items())}
    return aggregate(pages, missing=[n for n in truth if n not in output],
                     extra=sorted(n for n in output if n not in truth))


def aggregate(pages: dict[int, PageScore], missing: list[int] | None = None,
              extra: list[int] | None = None) -> DocScore:
    """Totals over pages (of one document or many), weighted by truth length."""
    ps = list(pages.values())
    t_chars = sum(p.truth_chars for p in ps)
    o_chars = sum(p.output_chars for p in ps)
    c_edits = sum(p.char_edits for p in ps)
    t_words = sum(p.truth_words for p in ps)
    w_edits = sum(p.word_edits for p in ps)
    h_t = sum(p.headings_truth for p in ps)
    n_t = sum(p.cells_truth for p in ps)
    with_table = [p for p in ps if p.table_f1 is not None]
    ordered = [p for p in ps if p.reading_order is not None]
    weight = sum(p.truth_chars for p in ordered)
    return DocScore(
        pages=pages,
        cer=_rate(c_edits, t_chars, o_chars),
        wer=_rate(w_edits, t_words, sum(1 for p in ps if p.output_chars)),
        heading_recall=sum(p.headings_found for p in ps) / h_t if h_t else None,
        table_f1=_f1(sum(p.cells_matched for p in with_table), n_t,
                     sum(p.cells_output for p in with_table)) if n_t else None,
        reading_order=(sum(p.reading_order * p.truth_chars for p in ordered if p.reading_order is not None) / weight
                       if weight else None),
        truth_chars=t_chars, char_edits=c_edits, missing_pages=sorted(missing or []), extra_pages=extra or [])
