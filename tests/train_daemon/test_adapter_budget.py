"""Train and serve at the same resolution, through the real daemon, ftctl and LLaMA-Factory on the tiny
Qwen2-VL: a dataset built by `dataset from-pages` trains at the pixel budget its pages were rendered with
(no --set image_max_pixels), the adapter keeps that budget beside it, and `ftctl deploy` refuses an adapter
whose budget the engine of the config cannot serve, naming the setting."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.engines.vlm.adapter_budget import BUDGET_FILE
from tests.ocrtruth import DOCS, write_born_digital
from tests.train_daemon.support import Box, TrainDaemon, start_daemon, start_with_toml

pytestmark = pytest.mark.llamafactory

SERVED_PIXELS = 12544  # vllm.max_pixels of this daemon: small, so that training runs on 2 cores in seconds


@pytest.fixture(scope="module")
def trained(box: Box) -> Iterator[tuple[TrainDaemon, int]]:
    d = start_daemon(box, "bud", vllm={"max_pixels": SERVED_PIXELS})
    folder = Path(tempfile.mkdtemp(prefix="ftbudpages", dir="/tmp"))
    try:
        for doc in DOCS[:2]:
            write_born_digital(doc, folder)
        r = d.ftctl("dataset", "from-pages", "pages", str(folder), "--val", "0.5")
        assert r.returncode == 0, r.stderr
        sets = [s for s in box.train_sets("max_steps=3", "save_steps=3", "gradient_accumulation_steps=1")
                if not s.startswith("image_max_pixels=")]
        assert sets != box.train_sets("max_steps=3", "save_steps=3", "gradient_accumulation_steps=1")
        job_id = d.submit_id("train", "qwen2vl_lora_sft", "--dataset", "pages",
                             *[a for s in sets for a in ("--set", s)])
        job = d.wait_job(job_id)
        assert job.state == "succeeded", f"{job.error}\n{d.log_tail(job_id)}"
        yield d, job_id
    finally:
        d.close()
        shutil.rmtree(folder, ignore_errors=True)


def test_a_from_pages_dataset_trains_at_its_render_budget_and_the_adapter_keeps_it(
        trained: tuple[TrainDaemon, int]) -> None:
    d, job_id = trained
    job = d.job(job_id).job
    assert job.spec["params"]["image_max_pixels"] == SERVED_PIXELS  # from the dataset, not the template's 262144
    budget = json.loads((Path(job.artifacts["adapter"]) / BUDGET_FILE).read_text())
    assert budget["image_max_pixels"] == SERVED_PIXELS and budget["image_min_pixels"] == 32 * 32
    render = budget["datasets"]["pages"]
    assert (render["dpi"], render["max_pixels"], render["mode"]) == (144, SERVED_PIXELS, "page")


def test_deploy_refuses_an_adapter_trained_on_larger_pages_than_the_engine_serves(
        trained: tuple[TrainDaemon, int]) -> None:
    d, job_id = trained
    adapter = Path(d.job(job_id).job.artifacts["adapter"])
    # as trained: the budget fits, so deploy gets as far as the engine (this daemon runs none)
    r = d.ftctl("deploy", str(job_id))
    assert r.returncode != 0 and "no vLLM engine runs in this daemon" in r.stderr, r.stderr
    path = adapter / BUDGET_FILE
    kept = path.read_text()
    try:
        path.write_text(json.dumps({**json.loads(kept), "image_max_pixels": 4 * SERVED_PIXELS}))
        r = d.ftctl("deploy", str(job_id))
        assert r.returncode != 0, r.stdout
        assert f"the adapter of job {job_id} cannot be served as it was trained" in r.stderr, r.stderr
        assert f"vllm.max_pixels is {SERVED_PIXELS}" in r.stderr and f"set vllm.max_pixels = {4 * SERVED_PIXELS}" \
            in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
    finally:
        path.write_text(kept)


def test_engine_load_refuses_an_adapter_folder_whose_budget_the_engine_cannot_serve() -> None:
    # no trainer here: an adapter folder with a recorded budget, and a daemon with a (not started) vLLM engine
    d = start_with_toml("budload", '[ocr]\nengine = "cpu"\n[hotfolder]\nenabled = false\n'
                                   '[vllm]\nmodel = "/nonexistent/model"\nmax_model_len = 1024\nmax_tokens = 256\n')
    try:
        adapter = d.home / "adapter"
        adapter.mkdir()
        (adapter / BUDGET_FILE).write_text(json.dumps({"image_max_pixels": 1003520, "image_min_pixels": 1024,
                                                       "datasets": {}}))
        r = d.ftctl("engine", "load", "wide", str(adapter))
        assert r.returncode != 0 and "cannot be served as it was trained" in r.stderr, r.stderr
        assert "set vllm.max_model_len to at least" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    finally:
        d.close()
