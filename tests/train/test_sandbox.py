"""The trainer's Landlock rules (daemon/train/sandbox.py) on a real child: a stand-in trainer started as the
daemon starts one reads its model, adapter, datasets and their images, writes its own job folder, and cannot
read the store, another job's folder or a member's files, nor write anywhere else. The real LLaMA-Factory
under the same rules: tests/train/test_trainer_landlock.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from daemon.children.landlock import abi_version, wrap
from daemon.train.access import Policy
from daemon.train.datasets import add_dataset
from daemon.train.sandbox import python_folders, trainer_rules
from shared.config import TrainConfig
from tests.fixtures.tiny_dataset import write_dataset

pytestmark = pytest.mark.skipif(abi_version() <= 0, reason="this kernel has no Landlock")
DEEPSPEED = Path(__file__).resolve().parents[2] / "configs" / "deepspeed"

PROBE = r"""
import json, os, sys, tempfile
def can(fn):
    try:
        fn()
        return True
    except OSError:
        return False
reads, writes = json.loads(sys.argv[1]), json.loads(sys.argv[2])
print(json.dumps({"read": {p: can(lambda p=p: open(p, "rb").read()) for p in reads},
                  "write": {p: can(lambda p=p: open(p, "w").write("x")) for p in writes},
                  "tmpdir": tempfile.gettempdir(), "datasets_cache": os.environ.get("HF_DATASETS_CACHE")}))
"""


def test_the_trainer_reads_what_its_job_names_and_writes_only_its_own_folder(tmp_path: Path) -> None:
    state = tmp_path / "state"
    jobs = state / "jobs"
    store = state / "ftmllm.sqlite"
    for d in (jobs / "1" / "output", jobs / "2" / "output", jobs / "3"):
        d.mkdir(parents=True)
    store.write_text("every job and its owner")
    (jobs / "1" / "output" / "adapter_config.json").write_text("{}")  # a job this one does not name
    (jobs / "2" / "output" / "adapter_config.json").write_text("{}")  # the adapter it names
    model = tmp_path / "models" / "m"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    private = tmp_path / "home" / "bob" / "notes.txt"
    private.parent.mkdir(parents=True)
    private.write_text("bob's")
    src = write_dataset(tmp_path / "alice" / "src", records=2)
    datasets = state / "datasets"
    add_dataset("tiny_sft", src["sft"], dataset_dir=datasets)
    image = src["dataset_dir"] / "images" / "img_0.png"
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "pyvenv.cfg").write_text(f"home = {Path(sys.base_prefix) / 'bin'}\n")
    cli = venv / "bin" / "trainer"
    cli.write_text(f"#!{os.path.realpath(sys.executable)} -I\n{PROBE}")
    cli.chmod(0o755)

    policy = Policy.from_config(TrainConfig(model_roots=[str(tmp_path / "models")]), jobs_dir=jobs,
                                deepspeed_dir=DEEPSPEED)
    params = {"model_name_or_path": str(model), "adapter_name_or_path": str(jobs / "2" / "output"),
              "dataset": "tiny_sft"}
    job = jobs / "3"
    rules = trainer_rules(cli=str(cli), job_dir=job, params=params, policy=policy, datasets_dir=datasets,
                          env={"HF_HOME": str(tmp_path / "hf")})
    allowed = [model / "config.json", jobs / "2" / "output" / "adapter_config.json", datasets / "tiny_sft.json",
               image, DEEPSPEED / "ds_z3_config.json"]
    refused = [store, jobs / "1" / "output" / "adapter_config.json", private, src["sft"].parent / "tiny_dpo.json"]
    writable = [job / "out.txt"]
    unwritable = [state / "x", datasets / "x", model / "x", jobs / "2" / "output" / "x", tmp_path / "x"]
    argv = wrap([str(cli), json.dumps([str(p) for p in allowed + refused]),
                 json.dumps([str(p) for p in writable + unwritable])],
                read=rules.read, write=rules.write, tmp=rules.tmp)
    r = subprocess.run(argv, env={**os.environ, **rules.env}, capture_output=True, text=True, timeout=60,
                       check=False)
    assert r.returncode == 0, r.stderr
    seen = json.loads(r.stdout)
    assert seen["read"] == {str(p): p in allowed for p in allowed + refused}
    assert seen["write"] == {str(p): p in writable for p in writable + unwritable}
    assert seen["tmpdir"] == str(job / "tmp") and seen["datasets_cache"] == str(job / "tmp" / "datasets")
    assert store.read_text() == "every job and its owner" and not (datasets / "x").exists()


def test_python_folders_are_the_venv_and_its_base_installation(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "pyvenv.cfg").write_text("home = /opt/python3.11/bin\ninclude-system-site-packages = false\n")
    cli = venv / "bin" / "llamafactory-cli"
    cli.write_text(f"#!{venv}/bin/python\n")
    assert python_folders(str(cli))[:3] == [str(venv), str(venv), "/opt/python3.11"]
