"""CPU-engine throughput: a 300-page born-digital report through the daemon vs pymupdf4llm called directly.

(direct) one Python process calls ``pymupdf4llm.to_markdown(file)`` on the whole document, in the Markdown mode
         the daemon uses (``ocr.markdown_mode``, layout by default) — what a user would script by hand;
(daemon) ``ftctl submit ocr``'s request to a real ftmllmd with the CPU engine and its PDF workers, timed from
         submit to the job's end: validation, rendering-free text-layer Markdown in the workers, per-page
         results stored in SQLite, the assembled ``.md`` and sidecar written.

Both run in the same bench run on the same file. Peak RSS is the daemon plus all its worker processes, sampled
every 0.1 s while the job runs (a measurement, not synchronisation: the job's end is read from its event).
Goal (issue 3): speedup ≥ 1.5 with both cores busy.
Last line: speedup=… pages_per_s=… peak_rss_mb=… direct_pages_per_s=…
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shared.client import Client
from shared.config import OcrConfig
from tests.daemon_proc import DaemonProc, run_job
from tests.fixtures import pdfs

PAGES = int(os.environ.get("FTMLLM_BENCH_PAGES", "300"))
WORKERS = 2  # this machine's cores; the daemon's default is the same

# Runs in a fresh interpreter so that its import time and memory are its own; prints one JSON line.
DIRECT = """
import json, resource, sys, time
import pymupdf4llm
pymupdf4llm.use_layout(sys.argv[2] == "layout")
t = time.perf_counter()
md = pymupdf4llm.to_markdown(sys.argv[1], use_ocr=False, show_progress=False)
print(json.dumps({"seconds": time.perf_counter() - t, "chars": len(md),
                  "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def direct(pdf: Path, mode: str) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", DIRECT, str(pdf), mode], check=True, capture_output=True, text=True)
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


class PeakRss:
    """Samples the RSS of a process and all its descendants until stopped; keeps the peak."""

    def __init__(self, pid: int) -> None:
        self.root = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            total = 0
            for p in [self.root, *self.root.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass  # a worker that ended between listing and reading
            self.peak = max(self.peak, total)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def through_daemon(d: DaemonProc, c: Client, pdf: Path, out: Path) -> tuple[float, int]:
    assert d.proc is not None
    with PeakRss(d.proc.pid) as rss:
        job, elapsed = run_job(c, "ocr", {"file": str(pdf), "out_dir": str(out), "force": True})
    if job.state != "succeeded":
        raise SystemExit(f"bench/ocr_cpu.py: the daemon's job ended {job.state}: {job.error}")
    return elapsed, rss.peak


@dataclass
class Run:
    direct_pps: float
    pps: float
    peak_mb: float
    cold_s: float  # the first OCR job of a fresh daemon, one page: the workers' start
    cold_pps: float  # the document's pages over its time plus the workers' start

    @property
    def speedup(self) -> float:
        return self.pps / self.direct_pps


def compare(pdf: Path, mode: str, work: Path) -> Run:
    """Direct call, then a fresh daemon configured for the same Markdown mode, on the same file."""
    ref = direct(pdf, mode)
    direct_pps = PAGES / ref["seconds"]
    print(f"[{mode}] direct pymupdf4llm.to_markdown: {ref['seconds']:.1f}s, {direct_pps:.2f} pages/s, "
          f"{ref['chars']:.0f} chars, peak RSS {ref['rss_mb']:.0f} MB", flush=True)
    d = DaemonProc()
    cfg = d.home / "ftmllm.toml"
    cfg.write_text(f'[ocr]\nengine = "cpu"\nworkers = {WORKERS}\nmarkdown_mode = "{mode}"\n')
    d.config = cfg
    try:
        d.start()
        c = d.client(timeout=60)
        # The PDF workers start with the daemon's first OCR job (spawn, import MuPDF, load the layout and OCR
        # models) and then stay: a one-page job pays that once, as on a running server, and is reported apart.
        cold_s, _ = through_daemon(d, c, pdfs.numbered(work / "one.pdf", 1), work / "out-warm")
        out = work / f"out-{mode}"
        seconds, peak = through_daemon(d, c, pdf, out)
    finally:
        d.close()
    md = next(out.glob("*.md"))
    run = Run(direct_pps=direct_pps, pps=PAGES / seconds, peak_mb=peak / 2**20, cold_s=cold_s,
              cold_pps=PAGES / (seconds + cold_s))
    print(f"[{mode}] first job on a fresh daemon (workers start): {cold_s:.1f}s for one page", flush=True)
    print(f"[{mode}] through ftmllmd (cpu engine, {WORKERS} workers): {seconds:.1f}s, {run.pps:.2f} pages/s, "
          f"{len(md.read_text())} chars, peak RSS daemon + workers {run.peak_mb:.0f} MB; "
          f"speedup {run.speedup:.2f}× ({run.cold_pps / direct_pps:.2f}× counting the workers' start)", flush=True)
    return run


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="ftb", dir="/tmp"))
    default = OcrConfig().markdown_mode
    try:
        pdf = pdfs.report(work / "report.pdf", PAGES)
        print(f"{PAGES}-page report ({pdf.stat().st_size / 1e6:.1f} MB), {os.cpu_count()} CPUs; "
              f"the daemon's default markdown_mode is {default}", flush=True)
        runs = {mode: compare(pdf, mode, work) for mode in ("layout", "legacy")}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    main_run, legacy = runs[default], runs["legacy"]
    print(f"speedup {main_run.speedup:.2f}× in {default} mode, {legacy.speedup:.2f}× in legacy mode (goal ≥ 1.5)")
    print(f"speedup={main_run.speedup:.2f} pages_per_s={main_run.pps:.2f} "
          f"peak_rss_mb={max(r.peak_mb for r in runs.values()):.0f} direct_pages_per_s={main_run.direct_pps:.2f} "
          f"legacy_speedup={legacy.speedup:.2f} legacy_pages_per_s={legacy.pps:.2f} "
          f"workers_start_s={main_run.cold_s:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
