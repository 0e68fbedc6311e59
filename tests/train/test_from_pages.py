"""dataset from-pages: the training image of a page is the serving image of that page, pixel for pixel (the
real PDF workers and the real vLLM engine's render cap, no server needed); the split is by document and
depends only on the names and the seed; truth pages come from the outbox's markers."""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pymupdf
import pytest

from daemon.engines.vllm import VllmEngine
from daemon.engines.vlm.adapter_budget import budget_of, plan_for, read_budget, render_cap, write_budget
from daemon.engines.vlm.budget import BudgetError, config_limits
from daemon.ocr.engine import load_page_input
from daemon.ocr.pdfworker import PdfWorkerPool
from daemon.train.datasets import DatasetProblem
from daemon.train.from_pages import Document, build, page_truths, serving_render, split_documents
from shared.config import load_settings
from tests.ocrtruth import DOCS, write_born_digital


@pytest.fixture
def tmp() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="ftfpu", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_a_training_page_has_exactly_the_pixels_the_vllm_engine_is_sent_for_that_page(tmp: Path) -> None:
    config = tmp / "ftmllm.toml"
    # a short context lowers the render cap below vllm.max_pixels: the training page must follow it too
    config.write_text('[vllm]\nmodel = "/nonexistent/model"\nmax_model_len = 2048\nmax_tokens = 1024\n')
    settings = load_settings(config, str(tmp / "home"))
    src = tmp / "src"
    pdf = write_born_digital(DOCS[0], src)

    async def both() -> tuple[bytes, bytes, int]:
        async with PdfWorkerPool(size=1, preload=()) as pool:
            engine = VllmEngine(settings.config.vllm, settings.config.ocr, pool, tmp / "vllm",
                                serving_render(settings).prompt)
            served = await load_page_input(pool, job_id="1", pdf=pdf, page_no=1, password=None, needs_image=True,
                                           dpi=settings.config.ocr.dpi, max_pixels=engine.max_pixels)
            built = await build("p", [Document(pdf.name, pdf, pdf.with_suffix(".md"))], pool=pool,
                                render=serving_render(settings), dataset_dir=tmp / "datasets", val=0, seed=0,
                                replace=False, folder=str(src))
            assert served.png is not None and engine.max_pixels is not None
            return served.png, built.meta["p"]["from_pages"]["render"]["max_pixels"], engine.max_pixels

    served_png, recorded, cap = asyncio.run(both())
    assert cap < settings.config.vllm.max_pixels and recorded == cap
    records = json.loads((tmp / "datasets" / "p.json").read_text())
    page2 = next(r for r in records if r["images"][0] and r["messages"][1]["content"] ==
                 page_truths((src / "report.md").read_text())[2])
    trained, served = pymupdf.Pixmap(page2["images"][0]), pymupdf.Pixmap(served_png)
    assert (trained.width, trained.height, trained.n) == (served.width, served.height, served.n)
    assert trained.samples == served.samples


def test_documents_are_split_whole_and_the_same_way_for_the_same_seed() -> None:
    names = [f"doc{k:02d}.pdf" for k in range(20)]
    train, val = split_documents(names, 0.2, seed=3)
    assert len(val) == 4 and sorted(train + val) == sorted(names) and not set(train) & set(val)
    assert split_documents(list(reversed(names)), 0.2, seed=3) == (train, val)
    assert split_documents(names, 0.2, seed=4) != (train, val)
    assert split_documents(["a.pdf", "b.pdf"], 0.1, seed=0)[1] != []  # one document at least…
    assert split_documents(["a.pdf"], 0.5, seed=0) == (["a.pdf"], [])  # …but never the only one
    assert split_documents(names, 0, seed=0) == (sorted(names), [])
    with pytest.raises(DatasetProblem, match=r"--val 1"):
        split_documents(names, 1, seed=0)


def test_truth_pages_come_from_the_outbox_markers_and_failed_or_blank_pages_are_empty() -> None:
    md = ("<!-- page 1 -->\n\n# Title\n\ntext\n\n<!-- page 2: failed: timeout -->\n\n<!-- page 3 -->\n\n   \n"
          "<!-- page 4 -->\nlast\n")
    assert page_truths(md) == {1: "# Title\n\ntext", 2: "", 3: "", 4: "last"}
    assert page_truths("no markers at all") == {1: "no markers at all"}


def test_an_adapter_budget_is_served_as_trained_or_refused_with_the_setting_to_change(tmp: Path) -> None:
    budget = budget_of({"image_max_pixels": 262144}, {"pages": {"dpi": 200, "max_pixels": 262144, "prompt": "x"}})
    assert (budget.image_max_pixels, budget.image_min_pixels) == (262144, 32 * 32)  # LLaMA-Factory's default min
    assert budget_of({}, {}).image_max_pixels == 768 * 768
    write_budget(tmp, budget)
    assert read_budget(tmp) == budget and read_budget(tmp / "elsewhere") is None

    roomy = config_limits(8192, 4096, 3136, 1003520, "Convert the page.")
    plan, notes = plan_for(budget, roomy, dpi=144, prompt="Convert the page.")
    assert (plan.max_pixels, plan.max_tokens) == (262144, 4096)  # the adapter's pages, not vllm.max_pixels
    assert notes == ["dataset pages was rendered at 200 dpi, ocr.dpi is 144",
                     "dataset pages was built with another prompt than ocr.prompt's"]
    # a short context shortens the answer, never the image…
    plan, notes = plan_for(budget, config_limits(1024, 4096, 3136, 1003520, "x"), dpi=200, prompt="x")
    assert plan.max_pixels == 262144 and 256 <= plan.max_tokens < 1024 - 262144 // 784
    assert "the answer was limited" in notes[0]
    # …until not even a short answer fits, or the engine would shrink the pages
    with pytest.raises(BudgetError, match=r"set vllm\.max_model_len to at least \d+"):
        plan_for(budget, config_limits(512, 4096, 3136, 1003520, "x"), dpi=200, prompt="x")
    with pytest.raises(BudgetError, match=r"set vllm\.max_pixels = 262144"):
        plan_for(budget, config_limits(8192, 4096, 3136, 200704, "x"), dpi=200, prompt="x")
    # what an OCR job naming the adapter renders its pages at
    assert render_cap(tmp, roomy, dpi=144, prompt="x") == 262144
    assert render_cap(tmp / "elsewhere", roomy, dpi=144, prompt="x") is None
    assert render_cap(tmp, config_limits(8192, 4096, 3136, 200704, "x"), dpi=144, prompt="x") is None
