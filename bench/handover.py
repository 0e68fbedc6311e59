"""Handover benchmark: `ftctl submit ocr` of a 200 MB PDF-sized file, end to end through handover.sock.

The client opens the file and passes the descriptor (SCM_RIGHTS); the daemon copies it into its spool in one
pass, hashing each block it writes, and syncs it before it answers. Goal (issue 11): >= 200 MB/s on
this machine, so that handing a file over never matters beside converting it. Measured twice: the handover
alone (shared.handover.hand_over, the part that grows with the file) and the whole `ftctl submit ocr` command
(a new Python process, the handover, the submit). The queue is paused, so no conversion competes; each run
gets a file of its own content. The files live in a temp dir that is removed at the end.
Last line: key=value pairs.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shared.handover import hand_over
from shared.protocol import Done, PauseQueue
from tests.daemon_proc import ROOT, DaemonProc

SIZE_MB = 200
RUNS = 3
GOAL_MB_S = 200.0


def pdf_sized(path: Path, size_mb: int, seed: int) -> Path:
    """A file with a PDF's header and trailer and ``size_mb`` MB of incompressible bytes between."""
    block = os.urandom(1 << 20)
    with path.open("wb") as fh:
        fh.write(f"%PDF-1.7\n% bench {seed}\n".encode())
        for i in range(size_mb):
            fh.write(block[: (1 << 20) - 8] + i.to_bytes(8, "big"))
        fh.write(b"\n%%EOF\n")
    return path


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="fthb", dir="/tmp"))
    d = DaemonProc()
    try:
        d.start()
        c = d.client(timeout=60)
        c.call(PauseQueue(), Done)
        direct: list[float] = []
        whole: list[float] = []
        for run in range(RUNS):
            src = pdf_sized(work / f"big{run}.pdf", SIZE_MB, run)
            size = src.stat().st_size
            t = time.perf_counter()
            handed = hand_over(d.paths, src)
            direct.append(size / (time.perf_counter() - t) / 1e6)
            assert handed.size == size
            (d.paths.state_dir / "spool" / handed.sha256).unlink()  # the next command copies it again
            t = time.perf_counter()
            res = subprocess.run([sys.executable, "-m", "tui.ftctl", "--home", str(d.home), "submit", "ocr",
                                  str(src), "--force"], capture_output=True, text=True, cwd=ROOT, timeout=300)
            whole.append(size / (time.perf_counter() - t) / 1e6)
            if res.returncode != 0:
                raise SystemExit(f"ftctl submit ocr failed: {res.stderr}")
            src.unlink()
        print(f"file: {SIZE_MB} MiB of incompressible bytes, {RUNS} runs, queue paused")
        print(f"handover alone (open, SCM_RIGHTS, copy into the spool, fsync, sha256): "
              f"{', '.join(f'{v:.0f}' for v in direct)} MB/s")
        print(f"`ftctl submit ocr` end to end (process start, handover, submit): "
              f"{', '.join(f'{v:.0f}' for v in whole)} MB/s")
        median = statistics.median(direct)
        print(f"goal >= {GOAL_MB_S:.0f} MB/s: {'met' if median >= GOAL_MB_S else 'MISSED'}")
        print(f"handover_mb_s={median:.0f} ftctl_submit_mb_s={statistics.median(whole):.0f}")
    finally:
        d.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
