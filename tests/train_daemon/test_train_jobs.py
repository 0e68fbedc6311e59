"""Train, eval, export, eval-compare and deploy through the real daemon, submitted with the real ftctl, run by
the real llamafactory-cli on the tiny Qwen2-VL (CPU). One 20-step SFT is shared by the tests that need an
adapter."""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from shared.client import RemoteError
from shared.protocol import JobDetail, JobInfo, Status, StatusReply, Submit
from tests.engines import stack
from tests.train_daemon.support import Box, Recorder, TrainDaemon, daemon_with_dataset, job_id_of

pytestmark = pytest.mark.llamafactory


@pytest.fixture(scope="module")
def lfd(box: Box) -> Iterator[TrainDaemon]:
    with daemon_with_dataset(box, "tr") as d:
        yield d


@dataclass
class Sft:
    job: JobInfo
    ftctl: subprocess.CompletedProcess[str]
    live_points: int  # loss points the subscribed client had before the job's terminal event
    recorder: Recorder


@pytest.fixture(scope="module")
def sft(lfd: TrainDaemon, box: Box) -> Sft:
    recorder = Recorder(lfd.client(), ("train.", "job.")).start()
    sets = [a for s in box.train_sets("max_steps=20", "save_steps=5", "gradient_accumulation_steps=1")
            for a in ("--set", s)]
    r = lfd.ftctl("train", "qwen2vl_lora_sft", "--dataset", "tiny_sft", *sets, "--follow")
    job_id = job_id_of(r.stderr)
    job = lfd.wait_job(job_id)
    recorder.wait(lambda: recorder.finished_at(job_id), 60, "the job's last event")
    end = recorder.finished_at(job_id)
    assert end is not None
    live = sum(1 for t, p in recorder.train_points(job_id) if t < end and p.loss is not None)
    return Sft(job=job, ftctl=r, live_points=live, recorder=recorder)


def test_sft_submitted_with_ftctl_streams_loss_points_to_subscribers_and_saves_the_adapter(
        lfd: TrainDaemon, sft: Sft) -> None:
    assert sft.ftctl.returncode == 0, sft.ftctl.stderr + lfd.log_tail(sft.job.id)
    assert sft.job.state == "succeeded"
    assert sft.live_points >= 10  # they reached the client while it trained, not at the end
    stored = lfd.points(sft.job.id)
    assert [p.step for p in stored] == list(range(1, 21))  # each step once
    assert all(p.total_steps == 20 and p.loss is not None and p.lr is not None for p in stored)
    printed = re.findall(r"^step (\d+)/20\s+loss [\d.]+", sft.ftctl.stdout, re.M)
    assert [int(s) for s in printed] == list(range(1, 21))  # --follow printed every point as it came
    adapter = Path(sft.job.artifacts["adapter"])
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    assert sft.job.artifacts["saved"].endswith("after all 20 steps")
    assert adapter.parent == lfd.paths.state_dir / "jobs" / str(sft.job.id)  # everything under the job's dir
    assert (adapter.parent / "job.yaml").read_text() == sft.job.spec["yaml"]
    assert "max_steps: 20" in sft.job.spec["yaml"] and sft.job.spec["template"] == "qwen2vl_lora_sft"
    assert "llamafactory-cli train started on the CPU" in " ".join(lfd.history(sft.job.id))
    logs = lfd.ftctl("logs", str(sft.job.id), "-n", "400")
    assert "***** train metrics *****" in logs.stdout  # the trainer's own output is in the job's log


def test_status_says_no_gpus_found_and_jobs_run_on_the_cpu(lfd: TrainDaemon, sft: Sft) -> None:
    status = lfd.c.call(Status(), StatusReply)
    assert status.gpus == [] and status.gpu_note.startswith("no GPUs found")
    assert sft.job.gpus == [] and "started on CPU" in lfd.history(sft.job.id)
    shown = lfd.ftctl("status")
    assert "no GPUs found" in shown.stdout


def test_eval_and_export_give_metrics_and_a_merged_model_that_loads_and_the_compare_table_prints(
        lfd: TrainDaemon, box: Box, sft: Sft) -> None:
    evals = [a for s in ["max_new_tokens=8", "max_samples=4", *box.train_sets()] for a in ("--set", s)]
    adapter_eval = lfd.submit_id("eval", "--adapter", str(sft.job.id), "--dataset", "tiny_sft", *evals)
    base_eval = lfd.submit_id("eval", "--dataset", "tiny_sft", *evals)
    export = lfd.submit_id("export", "--adapter", str(sft.job.id), "--set", "trust_remote_code=")
    for job_id in (adapter_eval, base_eval, export):
        job = lfd.wait_job(job_id)
        assert job.state == "succeeded", f"{job.error}\n{lfd.log_tail(job_id)}"

    results = json.loads(Path(lfd.job(adapter_eval).job.artifacts["predict_results"]).read_text())
    for key in ("predict_bleu-4", "predict_rouge-1", "predict_rouge-2", "predict_rouge-l"):
        assert isinstance(results[key], float)
    assert lfd.job(adapter_eval).job.spec["params"]["adapter_name_or_path"] == sft.job.artifacts["adapter"]
    assert "adapter_name_or_path" not in lfd.job(base_eval).job.spec["params"]
    assert any(h.startswith("metrics: bleu-4 ") for h in lfd.history(adapter_eval))

    table = lfd.ftctl("eval-compare", str(adapter_eval), str(base_eval))
    assert table.returncode == 0, table.stderr
    header = next(line for line in table.stdout.splitlines() if line.startswith("metric"))
    assert f"job {adapter_eval} (adapter of job {sft.job.id})" in header and f"job {base_eval} (base)" in header
    bleu = next(line for line in table.stdout.splitlines() if line.startswith("bleu-4")).split()
    assert len(bleu) == 3 and bleu[1] == f"{results['predict_bleu-4']:.2f}"
    assert "dataset: tiny_sft" in table.stdout

    merged = Path(lfd.job(export).job.artifacts["merged"])
    assert (merged / "config.json").is_file() and (merged / "model.safetensors").is_file()
    python = box.cli.parent / "python"
    code = ("import sys; from transformers import AutoModelForImageTextToText as M, AutoProcessor as P; "
            "m = M.from_pretrained(sys.argv[1]); P.from_pretrained(sys.argv[1]); "
            "print('params', sum(p.numel() for p in m.parameters()))")
    loaded = subprocess.run([str(python), "-c", code, str(merged)], capture_output=True, text=True,
                            env=stack.llamafactory_env(box.root / "lf"), timeout=600, check=False)
    assert loaded.returncode == 0 and loaded.stdout.startswith("params "), loaded.stderr[-3000:]


def test_deploy_without_a_vllm_engine_says_where_the_adapter_is_and_what_to_do(lfd: TrainDaemon, sft: Sft) -> None:
    r = lfd.ftctl("deploy", str(sft.job.id), "--name", "tiny")
    assert r.returncode == 1
    assert "no vLLM engine runs in this daemon" in r.stderr and sft.job.artifacts["adapter"] in r.stderr
    assert "vllm.model" in r.stderr


BAD_SPECS = [
    # (what, kind, spec changes, what the message must name)
    ("unknown key", "train", {"set": ["lora_rnak=8"]}, "unknown key 'lora_rnak': did you mean 'lora_rank'"),
    ("dataset missing", "train", {"dataset": "nope"}, "no dataset 'nope' in"),
    ("model dir missing", "train", {"set": ["model_name_or_path=/nonexistent/model"]},
     "model_name_or_path /nonexistent/model: directory not found"),
    ("job template unknown", "train", {"template": "qwen2vl_lora_sftt"},
     "unknown template 'qwen2vl_lora_sftt': did you mean 'qwen2vl_lora_sft'"),
    ("chat template unknown", "train", {"set": ["template=qwen9"]}, "template: 'qwen9' is not one of the templates"),
    ("stage unknown", "train", {"set": ["stage=sfft"]}, "stage: 'sfft' is not one of the allowed values"),
    ("stage and dataset do not fit", "train", {"set": ["stage=dpo"]}, "stage dpo needs ranking data"),
    ("eval template as train", "train", {"template": "qwen2vl_eval"}, "submit it with `ftctl eval qwen2vl_eval`"),
    ("nodes on one machine", "train", {"nodes": 2},
     "--nodes 2: this daemon trains on one machine; spanning nodes needs [cluster] backend = \"ray\""),
]


@pytest.mark.parametrize(("what", "kind", "changes", "expected"), BAD_SPECS, ids=[c[0] for c in BAD_SPECS])
def test_bad_spec_is_rejected_at_submit_in_under_a_second_with_the_reason(
        lfd: TrainDaemon, box: Box, what: str, kind: str, changes: dict[str, object], expected: str) -> None:
    spec: dict[str, object] = {"template": "qwen2vl_lora_sft", "dataset": "tiny_sft",
                               "set": box.train_sets("max_steps=20")}
    extra = changes.get("set")
    spec.update({k: v for k, v in changes.items() if k != "set"})
    if isinstance(extra, list):
        spec["set"] = [*spec["set"], *extra]  # type: ignore[misc]
    before = sum(lfd.c.call(Status(), StatusReply).counts.values())
    t0 = time.perf_counter()
    with pytest.raises(RemoteError) as exc:
        lfd.c.call(Submit(kind=kind, spec=spec), JobDetail)
    elapsed = time.perf_counter() - t0
    assert exc.value.code == "invalid_spec" and expected in exc.value.message, exc.value.message
    assert elapsed < 1.0, f"{what}: rejected after {elapsed:.2f}s"
    assert sum(lfd.c.call(Status(), StatusReply).counts.values()) == before  # nothing was queued


def test_a_missing_media_file_is_rejected_at_submit_naming_it(lfd: TrainDaemon, box: Box, tmp_path: Path) -> None:
    src = tmp_path / "gone"
    (src / "images").mkdir(parents=True)
    records = json.loads((box.src / "tiny_sft.json").read_text())
    for name in {img for r in records for img in r.get("images", [])}:
        (src / name).write_bytes((box.src / name).read_bytes())
    (src / "gone.json").write_text(json.dumps(records))
    assert lfd.ftctl("dataset", "add", "gone", str(src / "gone.json")).returncode == 0
    # `dataset add` keeps the handed-over images in the daemon's own tree: the member's files are never read
    # again, so what can go missing is the daemon's copy
    kept = (lfd.paths.state_dir / "datasets" / "gone.media").read_text().split()
    assert kept and all(str(src) not in p for p in kept)
    lost = Path(kept[0])
    lost.unlink()
    t0 = time.perf_counter()
    r = lfd.ftctl("train", "qwen2vl_lora_sft", "--dataset", "gone",
                  *[a for s in box.train_sets() for a in ("--set", s)], timeout=60)
    elapsed = time.perf_counter() - t0
    assert r.returncode == 2 and "dataset 'gone': 1 media files are gone" in r.stderr and str(lost) in r.stderr
    assert elapsed < 5.0  # the whole ftctl process, Python start-up included; the check itself is ms
    assert lfd.ftctl("dataset", "rm", "gone").returncode == 0
