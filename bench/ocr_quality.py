"""OCR quality on the generated ground-truth corpus (tests/ocrtruth.py), scored by daemon/ocr/scoring.py.

Rows:
  cpu-layout / cpu-legacy  the cpu engine's convert path with real PDF workers (what the daemon runs per page):
                           text layer → pymupdf4llm in that Markdown mode; image-only scans → rapidocr + reading
                           order. The mode only changes the text-layer path, so legacy runs on the born-digital
                           folder only (its scans would repeat layout's OCR figures exactly).
  pymupdf4llm              pymupdf4llm.to_markdown called directly (layout mode), born-digital only;
  get_text                 plain ``page.get_text()``, born-digital only (no markup: table F1 and headings 0).
Variants: born (text layer), scan<dpi> (clean grey image-only pages), noisy<dpi> (skew, blur, noise, JPEG).
Figures: CER, WER, table-cell F1, heading recall, reading order (totals weighted by truth length), s/page.
Then the scorer's own speed: pages scored per second over every page scored above.
Last line: cer_born=… cer_scan144=… table_f1=… cer_noisy144=… scorer_pages_s=…
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import pymupdf

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from daemon.engines.cpu import CpuEngine
from daemon.ocr.engine import load_page_input, run_page
from daemon.ocr.pdfworker import MarkdownMode, PdfWorkerPool
from daemon.ocr.scoring import DocScore, aggregate, score_page, split_pages
from tests.ocrtruth import build_corpus, truth_pages

Pair = tuple[str, str]  # (truth page Markdown, output page Markdown)


async def engine_pages(pool: PdfWorkerPool, folder: Path) -> tuple[list[Pair], float]:
    """Every page of every PDF in ``folder`` through the cpu engine; (truth, output) pairs and seconds."""
    engine = CpuEngine(pool)
    jobs: list[tuple[str, Path, int]] = []
    for pdf in truth_pages(folder).values():
        truth = split_pages(pdf.with_suffix(".md").read_text(encoding="utf-8"))
        jobs.extend((truth.get(n, ""), pdf, n - 1) for n in sorted(truth))

    async def one(truth: str, pdf: Path, page_no: int) -> Pair:
        page = await load_page_input(pool, job_id="bench", pdf=pdf, page_no=page_no, password=None,
                                     needs_image=engine.needs_image)
        return truth, (await run_page(engine, page)).text

    t = time.perf_counter()
    pairs = await asyncio.gather(*(one(*j) for j in jobs))
    return list(pairs), time.perf_counter() - t


def direct_pages(folder: Path, how: str) -> tuple[list[Pair], float]:
    import pymupdf4llm

    pymupdf4llm.use_layout(True)
    pairs: list[Pair] = []
    t = time.perf_counter()
    for pdf in truth_pages(folder).values():
        truth = split_pages(pdf.with_suffix(".md").read_text(encoding="utf-8"))
        with pymupdf.open(pdf) as doc:
            for n in sorted(truth):
                if how == "pymupdf4llm":
                    out = pymupdf4llm.to_markdown(doc, pages=[n - 1], use_ocr=False, show_progress=False)
                else:
                    out = doc[n - 1].get_text()
                pairs.append((truth[n], str(out)))
    return pairs, time.perf_counter() - t


def total(pairs: list[Pair]) -> DocScore:
    return aggregate({i: score_page(t, o) for i, (t, o) in enumerate(pairs)})


def fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def row(name: str, variant: str, pairs: list[Pair], seconds: float) -> DocScore:
    d = total(pairs)
    print(f"{name:<12} {variant:<9} pages={len(pairs):<3} cer={d.cer:.4f} wer={d.wer:.4f} "
          f"table_f1={fmt(d.table_f1)} headings={fmt(d.heading_recall)} order={fmt(d.reading_order)} "
          f"s_per_page={seconds / max(1, len(pairs)):.2f}", flush=True)
    return d


async def main_async(args: argparse.Namespace) -> int:
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="ocr-quality-"))
    dpis = tuple(int(d) for d in args.dpis.split(","))
    t = time.perf_counter()
    folders = build_corpus(root, dpis=dpis, noisy=not args.no_noisy)
    print(f"corpus: {root} ({', '.join(folders)}), built in {time.perf_counter() - t:.1f} s", flush=True)

    scored: list[Pair] = []
    results: dict[tuple[str, str], DocScore] = {}
    modes: list[MarkdownMode] = ["layout", "legacy"]
    for mode in modes:
        async with PdfWorkerPool(size=args.workers, markdown_mode=mode) as pool:
            for variant, folder in folders.items():
                if mode == "legacy" and variant != "born":
                    continue
                pairs, seconds = await engine_pages(pool, folder)
                results[(f"cpu-{mode}", variant)] = row(f"cpu-{mode}", variant, pairs, seconds)
                scored.extend(pairs)
    for how in ("pymupdf4llm", "get_text"):
        pairs, seconds = direct_pages(folders["born"], how)
        results[(how, "born")] = row(how, "born", pairs, seconds)
        scored.extend(pairs)

    rounds, t = 0, time.perf_counter()
    while rounds == 0 or time.perf_counter() - t < 1.0:
        for truth, out in scored:
            score_page(truth, out)
        rounds += 1
    scorer = rounds * len(scored) / (time.perf_counter() - t)
    print(f"scorer: {scorer:.0f} pages/s over {len(scored)} scored pages")

    born = results[("cpu-layout", "born")]
    scan = results.get(("cpu-layout", "scan144"))
    noisy = results.get(("cpu-layout", "noisy144"))
    print(f"cer_born={born.cer:.4f} cer_scan144={fmt(scan.cer if scan else None)} table_f1={fmt(born.table_f1)} "
          f"cer_noisy144={fmt(noisy.cer if noisy else None)} scorer_pages_s={scorer:.0f}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dpis", default="100,144,200", help="scan resolutions (default 100,144,200)")
    ap.add_argument("--no-noisy", action="store_true", help="clean scans only")
    ap.add_argument("--workers", type=int, default=2, help="PDF workers (default 2)")
    ap.add_argument("--keep", metavar="DIR", help="write the corpus here (default: a new temporary folder)")
    return asyncio.run(main_async(ap.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
