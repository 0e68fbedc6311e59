"""Datasets, templates and submit-time refusals through the real daemon and the real ftctl, without running a
trainer (no LLaMA-Factory venv needed)."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.client import RemoteError
from shared.protocol import DatasetList, DatasetsReply, JobDetail, Submit
from tests.engines import stack
from tests.train_daemon.support import TrainDaemon, start_with_toml

MISSING_CLI = "/nonexistent/lf-venv/bin/llamafactory-cli"


@pytest.fixture(scope="module")
def plain() -> Iterator[TrainDaemon]:
    """A daemon whose [train] llamafactory_cli points nowhere."""
    d = start_with_toml("ds", f'[train]\nllamafactory_cli = "{MISSING_CLI}"\n[hotfolder]\nenabled = false\n')
    try:
        yield d
    finally:
        d.close()


@pytest.fixture
def src() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="ftsrc", dir="/tmp"))
    yield stack.build_tiny_dataset(path, records=6)
    shutil.rmtree(path, ignore_errors=True)


def test_dataset_add_names_the_bad_record_and_registers_nothing(plain: TrainDaemon, src: Path) -> None:
    records = json.loads((src / "tiny_sft.json").read_text())
    records[4]["messages"][0]["content"] = "<image><image>two tags, one image"
    bad = src / "bad.json"
    bad.write_text(json.dumps(records))
    r = plain.ftctl("dataset", "add", "bad", str(bad), timeout=120)
    assert r.returncode == 2 and "record 4" in r.stderr and "<image>" in r.stderr, r.stderr
    assert plain.c.call(DatasetList(), DatasetsReply).datasets == []


def test_dataset_add_list_and_remove(plain: TrainDaemon, src: Path) -> None:
    added = plain.ftctl("dataset", "add", "shapes", str(src / "tiny_sft.json"), timeout=120)
    assert added.returncode == 0, added.stderr
    assert added.stdout.strip() == "dataset 'shapes' added: 6 records, 6 images, sft; train with --dataset shapes"
    ranked = plain.ftctl("dataset", "add", "prefs", str(src / "tiny_dpo.json"), timeout=120)
    assert ranked.returncode == 0 and "ranking (for dpo/rm)" in ranked.stdout, ranked.stderr
    again = plain.ftctl("dataset", "add", "shapes", str(src / "tiny_sft.json"), timeout=120)
    assert again.returncode == 2 and "already exists" in again.stderr and "--replace" in again.stderr
    listing = json.loads(plain.ftctl("dataset", "list", "--json").stdout)
    assert [(d["name"], d["records"], d["images"], d.get("ranking", False)) for d in listing] == [
        ("prefs", 6, 6, True), ("shapes", 6, 6, False)]
    registered = json.loads((plain.paths.state_dir / "datasets" / "dataset_info.json").read_text())
    assert set(registered) == {"prefs", "shapes"}
    removed = plain.ftctl("dataset", "rm", "shapes")
    assert removed.returncode == 0 and "removed" in removed.stdout
    assert [d.name for d in plain.c.call(DatasetList(), DatasetsReply).datasets] == ["prefs"]
    assert plain.ftctl("dataset", "rm", "shapes").returncode == 2


def test_templates_lists_each_with_its_command_and_a_description(plain: TrainDaemon) -> None:
    r = plain.ftctl("templates")
    assert r.returncode == 0
    rows = {line.split()[0]: line for line in r.stdout.splitlines()[1:] if line.strip()}
    assert "ftctl train (sft)" in rows["qwen2vl_lora_sft"] and "ftctl train (dpo)" in rows["qwen2vl_lora_dpo"]
    assert "ftctl eval" in rows["qwen2vl_eval"] and "ftctl export" in rows["qwen2vl_export"]
    assert "LoRA SFT of Qwen2-VL" in rows["qwen2vl_lora_sft"]


def test_train_without_llamafactory_is_refused_at_submit_with_the_config_key_to_set(plain: TrainDaemon) -> None:
    r = plain.ftctl("train", "qwen2vl_lora_sft", "--dataset", "anything")
    assert r.returncode == 2
    assert f"llamafactory-cli not found at {MISSING_CLI}; set [train] llamafactory_cli" in r.stderr


def test_a_spec_from_the_training_form_with_typed_overrides_is_checked_the_same_way(plain: TrainDaemon) -> None:
    # ftui's form sends overrides as a mapping with typed values, and one dataset name as a string
    with pytest.raises(RemoteError) as exc:
        plain.c.call(Submit(kind="train", spec={"template": "qwen2vl_lora_sft", "set": {"learning_rate": 1e-4},
                                                "dataset": "prefs", "gpus": 1, "colour": "red"}), JobDetail)
    assert exc.value.code == "invalid_spec" and "colour" in exc.value.message
    assert "template, set, dataset, gpus, min_free_gib, adapter_job" in exc.value.message
