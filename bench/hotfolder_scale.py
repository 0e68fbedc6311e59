"""The hot folder at scale: N distinct one-page PDFs dropped at once, CPU engine in legacy Markdown mode.

For each size (default 100, 1,000 and 10,000; ``--sizes 100,1000,3000`` for fewer) a fresh daemon drains the
drop; the bench reports pages/s from the first file in to the last one in done/, the daemon process's own CPU
per file (its PDF workers not counted: the daemon itself must not be the bottleneck) and its peak RSS.
Goals (issue 13): pages/s at the largest size ≥ 0.9× at 100, the daemon's CPU per file flat, its RSS < 300 MB.
Then the same largest drop once more with the daemon killed (SIGKILL) at a random moment of the drain and
started again: every file must end with exactly one output, none in failed/, none refused as a duplicate
(``--no-kill`` skips it).
Last line: scale_ratio=… daemon_cpu_ms_per_file=… daemon_rss_mb=… (CPU and RSS at the largest size)
kill9_outputs=<outputs>/<files>.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.daemon_proc import DaemonProc, wait_for
from tests.hotfolder.drops import make_pdf

CONFIG = """
[hotfolder]
settle_s = 0.3
rescan_s = 30.0
[ocr]
engine = "cpu"
workers = 2
markdown_mode = "legacy"
[daemon]
max_queued_per_user = 100000
"""
CLK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK  # utime + stime of the process itself


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def drop_of(n: int, scratch: Path, prefix: str) -> list[Path]:
    """``n`` distinct one-page PDFs, made beside the inbox's file system, ready to be renamed in."""
    srcs = Path(tempfile.mkdtemp(prefix=f"{prefix}{n}-", dir=scratch))
    return [make_pdf(srcs / f"scan{k:06d}.pdf", k) for k in range(n)]


def hot_folder_daemon() -> DaemonProc:
    """A daemon (not started) with this bench's config: the cpu engine in legacy mode, the hot folder on."""
    d = DaemonProc()
    d.config = d.home / "ftmllm.toml"
    d.config.write_text(CONFIG)
    return d


def run(n: int, scratch: Path) -> dict[str, float]:
    files = drop_of(n, scratch, "src")
    srcs = files[0].parent
    d = hot_folder_daemon()
    try:
        d.start()
        assert d.proc is not None
        pid = d.proc.pid
        inbox = d.paths.inbox
        inbox.mkdir(parents=True, exist_ok=True)
        done = d.paths.done
        # one file first: the PDF workers start with the first OCR job (seconds), which is not the drain's cost
        os.rename(make_pdf(srcs / "warmup.pdf", 10**7), inbox / "warmup.pdf")
        wait_for(lambda: (done / "warmup.pdf").exists(), 120, "the warm-up file to be done", interval=0.1)
        cpu0 = cpu_s(pid)
        t0 = time.monotonic()
        for f in files:  # the same file system: each appears complete at once
            os.rename(f, inbox / f.name)

        def drained() -> bool:
            return sum(1 for _ in os.scandir(done)) >= n + 1

        wait_for(drained, 60 + n * 2.0, f"{n} files to be done", interval=0.2)
        wall = time.monotonic() - t0
        cpu = cpu_s(pid) - cpu0
        rss = peak_rss_mb(pid)
        outputs = sum(1 for p in os.scandir(d.paths.outbox) if p.name.endswith(".md")) - 1
        failed = sum(1 for _ in os.scandir(d.paths.failed)) if d.paths.failed.exists() else 0
        if outputs != n or failed:
            raise SystemExit(f"{n} files: {outputs} outputs, {failed} in failed/ (see {d.log_path})")
    finally:
        d.close()
    out = {"n": n, "wall_s": wall, "pps": n / wall, "cpu_ms_per_file": cpu * 1000 / n, "rss_mb": rss}
    print(f"{n:>6} files: {wall:7.1f} s, {out['pps']:6.2f} pages/s, daemon CPU {out['cpu_ms_per_file']:.1f} ms/file, "
          f"daemon peak RSS {rss:.0f} MB", flush=True)
    return out


def killed_midway(n: int, scratch: Path, seed: int) -> int:
    """Drop ``n`` files, SIGKILL the daemon when a random share of them is done, restart it; the outputs."""
    files = drop_of(n, scratch, "kill")
    at = random.Random(seed).uniform(0.05, 0.95)
    d = hot_folder_daemon()
    try:
        d.start()
        inbox, done = d.paths.inbox, d.paths.done
        inbox.mkdir(parents=True, exist_ok=True)
        for f in files:
            os.rename(f, inbox / f.name)
        wait_for(lambda: sum(1 for _ in os.scandir(done)) >= int(n * at), 60 + n * 2.0,
                 f"{at:.0%} of the drop to be done", interval=0.05)
        d.kill9()
        at_kill = sum(1 for _ in os.scandir(done))
        d.start()
        wait_for(lambda: sum(1 for p in os.scandir(done) if p.name.endswith(".pdf")) >= n
                 and not any(p.name.endswith(".pdf") for p in os.scandir(inbox)), 60 + n * 2.0,
                 "the drop to be done after the restart", interval=0.2)
        outputs = sorted(p.name for p in os.scandir(d.paths.outbox) if p.name.endswith(".md"))
        failed = sum(1 for _ in os.scandir(d.paths.failed)) if d.paths.failed.exists() else 0
        notes = sum(1 for p in os.scandir(done) if p.name.endswith(".note.txt"))
        expected = [f"scan{k:06d}.md" for k in range(n)]
        print(f"kill -9 at {at_kill}/{n} done: {len(outputs)} outputs after the restart, {failed} in failed/, "
              f"{notes} refused as duplicates, names {'as expected' if outputs == expected else 'NOT as expected'}",
              flush=True)
        if outputs != expected or failed or notes:
            raise SystemExit(f"kill -9 mid-drain lost or repeated files (see {d.log_path})")
        return len(outputs)
    finally:
        d.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="100,1000,10000", help="comma-separated drop sizes (default %(default)s)")
    ap.add_argument("--no-kill", action="store_true", help="skip the kill -9 run at the largest size")
    ap.add_argument("--seed", type=int, default=int(time.time()), help="when the kill comes (default: now)")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory(prefix="hfscale", dir="/tmp") as tmp:
        results = [run(n, Path(tmp)) for n in sizes]
        kill = "skipped" if args.no_kill else f"{killed_midway(sizes[-1], Path(tmp), args.seed)}/{sizes[-1]}"
    first, last = results[0], results[-1]
    print(f"scale_ratio={last['pps'] / first['pps']:.2f} daemon_cpu_ms_per_file={last['cpu_ms_per_file']:.1f} "
          f"daemon_rss_mb={last['rss_mb']:.0f} kill9_outputs={kill}")


if __name__ == "__main__":
    main()
