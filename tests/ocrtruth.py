"""A generated ground-truth corpus for OCR quality: born-digital PDFs made from known Markdown, and scans of them.

Each document is written as ``NAME.pdf`` beside ``NAME.md``, its truth in the outbox's form (``<!-- page N -->``
before each page, as ``daemon/ocr/kind.py`` writes it), so a folder of them is what a user keeps: PDFs with
their corrected Markdown. The content covers headings, paragraphs, lists, pipe tables, two columns and CJK
(PyMuPDF's HTML renderer falls back to the CJK font shipped inside the pymupdf wheel, so no system font is
needed). Scans are the born-digital pages rasterised in grey at a given dpi and put back as image-only pages:
clean, or with seeded sensor noise, a little blur and a small skew.

    from tests.ocrtruth import build_corpus
    dirs = build_corpus(tmp_path)            # {"born": dir, "scan100": dir, ..., "noisy200": dir}

Used by tests/ocr/test_scan_quality.py and bench/ocr_quality.py (which puts the repository on sys.path).
Truth text is what a reader sees; list bullets are rendered as "•" and written as "- " in the truth.
"""

from __future__ import annotations

import html
import io
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pymupdf
from PIL import Image, ImageFilter

A4 = pymupdf.paper_rect("a4")
MARGIN = 64
GUTTER = 24
SCAN_DPIS = (100, 144, 200)
NOISE_SIGMA = 14.0  # grey levels (0..255) of Gaussian sensor noise on noisy scans
SKEW_DEG = 0.8  # noisy scans are rotated this much (sign alternates by page)
BLUR_RADIUS = 0.6

_CSS = """
body { font-family: sans-serif; font-size: 11pt; }
h1 { font-size: 20pt; } h2 { font-size: 14pt; }
table { border-collapse: collapse; }
td, th { border: 1px solid black; padding: 3px 8px; }
"""


@dataclass(frozen=True)
class Columns:
    """A page region set in two columns (read left, then right) under a full-width ``top``."""
    top: str
    left: str
    right: str


Page = str | Columns  # a page is Markdown, or a two-column layout of Markdown


@dataclass(frozen=True)
class TruthDoc:
    name: str
    pages: tuple[Page, ...]
    has_table: bool = False
    cjk: bool = False
    css: str = ""  # added to the page CSS (e.g. a smaller, tighter body text)


def page_markdown(page: Page) -> str:
    """A page's truth Markdown (columns in reading order)."""
    if isinstance(page, Columns):
        return "\n\n".join(p.strip() for p in (page.top, page.left, page.right) if p.strip())
    return page.strip()


def truth_markdown(doc: TruthDoc) -> str:
    """The document's truth in the outbox's form: ``<!-- page N -->`` before each page."""
    return "".join(f"<!-- page {n} -->\n\n{page_markdown(p)}\n\n" for n, p in enumerate(doc.pages, 1))


# ------------------------------------------------------------------------------------------- content

_VOCAB = (
    "heron", "voltage", "warehouse", "tariff", "quarterly", "ledger", "harbour", "invoice", "pallet", "freight",
    "copper", "meadow", "lantern", "granite", "orchard", "velvet", "signal", "timber", "cargo", "beacon", "ferry",
    "quarry", "summit", "willow", "cobalt", "ember", "falcon", "garnet", "harvest", "island", "juniper", "kettle",
    "lemon", "marble", "nickel", "oyster", "pepper", "quartz", "raven", "saddle", "thistle", "umber",
)


def _dense_pages(seed: int = 3, pages: int = 2) -> tuple[str, ...]:
    """Full-width paragraphs of unrelated words in small, tight type, a table and a closing paragraph: the
    pages on which rapidocr with its defaults garbled whole lines (long line crops flipped by the angle
    classifier). Unrelated words leave the recogniser no context to guess from."""
    rng = random.Random(seed)

    def para(n: int) -> str:
        text = " ".join(rng.choice(_VOCAB) for _ in range(n))
        return text[0].upper() + text[1:] + "."

    out = []
    for k in range(1, pages + 1):
        rows = "".join(f"| {rng.choice(_VOCAB)} | {rng.choice(_VOCAB)} | {rng.randint(10, 9999)} |\n"
                       for _ in range(5))
        out.append(f"# Heron Ledger {k}\n\n" + "\n\n".join(para(60) for _ in range(3))
                   + f"\n\n## Freight table\n\n| Code | Cargo | Weight |\n|---|---|---|\n{rows}\n{para(40)}")
    return tuple(out)


DOCS: tuple[TruthDoc, ...] = (
    TruthDoc("report", (
        """# Quarterly Warehouse Report

The heron voltage warehouse tariff was reviewed in the third quarter. Storage costs rose by four percent,
while the number of pallets handled each week stayed close to the spring level.

## Summary of findings

- Deliveries from the northern depot arrived on time in most weeks.
- Two cooling units were replaced after the inspection in August.
- The night shift now closes the loading bay at eleven o'clock.

Freight contracts signed before July keep their old rates until the end of the year. New contracts follow
the revised tariff, which charges heavy goods by weight rather than by volume.""",
        """## Costs by site

| Site | Pallets | Cost per week |
|---|---|---|
| Harbour | 1240 | 18300 |
| Airport | 860 | 12950 |
| Riverside | 415 | 6120 |
| Hilltop | 97 | 1480 |

The harbour site remains the largest. Riverside improved after its roof was repaired, and the airport
site will move to a longer lease next spring.

## Next steps

Managers will compare the new tariff with two outside offers before the budget meeting in November.""",
    ), has_table=True),
    TruthDoc("columns", (
        Columns(
            top="# Field Notes on River Birds",
            left="""## Morning counts

Volunteers walked the eastern bank at dawn and counted every heron, egret and cormorant they saw. The
water was low after a dry month, and most birds fed on the mud flats near the old mill.

Counts were highest on calm days. Wind from the north kept the smaller birds in the reeds.""",
            right="""## Evening counts

In the evening the birds moved upstream to roost in the willows. A second team counted them from the
bridge, using the same sheets and the same rules as the morning team.

Both teams will meet in October to agree on a single method for next year.""",
        ),
    )),
    TruthDoc("invoice", (
        """# Invoice 2024-0917

Customer: Lindqvist Timber and Supply, Bergen harbour office.

| Item | Quantity | Unit price | Amount |
|---|---|---|---|
| Oak planks | 40 | 12.50 | 500.00 |
| Steel brackets | 120 | 0.85 | 102.00 |
| Wood glue | 6 | 7.20 | 43.20 |
| Delivery | 1 | 35.00 | 35.00 |
| Total | | | 680.20 |

Payment is due within thirty days. Please quote the invoice number with every transfer.""",
    ), has_table=True),
    TruthDoc("cjk", (
        """# 年度报告 Annual Summary

本报告介绍了仓库在第三季度的运营情况。存储成本上升了百分之四，每周处理的托盘数量与春季持平。

## 主要结论

北方仓库的交货大多准时。八月检查后更换了两台冷却设备。

The English summary repeats the main points for readers abroad: costs rose slightly and deliveries were
mostly on time.""",
    ), cjk=True),
    TruthDoc("dense", _dense_pages(), has_table=True, css="body { font-size: 10pt; line-height: 1.1; }"),
)


# ------------------------------------------------------------------------------------------- rendering

def _inline(text: str) -> str:
    return html.escape(" ".join(text.split()))


def md_to_html(md: str) -> str:
    """The small Markdown subset used here (headings, paragraphs, "- " lists, pipe tables) as HTML."""
    out: list[str] = []
    for block in md.strip().split("\n\n"):
        lines = block.strip().splitlines()
        first = lines[0]
        if first.startswith("#"):
            level = len(first) - len(first.lstrip("#"))
            out.append(f"<h{level}>{_inline(first[level:])}</h{level}>")
        elif first.startswith("- "):
            out.append("<ul>" + "".join(f"<li>{_inline(line[2:])}</li>" for line in lines) + "</ul>")
        elif first.startswith("|"):
            rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines]
            head, body = rows[0], rows[2:]
            out.append("<table><tr>" + "".join(f"<th>{_inline(c)}</th>" for c in head) + "</tr>"
                       + "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in row) + "</tr>" for row in body)
                       + "</table>")
        else:
            out.append(f"<p>{_inline(block)}</p>")
    return "".join(out)


def _box(page: pymupdf.Page, rect: pymupdf.Rect, md: str, css: str = "") -> float:
    """Set ``md`` into ``rect``; returns the y where the text ended."""
    if not md.strip():
        return rect.y0
    spare, scale = page.insert_htmlbox(rect, md_to_html(md), css=_CSS + css, scale_low=1)
    if spare < 0 or scale != 1:
        raise ValueError(f"truth page does not fit its box: {md[:40]!r}")
    return rect.y1 - spare


def _render_page(doc: pymupdf.Document, spec: Page, css: str) -> None:
    page = doc.new_page(width=A4.width, height=A4.height)
    x0, x1, y1 = MARGIN, A4.width - MARGIN, A4.height - MARGIN
    if isinstance(spec, Columns):
        y = _box(page, pymupdf.Rect(x0, MARGIN, x1, y1), spec.top, css) + 12
        mid = (x0 + x1) / 2
        _box(page, pymupdf.Rect(x0, y, mid - GUTTER / 2, y1), spec.left, css)
        _box(page, pymupdf.Rect(mid + GUTTER / 2, y, x1, y1), spec.right, css)
    else:
        _box(page, pymupdf.Rect(x0, MARGIN, x1, y1), spec, css)


def _save(doc: pymupdf.Document, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    doc.subset_fonts()  # the CJK fallback font is 3.5 MB whole
    doc.save(path, garbage=3, deflate=True)
    doc.close()
    return path


def write_born_digital(doc: TruthDoc, folder: Path) -> Path:
    """``folder/NAME.pdf`` (text layer) and ``folder/NAME.md`` (truth); returns the PDF's path."""
    pdf = pymupdf.open()
    for spec in doc.pages:
        _render_page(pdf, spec, doc.css)
    path = _save(pdf, folder / f"{doc.name}.pdf")
    (folder / f"{doc.name}.md").write_text(truth_markdown(doc), encoding="utf-8")
    return path


def degrade(img: Image.Image, seed: int, skew_deg: float = SKEW_DEG, sigma: float = NOISE_SIGMA) -> Image.Image:
    """A grey page image as a cheap scanner leaves it: slightly rotated, softened, with sensor noise."""
    rotated = img.rotate(skew_deg, resample=Image.Resampling.BILINEAR, fillcolor=255)
    soft = rotated.filter(ImageFilter.GaussianBlur(BLUR_RADIUS))
    rng = np.random.default_rng(seed)
    arr = np.asarray(soft, dtype=np.float32) + rng.normal(0.0, sigma, size=(soft.height, soft.width))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), mode="L")


def scan_pdf(src: Path, dst: Path, dpi: int, noisy: bool = False, seed: int = 0) -> Path:
    """Each page of ``src`` rasterised in grey at ``dpi`` and stored as an image-only page of the same size."""
    source = pymupdf.open(src)
    out = pymupdf.open()
    for i in range(source.page_count):
        page = source[i]
        pix = page.get_pixmap(dpi=dpi, colorspace=pymupdf.csGRAY)
        img = Image.frombytes("L", (pix.width, pix.height), pix.samples)
        if noisy:
            img = degrade(img, seed=seed * 1000 + i, skew_deg=SKEW_DEG if i % 2 == 0 else -SKEW_DEG)
        buf = io.BytesIO()
        # Noisy scans as JPEG, as scanners store them (PNG of noise is large and slow to write).
        if noisy:
            img.save(buf, format="JPEG", quality=85)
        else:
            img.save(buf, format="PNG")
        new = out.new_page(width=page.rect.width, height=page.rect.height)
        new.insert_image(new.rect, stream=buf.getvalue())
    source.close()
    dst.parent.mkdir(parents=True, exist_ok=True)
    out.save(dst, garbage=3, deflate=True)
    out.close()
    return dst


def variants(dpis: tuple[int, ...] = SCAN_DPIS, noisy: bool = True) -> list[str]:
    """Corpus folder names: "born", "scan<dpi>" (clean), "noisy<dpi>"."""
    return ["born", *(f"scan{d}" for d in dpis), *((f"noisy{d}" for d in dpis) if noisy else ())]


def build_corpus(root: Path, docs: tuple[TruthDoc, ...] = DOCS, dpis: tuple[int, ...] = SCAN_DPIS,
                 noisy: bool = True) -> dict[str, Path]:
    """Write every variant folder under ``root``; each holds NAME.pdf + NAME.md for every document."""
    folders = {v: root / v for v in variants(dpis, noisy)}
    for k, doc in enumerate(docs):
        born = write_born_digital(doc, folders["born"])
        truth = truth_markdown(doc)
        for d in dpis:
            kinds = [("scan", False), ("noisy", True)] if noisy else [("scan", False)]
            for kind, noise in kinds:
                folder = folders[f"{kind}{d}"]
                scan_pdf(born, folder / f"{doc.name}.pdf", d, noisy=noise, seed=k)
                (folder / f"{doc.name}.md").write_text(truth, encoding="utf-8")
    return folders


def truth_pages(folder: Path) -> dict[str, Path]:
    """NAME → PDF path for every PDF in ``folder`` that has its NAME.md truth beside it."""
    return {p.stem: p for p in sorted(folder.glob("*.pdf")) if p.with_suffix(".md").exists()}
