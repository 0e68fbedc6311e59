"""The training modules against the real `llamafactory-cli` (LLaMA-Factory 0.9.5 on CPU, its own venv) and
the tiny Qwen2-VL: render → validate → launch → tail progress, graceful stop, resume after SIGKILL, export,
eval. Not yet through the daemon (the lead wires these modules into its job runner)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from daemon.core.atomic import write_atomic
from daemon.train.datasets import add_dataset
from daemon.train.failures import explain_failure, read_log_tail
from daemon.train.launch import TrainProcess, build_argv, build_env, prepare_resume, resolve_cli, saved_state
from daemon.train.progress import LossPoint, TrainerLogTail
from daemon.train.spec import RenderedSpec, render
from daemon.train.validate import check_spec, load_catalog
from tests.engines import stack

pytestmark = pytest.mark.llamafactory

TEMPLATES = Path(__file__).resolve().parents[2] / "configs" / "llamafactory"
# What makes the Qwen2-VL templates run on 2 CPU cores in seconds (the rest is the template's).
CPU = ("bf16=false", "image_max_pixels=12544", "cutoff_len=512", "preprocessing_num_workers=1",
       "dataloader_num_workers=0", "video_max_pixels=", "trust_remote_code=")
TRAIN = (*CPU, "max_steps=20", "save_steps=5", "gradient_accumulation_steps=1")


@dataclass
class Box:
    root: Path
    cli: str
    model: Path
    datasets: Path
    env: dict[str, str]


@dataclass
class Run:
    spec: RenderedSpec
    proc: TrainProcess
    points: list[LossPoint]
    live_points: int  # points that arrived while the trainer was still running
    rc: int


@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory) -> Box:
    root = tmp_path_factory.mktemp("lf")
    cli = resolve_cli(str(stack.llamafactory_venv()))
    model = stack.build_tiny_model(root / "model")
    src = stack.build_tiny_dataset(root / "src", records=8)
    datasets = root / "datasets"
    add_dataset("tiny_sft", src / "tiny_sft.json", dataset_dir=datasets)
    return Box(root=root, cli=cli, model=model, datasets=datasets, env=stack.llamafactory_env(root))


def _spec(box: Box, job: str, template: str, overrides: Sequence[str], datasets: Sequence[str]) -> RenderedSpec:
    spec = render(template, templates_dir=TEMPLATES, job_dir=box.root / job, dataset_dir=box.datasets,
                  overrides=[f"model_name_or_path={box.model}", *overrides], datasets=datasets, gpus=0)
    check_spec(spec, catalog=load_catalog(), dataset_dir=box.datasets, env=box.env)
    write_atomic(box.root / job / "job.yaml", spec.yaml_text, mode=0o600)
    return spec


def _start(box: Box, spec: RenderedSpec, job: str) -> TrainProcess:
    env = build_env(base=box.env, gpus=[], spec_env=spec.env)
    return TrainProcess.start(build_argv(box.cli, spec.command, box.root / job / "job.yaml"), env,
                              log_path=box.root / job / "train.log")


async def _follow(proc: TrainProcess, spec: RenderedSpec, *, seen: Sequence[tuple[int, str]] = (),
                  stop_at: int | None = None, kill_at: int | None = None) -> tuple[list[LossPoint], int]:
    tail = TrainerLogTail(spec.output_dir / "trainer_log.jsonl", seen=seen)  # type: ignore[arg-type]
    points: list[LossPoint] = []
    live = 0
    async for p in tail.follow(interval=0.05, until=lambda: proc.returncode is not None):
        points.append(p)
        live += proc.returncode is None
        if stop_at is not None and p.loss is not None and p.step >= stop_at:
            outcome = await proc.stop(graceful_s=120)
            assert outcome.how == "graceful", (outcome, read_log_tail(proc.log_path)[-3000:])
            stop_at = None
        if kill_at is not None and p.step >= kill_at:
            os.killpg(proc.pgid, signal.SIGKILL)  # what a daemon crash under systemd does to its children
            kill_at = None
    return points, live


def _run(box: Box, job: str, template: str, overrides: Sequence[str], datasets: Sequence[str] = ("tiny_sft",),
         **follow: object) -> Run:
    spec = _spec(box, job, template, overrides, datasets)
    proc = _start(box, spec, job)

    async def go() -> tuple[list[LossPoint], int, int]:
        points, live = await _follow(proc, spec, **follow)  # type: ignore[arg-type]
        return points, live, await proc.wait()

    points, live, rc = asyncio.run(go())
    if rc not in (0, -signal.SIGKILL):
        pytest.fail(f"{job}: {explain_failure(read_log_tail(proc.log_path), params=spec.params, returncode=rc)}")
    return Run(spec=spec, proc=proc, points=points, live_points=live, rc=rc)


@pytest.fixture(scope="module")
def trained(box: Box) -> Run:
    return _run(box, "sft", "qwen2vl_lora_sft", TRAIN)


def test_20_step_lora_sft_streams_loss_points_and_saves_the_adapter(trained: Run) -> None:
    losses = [p for p in trained.points if p.loss is not None]
    assert [p.step for p in losses] == list(range(1, 21))
    assert trained.live_points >= 10  # they arrive while it trains, not at the end
    assert all(p.total_steps == 20 and p.lr is not None and p.remaining_s is not None for p in losses)
    st = saved_state(trained.spec.output_dir)
    assert trained.rc == 0 and st.finished and st.global_step == 20 and st.adapter
    assert st.checkpoints == (10, 15, 20)  # save_total_limit 3 kept the newest three


def test_graceful_stop_saves_the_adapter_early(box: Box) -> None:
    run = _run(box, "stop", "qwen2vl_lora_sft", TRAIN, stop_at=4)
    st = saved_state(run.spec.output_dir)
    assert run.rc == 0 and st.adapter and not st.finished
    assert st.global_step is not None and 4 <= st.global_step < 20
    assert st.describe().endswith(f"at step {st.global_step} of 20 (stopped early)")


def test_resume_after_sigkill_finishes_with_the_requested_steps(box: Box) -> None:
    first = _run(box, "resume", "qwen2vl_lora_sft", TRAIN, kill_at=12)
    assert first.rc == -signal.SIGKILL
    before = saved_state(first.spec.output_dir)
    assert not before.adapter and before.checkpoints and before.checkpoints[-1] in (5, 10)
    info = prepare_resume(first.spec.output_dir)
    assert info.checkpoint == before.last_checkpoint
    seen = [(p.step, p.kind) for p in first.points]  # what the daemon has stored already
    proc = _start(box, first.spec, "resume")

    async def go() -> tuple[list[LossPoint], int]:
        points, _ = await _follow(proc, first.spec, seen=seen)
        return points, await proc.wait()

    points, rc = asyncio.run(go())
    assert rc == 0, read_log_tail(proc.log_path)[-3000:]
    assert f"Resuming training from {info.checkpoint}" in (box.root / "resume" / "train.log").read_text()
    steps = [p.step for p in points if p.loss is not None]
    assert steps and steps[0] > max(s for s, k in seen if k == "train") and steps[-1] == 20  # no repeats
    after = saved_state(first.spec.output_dir)
    assert after.finished and after.global_step == 20


def test_export_merges_into_a_model_that_loads(box: Box, trained: Run) -> None:
    run = _run(box, "export", "qwen2vl_export", [f"adapter_name_or_path={trained.spec.output_dir}"], datasets=())
    merged = run.spec.output_dir
    assert run.rc == 0 and (merged / "config.json").is_file() and (merged / "model.safetensors").is_file()
    python = Path(box.cli).parent / "python"
    code = ("import sys; from transformers import AutoModelForImageTextToText as M, AutoProcessor as P; "
            "m = M.from_pretrained(sys.argv[1]); P.from_pretrained(sys.argv[1]); "
            "print('params', sum(p.numel() for p in m.parameters()))")
    out = subprocess.run([str(python), "-c", code, str(merged)], capture_output=True, text=True, env=box.env,
                         timeout=300, check=False)
    assert out.returncode == 0 and out.stdout.startswith("params "), out.stderr[-3000:]


def test_eval_writes_bleu_and_rouge(box: Box, trained: Run) -> None:
    run = _run(box, "eval", "qwen2vl_eval", [*CPU, f"adapter_name_or_path={trained.spec.output_dir}",
                                             "max_new_tokens=8", "max_samples=4"])
    results = json.loads((run.spec.output_dir / "predict_results.json").read_text())
    for key in ("predict_bleu-4", "predict_rouge-1", "predict_rouge-2", "predict_rouge-l", "predict_runtime",
                "predict_samples_per_second"):
        assert isinstance(results[key], float), key
    lines = (run.spec.output_dir / "generated_predictions.jsonl").read_text().splitlines()
    assert len(lines) == 4 and {"prompt", "predict", "label"} <= set(json.loads(lines[0]))


def test_validator_rejects_in_milliseconds_what_the_real_cli_rejects_after_its_imports(box: Box) -> None:
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="unknown key 'lora_rnak': did you mean 'lora_rank'"):
        _spec(box, "badkey", "qwen2vl_lora_sft", [*TRAIN, "lora_rnak=8"], ["tiny_sft"])
    ours = time.perf_counter() - t0
    spec = render("qwen2vl_lora_sft", templates_dir=TEMPLATES, job_dir=box.root / "badkey",
                  dataset_dir=box.datasets, overrides=[f"model_name_or_path={box.model}", *TRAIN, "lora_rnak=8"],
                  datasets=["tiny_sft"], gpus=0)
    write_atomic(box.root / "badkey" / "job.yaml", spec.yaml_text, mode=0o600)
    t0 = time.perf_counter()
    proc = _start(box, spec, "badkey")
    rc = asyncio.run(proc.wait())
    theirs = time.perf_counter() - t0
    failure = explain_failure(read_log_tail(proc.log_path), params=spec.params, returncode=rc)
    assert rc == 1 and failure.kind == "unknown_keys" and "lora_rnak" in failure.message
    assert ours < 1.0 < theirs
