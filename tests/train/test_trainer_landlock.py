"""The real `llamafactory-cli` (0.9.5, CPU, its own venv) trains the tiny Qwen2-VL confined by Landlock with the
trainer's rules (daemon/train/sandbox.py), as the daemon would start it: what it needs is all it can reach,
and the store beside its job folder stays out of reach."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from pathlib import Path

import pytest

from daemon.children.landlock import abi_version, wrap
from daemon.core.atomic import write_atomic
from daemon.jobs.base import Caller
from daemon.train.access import Policy, path_problems
from daemon.train.datasets import add_dataset
from daemon.train.failures import read_log_tail
from daemon.train.launch import TrainProcess, build_argv, build_env, resolve_cli, saved_state
from daemon.train.sandbox import trainer_rules
from daemon.train.spec import render
from daemon.train.validate import check_spec, load_catalog
from shared.config import TrainConfig
from tests.engines import stack

pytestmark = [pytest.mark.llamafactory, pytest.mark.skipif(abi_version() <= 0, reason="this kernel has no Landlock")]

ROOT = Path(__file__).resolve().parents[2]
CPU = ("bf16=false", "image_max_pixels=12544", "cutoff_len=512", "preprocessing_num_workers=1",
       "dataloader_num_workers=0", "video_max_pixels=")


def test_a_confined_real_trainer_trains_and_saves_its_adapter(tmp_path: Path) -> None:
    cli = resolve_cli(str(stack.llamafactory_venv()))
    model = stack.build_tiny_model(tmp_path / "models" / "tiny")
    src = stack.build_tiny_dataset(tmp_path / "alice" / "src", records=4)
    state = tmp_path / "state"
    datasets = state / "datasets"
    add_dataset("tiny_sft", src / "tiny_sft.json", dataset_dir=datasets)
    store = state / "ftmllm.sqlite"
    store.write_text("every job and its owner")
    job = state / "jobs" / "1"
    policy = Policy.from_config(TrainConfig(model_roots=[str(tmp_path / "models")]), jobs_dir=state / "jobs",
                                deepspeed_dir=ROOT / "configs" / "deepspeed")
    spec = render("qwen2vl_lora_sft", templates_dir=ROOT / "configs" / "llamafactory", job_dir=job,
                  dataset_dir=datasets, datasets=["tiny_sft"], gpus=0,
                  overrides=[f"model_name_or_path={model}", *CPU, "max_steps=3", "save_steps=3",
                             "gradient_accumulation_steps=1"])
    assert path_problems(spec.params, policy=policy, caller=Caller(user="alice", uid=5001), job_of=lambda _: None) \
        == []
    lf_env = stack.llamafactory_env(tmp_path / "lf")
    check_spec(spec, catalog=load_catalog(), dataset_dir=datasets, env=lf_env)
    write_atomic(job / "job.yaml", spec.yaml_text, mode=0o600)
    rules = trainer_rules(cli=cli, job_dir=job, params=spec.params, policy=policy, datasets_dir=datasets,
                          env=lf_env)
    env = {**build_env(base=lf_env, gpus=[], spec_env=spec.env), **rules.env}
    argv = wrap(build_argv(cli, "train", job / "job.yaml"), read=rules.read, write=rules.write, tmp=rules.tmp)
    proc = TrainProcess.start(argv, env, log_path=job / "job.log", cwd=job)
    rc = asyncio.run(proc.wait())
    assert rc == 0, read_log_tail(job / "job.log")[-4000:]
    state_after = saved_state(spec.output_dir)
    assert state_after.finished and state_after.adapter and state_after.global_step == 3
    # the same rules, the trainer's own Python: the store next to the job folder cannot be read
    python = str(Path(cli).parent / "python")
    probe = wrap([python, "-c", f"open({str(store)!r}).read()"], read=rules.read, write=rules.write, tmp=rules.tmp)
    denied = subprocess.run(probe, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert denied.returncode == 1 and "PermissionError" in denied.stderr, denied.stderr[-2000:]
    assert store.read_text() == "every job and its owner"
    assert json.loads((spec.output_dir / "trainer_state.json").read_text())["global_step"] == 3
    assert os.listdir(job / "tmp")  # its caches went into its own folder
