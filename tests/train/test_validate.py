"""Submit-time validation against the key catalog generated from the real LLaMA-Factory 0.9.5."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import pytest

from daemon.train.datasets import add_dataset
from daemon.train.spec import RenderedSpec, render
from daemon.train.validate import DEFAULT_CATALOG, check_spec, load_catalog, validate_params
from shared.overrides import SpecProblem
from tests.fixtures.tiny_dataset import write_dataset

ROOT = Path(__file__).resolve().parents[2]
TEMPLATES = ROOT / "configs" / "llamafactory"
CATALOG = load_catalog()


@pytest.fixture
def env(tmp_path: Path) -> dict[str, Path]:
    src = write_dataset(tmp_path / "src", records=3)
    ds = tmp_path / "datasets"
    add_dataset("tiny_sft", src["sft"], dataset_dir=ds)
    add_dataset("tiny_dpo", src["dpo"], dataset_dir=ds)
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "tokenizer.json").write_text("{}")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    return {"ds": ds, "model": model, "adapter": adapter, "job": tmp_path / "job", "src": src["dataset_dir"]}


def _spec(env: dict[str, Path], template: str = "qwen2vl_lora_sft", overrides: tuple[str, ...] = (),
          datasets: tuple[str, ...] = ("tiny_sft",)) -> RenderedSpec:
    return render(template, templates_dir=TEMPLATES, job_dir=env["job"], dataset_dir=env["ds"],
                  overrides=[f"model_name_or_path={env['model']}", *overrides], datasets=datasets)


def _problems(env: dict[str, Path], **kw: object) -> str:
    with pytest.raises(SpecProblem) as err:
        check_spec(_spec(env, **kw), catalog=CATALOG, dataset_dir=env["ds"])  # type: ignore[arg-type]
    return str(err.value)


def test_catalog_records_its_llamafactory_version_and_knows_qwen2_vl() -> None:
    data = json.loads(DEFAULT_CATALOG.read_text())
    assert data["llamafactory_version"] == CATALOG.llamafactory_version == "0.9.5"
    assert "qwen2_vl" in CATALOG.templates and "dpo" in CATALOG.stages
    assert {"output_dir", "lora_rank", "image_max_pixels"} <= CATALOG.accepted("train")
    assert "output_dir" not in CATALOG.accepted("export") and "export_dir" in CATALOG.accepted("export")


def test_every_shipped_template_is_valid(env: dict[str, Path]) -> None:
    for template, extra, datasets in [
        ("qwen2vl_lora_sft", (), ("tiny_sft",)),
        ("qwen2_5vl_lora_sft", (), ("tiny_sft",)),
        ("qwen2vl_lora_dpo", (), ("tiny_dpo",)),
        ("qwen2vl_eval", (f"adapter_name_or_path={env['adapter']}",), ("tiny_sft",)),
        ("qwen2vl_export", (f"adapter_name_or_path={env['adapter']}",), ()),
    ]:
        spec = _spec(env, template, extra, datasets)
        assert validate_params(spec.params, command=spec.command, catalog=CATALOG, dataset_dir=env["ds"]) == []


def test_each_bad_spec_is_rejected_in_well_under_a_second_with_its_reason(env: dict[str, Path]) -> None:
    cases = {
        "unknown key": ({"overrides": ("lora_rnak=8",)}, "unknown key 'lora_rnak': did you mean 'lora_rank'?"),
        "missing dataset": ({"datasets": ("nosuch",)}, "no dataset 'nosuch' in"),
        "missing model": ({"overrides": ("model_name_or_path=/nowhere/model",)},
                          "model_name_or_path /nowhere/model: directory not found"),
        "unknown template": ({"overrides": ("template=qwen2vl",)},
                             "template: 'qwen2vl' is not one of the templates of LLaMA-Factory 0.9.5; did you "
                             "mean 'qwen2_vl'?"),
        "unknown stage": ({"overrides": ("stage=sftt",)}, "stage: 'sftt' is not one of the allowed values; did "
                                                          "you mean 'sft'?"),
        "wrong type": ({"overrides": ("lora_rank=eight",)},
                       "lora_rank: 'eight' is not an integer; write e.g. --set lora_rank=8"),
        "ranking data for sft": ({"datasets": ("tiny_dpo",)}, "dataset 'tiny_dpo' is ranking data, but stage sft"),
    }
    for name, (kw, expected) in cases.items():
        t0 = time.perf_counter()
        text = _problems(env, **kw)
        elapsed = time.perf_counter() - t0
        assert expected in text, name
        assert elapsed < 1.0, f"{name}: {elapsed:.3f}s"


def test_missing_media_files_are_named(env: dict[str, Path]) -> None:
    (env["src"] / "images" / "img_1.png").unlink()
    text = _problems(env)
    assert f"dataset 'tiny_sft': 1 media files are gone ({env['src'] / 'images' / 'img_1.png'})" in text
    # a dataset placed by hand (no media list from `dataset add`): its records are read, the index named
    (env["ds"] / "tiny_sft.media").unlink()
    assert "dataset 'tiny_sft': 1 media files are gone (record 1: " in _problems(env)


def test_model_without_tokenizer_or_config(env: dict[str, Path]) -> None:
    (env["model"] / "tokenizer.json").unlink()
    assert "has no tokenizer files" in _problems(env)
    (env["model"] / "config.json").unlink()
    assert "has no config.json" in _problems(env)


def test_hub_id_is_checked_against_the_cache_only_offline(env: dict[str, Path], tmp_path: Path) -> None:
    spec = _spec(env, overrides=("model_name_or_path=Qwen/Qwen2-VL-7B-Instruct",))
    online = validate_params(spec.params, command="train", catalog=CATALOG, dataset_dir=env["ds"], env={})
    assert online == []
    offline_env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    offline = validate_params(spec.params, command="train", catalog=CATALOG, dataset_dir=env["ds"], env=offline_env)
    assert len(offline) == 1 and "not in the Hugging Face cache" in offline[0]
    (tmp_path / "hf" / "hub" / "models--Qwen--Qwen2-VL-7B-Instruct" / "snapshots").mkdir(parents=True)
    assert validate_params(spec.params, command="train", catalog=CATALOG, dataset_dir=env["ds"],
                           env=offline_env) == []


def test_missing_adapter_and_deepspeed_file(env: dict[str, Path]) -> None:
    text = _problems(env, overrides=("adapter_name_or_path=/no/adapter", "deepspeed=/no/ds.json"))
    assert "adapter_name_or_path /no/adapter: directory not found" in text
    assert "deepspeed /no/ds.json: file not found" in text


def test_training_key_in_an_export_is_rejected(env: dict[str, Path]) -> None:
    text = _problems(env, template="qwen2vl_export", overrides=("learning_rate=1e-4",), datasets=())
    assert "unknown key 'learning_rate': `llamafactory-cli export` does not take it" in text


def test_llamafactory_consistency_rules(env: dict[str, Path]) -> None:
    assert "needs predict_with_generate: true" in _problems(env, template="qwen2vl_eval",
                                                               overrides=("predict_with_generate=false",))
    assert "works only with stage sft" in _problems(env, template="qwen2vl_lora_dpo",
                                                    overrides=("predict_with_generate=true",),
                                                    datasets=("tiny_dpo",))
    assert "a training job needs a dataset" in _problems(env, datasets=())
    assert "OmegaConf" in _problems(env, overrides=("run_name=${oops}",))


def test_report_to_tensorboard_needs_tensorboard_beside_the_configured_llamafactory(env: dict[str, Path]) -> None:
    spec = _spec(env, overrides=("report_to=tensorboard",))
    missing = dataclasses.replace(CATALOG, tensorboard=False)
    [line] = validate_params(spec.params, command="train", catalog=missing, dataset_dir=env["ds"], env={})
    assert line.startswith("report_to tensorboard: neither tensorboard nor tensorboardX is installed beside "
                           "LLaMA-Factory 0.9.5 (train.llamafactory_cli's venv)")
    assert line.endswith("or remove report_to")
    for known in (True, None):  # installed; or not known (the shipped catalogue): left to the trainer
        catalog = dataclasses.replace(CATALOG, tensorboard=known)
        assert validate_params(spec.params, command="train", catalog=catalog, dataset_dir=env["ds"], env={}) == []
    plain = _spec(env)
    assert validate_params(plain.params, command="train", catalog=missing, dataset_dir=env["ds"], env={}) == []


def test_the_shipped_catalogue_records_both_versions_it_was_generated_from() -> None:
    data = json.loads(DEFAULT_CATALOG.read_text())
    assert (CATALOG.llamafactory_version, CATALOG.transformers_version) == (data["llamafactory_version"],
                                                                            data["transformers_version"])
    assert data["generated_by"] == "daemon/train/keygen.py" and CATALOG.tensorboard is None
