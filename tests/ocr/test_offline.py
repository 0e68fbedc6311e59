"""Nothing is downloaded at run time: the layout model and the OCR models come from inside their wheels.

A worker's code runs in a fresh interpreter whose every socket connect and name lookup fails and is
counted; it converts a text page and OCRs a scan, and must have tried the network zero times.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.fixtures import pdfs

ROOT = Path(__file__).resolve().parents[2]

PROBE = r"""
import json, socket, sys
attempts = []
def deny(*args, **kwargs):
    attempts.append(repr(args)[:200])
    raise OSError("network disabled by the test")
socket.socket.connect = deny
socket.socket.connect_ex = deny
socket.getaddrinfo = deny
socket.create_connection = deny

from daemon.ocr.pdfworker import WorkerConfig
from daemon.ocr.worker_ops import Worker

w = Worker(WorkerConfig(preload=("markdown", "ocr")))
w.preload()
md = w.op_markdown(sys.argv[1], None, 0)
page = w.op_render(sys.argv[2], None, 1, 96, None, True)
ocr = w.op_ocr(page.png)
import rapidocr
print(json.dumps({"attempts": attempts, "md": md, "ocr": ocr, "rapidocr": rapidocr.__file__}))
"""


def test_markdown_and_ocr_work_with_the_network_cut_off(tmp_path: Path) -> None:
    digital = pdfs.born_digital(tmp_path / "digital.pdf")
    scan = pdfs.mixed(tmp_path / "mixed.pdf")  # page 2 is a scan with one large line: quick to OCR
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, str(digital), str(scan)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["attempts"] == []
    assert pdfs.TITLE in out["md"]
    assert pdfs.MIXED_WORDS[1] in out["ocr"]
    models = sorted(p.name for p in (Path(out["rapidocr"]).parent / "models").glob("*.onnx"))
    assert any("det" in m for m in models) and any("rec" in m for m in models), models
