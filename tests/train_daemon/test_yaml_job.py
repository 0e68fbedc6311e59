"""`ftctl train --yaml my.yaml`: a LLaMA-Factory user's own config, read by ftctl with her rights, checked by the
real daemon like a template (keys, the allow-list, paths against her rights, report_to) and run by the real
llamafactory-cli on the tiny Qwen2-VL.

The YAML is LLaMA-Factory's examples/train_lora/qwen2vl_lora_sft.yaml (that file is not in the installed wheel,
so it is written here in the example's own form, key for key) adjusted to the tiny model on two CPU cores:
the model is a folder of the caller's shell (``./model``), the dataset is the daemon's ``tiny_sft``, three
steps, no bf16, one worker, small images; ``video_max_pixels`` is left out as in every CPU test here."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.daemon_proc import ROOT
from tests.train_daemon.support import RUN_TIMEOUT_S, Box, TrainDaemon, daemon_with_dataset, job_id_of

pytestmark = pytest.mark.llamafactory

EXAMPLE = """\
### model
model_name_or_path: ./model
image_max_pixels: 12544
trust_remote_code: true

### method
stage: sft
do_train: true
finetuning_type: lora
lora_rank: 8
lora_target: all

### dataset
dataset: tiny_sft
template: qwen2_vl
cutoff_len: 512
max_samples: 1000
overwrite_cache: true
preprocessing_num_workers: 1
dataloader_num_workers: 0

### output
output_dir: saves/qwen2_vl-tiny/lora/sft
logging_steps: 1
save_steps: 500
plot_loss: true
overwrite_output_dir: true
save_only_model: false
report_to: none  # choices: [none, wandb, tensorboard, swanlab, mlflow]

### train
per_device_train_batch_size: 1
gradient_accumulation_steps: 1
learning_rate: 1.0e-4
num_train_epochs: 3.0
max_steps: 3
lr_scheduler_type: cosine
warmup_ratio: 0.1
bf16: false
ddp_timeout: 180000000
resume_from_checkpoint: null

### eval
# val_size: 0.1
# per_device_eval_batch_size: 1
# eval_strategy: steps
# eval_steps: 500
"""
NAME = "qwen2vl_lora_sft.yaml"


@pytest.fixture(scope="module")
def yd(box: Box) -> Iterator[TrainDaemon]:
    # the example sets trust_remote_code: true, which only an admin-trusted model folder may have
    with daemon_with_dataset(box, "yaml", train={"trusted_models": [str(box.model)]}) as d:
        yield d


@pytest.fixture()
def shell(box: Box, tmp_path: Path) -> Path:
    """The caller's working directory: her copy of the example, and the model as ./model."""
    (tmp_path / "model").symlink_to(box.model)
    (tmp_path / NAME).write_text(EXAMPLE)
    return tmp_path


def ftctl_in(d: TrainDaemon, cwd: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "tui.ftctl", "--home", str(d.home), "--config", str(d.config), *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env)


def with_changes(shell: Path, **changes: object) -> Path:
    config = yaml.safe_load(EXAMPLE)
    config.update(changes)
    path = shell / f"changed-{len(list(shell.glob('changed-*')))}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def test_a_llamafactory_example_yaml_runs_as_a_job_on_the_tiny_model(yd: TrainDaemon, shell: Path,
                                                                      box: Box) -> None:
    r = ftctl_in(yd, shell, "train", "--yaml", NAME, "--wait", timeout=RUN_TIMEOUT_S)
    job_id = job_id_of(r.stderr)
    job = yd.job(job_id).job
    assert r.returncode == 0 and job.state == "succeeded", r.stderr + yd.log_tail(job_id)
    job_dir = yd.paths.state_dir / "jobs" / str(job_id)
    params = job.spec["params"]
    assert job.spec["template"] == NAME and job.name == f"{NAME} on tiny_sft"
    assert params["model_name_or_path"] == str(shell / "model")  # relative to the caller's shell, as LF reads it
    assert params["output_dir"] == str(job_dir / "output") and params["overwrite_output_dir"] is False
    assert params["report_to"] == "none" and "resume_from_checkpoint" not in params  # null: LF's default
    assert params["max_steps"] == 3 and params["trust_remote_code"] is True and params["dataset"] == "tiny_sft"
    text = (job_dir / "job.yaml").read_text()
    assert text.startswith(f"# ftmllm job: your YAML {NAME} (train), gpus 1\n")
    assert "# set by the daemon instead of the YAML's own: output_dir, overwrite_output_dir\n" in text
    assert not (shell / "saves").exists()  # the example's output_dir was not used, on either side
    assert [p.step for p in yd.points(job_id)] == [1, 2, 3]
    adapter = Path(job.artifacts["adapter"])
    assert adapter == job_dir / "output" and (adapter / "adapter_model.safetensors").is_file()


def test_a_yaml_is_refused_with_one_line_per_problem_naming_the_file_and_key(yd: TrainDaemon, shell: Path,
                                                                             tmp_path: Path) -> None:
    cases = {
        "report_to wandb: wandb would send the training metrics and config off this server": {"report_to": "wandb"},
        "report_to all: every installed integration, wandb and mlflow included,": {"report_to": "all"},
        # the LLaMA-Factory venv of the tests has no TensorBoard: said at submit, not after 15 s of imports
        "report_to tensorboard: neither tensorboard nor tensorboardX is installed beside LLaMA-Factory 0.9.5":
            {"report_to": "tensorboard"},
        "key hub_token is refused: a secret": {"hub_token": "hf_x"},
        "key torch_compile is not a training knob this server takes": {"torch_compile": True},
        "unknown key 'lora_rnak': did you mean 'lora_rank'?": {"lora_rnak": 4},
        f"cannot read model_name_or_path {tmp_path}": {"model_name_or_path": str(tmp_path)},
        "dataset: no dataset 'mllm_demo'": {"dataset": "mllm_demo"},
    }
    for expected, changes in cases.items():
        path = with_changes(shell, **changes)
        r = ftctl_in(yd, shell, "train", "--yaml", path.name)
        assert r.returncode == 2 and expected in r.stderr, (expected, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    both = ftctl_in(yd, shell, "train", "qwen2vl_lora_sft", "--yaml", NAME)
    assert both.returncode == 2 and "not both" in both.stderr
    neither = ftctl_in(yd, shell, "train")
    assert neither.returncode == 2 and "--yaml FILE" in neither.stderr
    missing = ftctl_in(yd, shell, "train", "--yaml", "nope.yaml")
    assert missing.returncode == 2 and "cannot read nope.yaml" in missing.stderr

