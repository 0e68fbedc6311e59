"""The loop end to end, all real: the daemon trains a LoRA on the tiny Qwen2-VL with LLaMA-Factory, `ftctl deploy`
loads the adapter into the vLLM engine the same daemon runs (vLLM's CPU build), and a PDF converted with
`--adapter` says in its sidecar which adapter wrote it."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest

from shared.protocol import Status, StatusReply
from tests.engines import stack
from tests.fixtures import pdfs
from tests.train_daemon.support import Box, TrainDaemon, toml_section
from tests.vllm.conftest import READY_DEADLINE_S, VllmDaemon, vllm_config, wait_engine

pytestmark = [pytest.mark.llamafactory, pytest.mark.vllm]

# the tiny model never ends an answer by itself; these end its greedy loops after min_tokens (as in tests/vllm)
STOPS = ["ure", "7", "%", "'"]


def test_a_lora_the_daemon_trained_goes_live_in_its_vllm_engine_and_a_pdf_converted_with_it_names_it(
        box: Box) -> None:
    home = Path(tempfile.mkdtemp(prefix="ftloop", dir="/tmp"))
    config = home / "ftmllm.toml"
    config.write_text(vllm_config(home, max_tokens=256, sampling={"min_tokens": 24, "stop": STOPS})
                      + toml_section("train", box.train_section()))
    d = TrainDaemon(home=home, config=config)
    d.start(timeout=60)
    try:
        assert d.ftctl("dataset", "add", "tiny_sft", str(box.src / "tiny_sft.json")).returncode == 0
        # train while vLLM starts: without GPUs neither waits for the other
        sets = box.train_sets("max_steps=5", "save_steps=5", "gradient_accumulation_steps=1")
        job_id = d.submit_id("train", "qwen2vl_lora_sft", "--dataset", "tiny_sft",
                             *[a for s in sets for a in ("--set", s)])
        vd = VllmDaemon(proc=d, model=stack.tiny_model_cached())
        wait_engine(vd, "ready", READY_DEADLINE_S)
        job = d.wait_job(job_id)
        assert job.state == "succeeded", f"{job.error}\n{d.log_tail(job_id)}"

        deployed = d.ftctl("deploy", str(job_id), "--name", "tinyft", timeout=600)
        assert deployed.returncode == 0, deployed.stderr
        assert f"adapter tinyft loaded from {job.artifacts['adapter']}" in deployed.stdout
        assert "tinyft" in d.c.call(Status(), StatusReply).engine.adapters
        status, models = vd.http_json("/v1/models")
        assert status == 200 and {"id": "tinyft", "root": job.artifacts["adapter"]}.items() <= next(
            m for m in models["data"] if m["id"] == "tinyft").items()

        pdf = pdfs.numbered(home / "loop.pdf", 2)
        out = home / "out"
        converted = d.ftctl("submit", "ocr", str(pdf), "--adapter", "tinyft", "--out-dir", str(out), "--wait",
                            timeout=900)
        assert converted.returncode == 0, converted.stderr
        side = json.loads((out / "loop.json").read_text())
        assert side["adapter"] == "tinyft"
        assert {p["method"] for p in side["page_results"]} == {"vlm"}
        # vLLM ran the pages with the adapter (it refuses an unknown model name with 404)
        status, metrics = vd.http_json("/metrics")
        assert status == 200 and 'running_lora_adapters="' in str(metrics) and "tinyft" in str(metrics)
    finally:
        d.close(remove=False)
        shutil.rmtree(home, ignore_errors=True)
