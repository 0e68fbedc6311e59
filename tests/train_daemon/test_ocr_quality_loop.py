"""The OCR quality loop end to end, all real: corrected pages → `ftctl dataset from-pages` → a 20-step LoRA on the
tiny Qwen2-VL with LLaMA-Factory → `ftctl deploy` into the daemon's vLLM (CPU build) → `ftctl ocr-eval` of the
base model and of the adapter on the dataset's validation document → `ftctl ocr-compare` with the real numbers →
a PDF dropped into the hot folder (`hotfolder.adapter`) converted with the adapter at the pixel budget it trained
with, its sidecar saying so and carrying the pages' quality signals.

The tiny model is random: its scores are bad, and only that they are the real ones is checked."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest

from daemon.engines.vlm.adapter_budget import BUDGET_FILE
from tests.daemon_proc import wait_for
from tests.engines import stack
from tests.fixtures import pdfs
from tests.train_daemon.support import Box, TrainDaemon, toml_section
from tests.vllm.conftest import READY_DEADLINE_S, VllmDaemon, vllm_config, wait_engine

pytestmark = [pytest.mark.llamafactory, pytest.mark.vllm]

# the tiny model never ends an answer by itself; these end its greedy loops after min_tokens (as in tests/vllm)
STOPS = ["ure", "7", "%", "'"]
# CPU_SETS trains at 12544 pixels, far below the engine's own cap: reading at the adapter's budget is its own
TRAINED_PIXELS = 12544


def corrected(pages: int) -> str:
    """What a person leaves after correcting the outbox's Markdown of numbered(pages)."""
    return "\n".join(f"<!-- page {k} -->\n\n# Page {k} of {pages}\n\nThis is the body of page {k}; its word is "
                     f"{pdfs.page_word(k)}.\n" for k in range(1, pages + 1))


def test_corrected_pages_train_an_adapter_that_is_scored_against_the_base_model_and_converts(box: Box) -> None:
    home = Path(tempfile.mkdtemp(prefix="ftqloop", dir="/tmp"))
    config = home / "ftmllm.toml"
    # the hot folder reads with the adapter this test deploys as "pagesft" (nothing is dropped before that)
    hot = {"enabled": True, "settle_s": 0.2, "adapter": "pagesft"}
    config.write_text(vllm_config(home, hot, max_tokens=64, sampling={"min_tokens": 8, "stop": STOPS})
                      + toml_section("train", box.train_section()))
    d = TrainDaemon(home=home, config=config)
    d.start(timeout=60)
    try:
        folder = home / "corrected"
        for name, pages in (("a", 2), ("b", 1)):
            pdfs.numbered(folder / f"{name}.pdf", pages)
            (folder / f"{name}.md").write_text(corrected(pages), encoding="utf-8")
        built = d.ftctl("dataset", "from-pages", "pages", str(folder), "--val", "0.5")
        assert built.returncode == 0, built.stderr

        sets = box.train_sets("max_steps=20", "save_steps=20", "gradient_accumulation_steps=1")
        job_id = d.submit_id("train", "qwen2vl_lora_sft", "--dataset", "pages",
                             *[a for s in sets for a in ("--set", s)])
        vd = VllmDaemon(proc=d, model=stack.tiny_model_cached())
        wait_engine(vd, "ready", READY_DEADLINE_S)  # vLLM starts while the LoRA trains
        job = d.wait_job(job_id)
        assert job.state == "succeeded", f"{job.error}\n{d.log_tail(job_id)}"
        deployed = d.ftctl("deploy", str(job_id), "--name", "pagesft", timeout=600)
        assert deployed.returncode == 0, deployed.stderr

        runs = []
        for extra in ((), ("--adapter", "pagesft")):
            r = d.ftctl("ocr-eval", "pages", "--engine", "vllm", *extra, "--wait", "--json", timeout=900)
            assert r.returncode == 0, r.stderr + d.log_text()[-3000:]
            runs.append(json.loads(r.stdout))
        base, tuned = runs
        assert [p["doc"] for p in base["pages"]] == [p["doc"] for p in tuned["pages"]]
        assert base["title"] == f"job {base['job_id']}: vllm" and tuned["title"].endswith("pagesft")
        for run in runs:  # the stored numbers are the scorer's on what vLLM wrote
            assert {p["method"] for p in run["pages"]} <= {"vlm", "fallback", ""} and run["totals"]["cer"] > 0

        table = d.ftctl("ocr-compare", str(base["job_id"]), str(tuned["job_id"]))
        assert table.returncode == 0, table.stderr
        print(table.stdout)
        cer = next(line for line in table.stdout.splitlines() if line.startswith("CER %")).split()[2:]
        assert cer == [f"{base['totals']['cer'] * 100:.2f}", f"{tuned['totals']['cer'] * 100:.2f}"]

        shutil.copyfile(folder / "b.pdf", d.paths.inbox / "b.pdf")
        sidecar = d.paths.outbox / "b.json"
        wait_for(lambda: sidecar.exists() or any(d.paths.failed.glob("*.error.txt")), 900,
                 "the hot folder to convert b.pdf with the adapter")
        assert sidecar.exists(), [p.read_text() for p in d.paths.failed.glob("*.error.txt")]
        side = json.loads(sidecar.read_text())
        assert side["adapter"].endswith("pagesft")
        trained = json.loads((Path(job.spec["output_dir"]) / BUDGET_FILE).read_text())["image_max_pixels"]
        assert side["max_pixels"] == trained == TRAINED_PIXELS
        page = side["page_results"][0]
        assert page["method"] in ("vlm", "fallback") and "risk" in page and page["attempts"] >= 1
    finally:
        d.close(remove=False)
        shutil.rmtree(home, ignore_errors=True)

