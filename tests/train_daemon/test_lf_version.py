"""The real daemon checks specs against the LLaMA-Factory its train.llamafactory_cli runs: a key that only a
newer version has is accepted when that version is configured, and a job that asks for TensorBoard shows the
`tensorboard --logdir` line in `ftctl show`.

The newer version is tests/train/lf_stub.py's recorded-fixture stand-in for a release we cannot download here
(the installed LLaMA-Factory's own dataclass modules plus one field, another version number, and a
``tensorboard`` module so the probe finds one); its ``llamafactory-cli`` trains nothing, so the job fails
after it starts, which is all this test needs of it."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.daemon_proc import wait_for
from tests.engines import stack
from tests.train import lf_stub
from tests.train_daemon.support import Box, TrainDaemon, daemon_with_dataset
from tests.train_daemon.test_yaml_job import EXAMPLE, ftctl_in

pytestmark = pytest.mark.llamafactory

GENERATE_TIMEOUT_S = 600.0  # importing LLaMA-Factory on a loaded 2-core box


@pytest.fixture(scope="module")
def stub_cli() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="ftlfstub", dir="/tmp"))
    try:
        yield lf_stub.build_stub(root, stack.llamafactory_venv() / "bin" / "python", tensorboard=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def newer(box: Box, stub_cli: Path) -> Iterator[TrainDaemon]:
    # an admin who upgraded LLaMA-Factory lets members use the knob it added
    with daemon_with_dataset(box, "lfnew", train={"llamafactory_cli": str(stub_cli),
                                                  "extra_allowed_keys": [lf_stub.NEW_KEY],
                                                  "trusted_models": [str(box.model)]}) as d:
        yield d


def test_a_key_added_in_a_newer_llamafactory_is_accepted_when_that_version_is_configured(
        newer: TrainDaemon, box: Box, tmp_path: Path) -> None:
    (tmp_path / "model").symlink_to(box.model)
    config = yaml.safe_load(EXAMPLE)
    config.update({lf_stub.NEW_KEY: 3, "report_to": "tensorboard"})
    (tmp_path / "new.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    cache = newer.paths.state_dir / "llamafactory"

    r = ftctl_in(newer, tmp_path, "train", "--yaml", "new.yaml")
    if r.returncode != 0:  # the first use of 0.9.99 starts generating its catalogue; the answer cannot wait
        assert r.returncode == 2 and "the key catalogue of LLaMA-Factory 0.9.99" in r.stderr, r.stderr
        assert "submit again" in r.stderr and len(r.stderr.strip().splitlines()) == 1
        wait_for(lambda: list(cache.glob("keys-*.json")), GENERATE_TIMEOUT_S, "the catalogue of 0.9.99")
        r = ftctl_in(newer, tmp_path, "train", "--yaml", "new.yaml")
    assert r.returncode == 0, r.stderr
    job_id = int(r.stdout.strip().splitlines()[-1])
    assert [p.name for p in cache.iterdir()] == ["keys-llamafactory-0.9.99-transformers-5.6.0.json"]
    job_yaml = (newer.paths.state_dir / "jobs" / str(job_id) / "job.yaml").read_text()
    assert f"{lf_stub.NEW_KEY}: 3\n" in job_yaml and "report_to: tensorboard\n" in job_yaml

    job = newer.wait_job(job_id)
    assert job.state == "failed"  # the stub trains nothing
    show = newer.ftctl("show", str(job_id))
    logdir = newer.paths.state_dir / "jobs" / str(job_id) / "tensorboard"
    assert f"TensorBoard logs (report_to: tensorboard): tensorboard --logdir {logdir}" in show.stdout, show.stdout
