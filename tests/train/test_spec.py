"""Rendering job specs from the real templates in configs/llamafactory/."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from daemon.core.atomic import write_atomic
from daemon.train.access import Policy, override_problems, yaml_problems
from daemon.train.spec import (
    TENSORBOARD_ENV,
    SpecDefaults,
    render,
    report_to,
    template_names,
    tensorboard_command,
    user_yaml,
)
from daemon.train.validate import load_catalog
from shared.overrides import SpecProblem, parse_override, parse_overrides
from shared.overrides import absolutize as absolutize_paths

ROOT = Path(__file__).resolve().parents[2]
TEMPLATES = ROOT / "configs" / "llamafactory"


def _render(tmp_path: Path, template: str = "qwen2vl_lora_sft", **kw):  # type: ignore[no-untyped-def]
    kw.setdefault("datasets", ["tiny_sft"] if template != "qwen2vl_export" else [])
    return render(template, templates_dir=TEMPLATES, job_dir=tmp_path / "job-7", dataset_dir=tmp_path / "ds", **kw)


def test_the_five_templates_exist_with_the_seed_settings() -> None:
    assert template_names(TEMPLATES) == ["qwen2_5vl_lora_sft", "qwen2vl_eval", "qwen2vl_export",
                                         "qwen2vl_lora_dpo", "qwen2vl_lora_sft"]
    for name in ("qwen2vl_lora_sft", "qwen2_5vl_lora_sft", "qwen2vl_lora_dpo"):
        t = yaml.safe_load((TEMPLATES / f"{name}.yaml").read_text())
        assert (t["lora_rank"], t["lora_target"], t["template"], t["cutoff_len"]) == (8, "all", "qwen2_vl", 2048)
        assert (t["lr_scheduler_type"], t["warmup_ratio"], t["bf16"]) == ("cosine", 0.1, True)
        assert (t["per_device_train_batch_size"], t["gradient_accumulation_steps"]) == (1, 8)
        assert t["image_max_pixels"] == 262144 and t["save_total_limit"] > 0
    assert yaml.safe_load((TEMPLATES / "qwen2vl_lora_sft.yaml").read_text())["learning_rate"] == 1e-4


def test_overrides_are_yaml_typed_and_1e_minus_4_is_a_number() -> None:
    assert parse_override("learning_rate=1e-4") == ("learning_rate", 1e-4)
    assert parse_override("bf16=false") == ("bf16", False)
    assert parse_override("max_steps=20") == ("max_steps", 20)
    assert parse_override("template=qwen2_vl") == ("template", "qwen2_vl")
    assert parse_override("adapter_name_or_path=") == ("adapter_name_or_path", None)
    assert parse_override("lora_target=[q_proj, v_proj]") == ("lora_target", "q_proj,v_proj")


def test_malformed_overrides_are_all_reported_at_once() -> None:
    with pytest.raises(SpecProblem) as err:
        parse_overrides(["max_steps", "bad key=1", "bf16=false"])
    assert len(err.value.problems) == 2
    assert "--set learning_rate=1e-4" in err.value.problems[0]


def test_sft_spec_gets_dataset_and_daemon_owned_keys(tmp_path: Path) -> None:
    spec = _render(tmp_path, overrides=["max_steps=20"], gpus=2)
    p = spec.params
    assert spec.kind == "train" and spec.command == "train" and spec.stage == "sft" and spec.max_steps == 20
    assert p["dataset"] == "tiny_sft" and spec.datasets == ("tiny_sft",)
    assert p["output_dir"] == str(tmp_path / "job-7" / "output") == str(spec.output_dir)
    assert p["overwrite_output_dir"] is False and p["report_to"] == "none"
    assert p["dataset_dir"] == str(tmp_path / "ds")
    assert p["save_total_limit"] == SpecDefaults().save_total_limit
    assert p["logging_steps"] == 1
    assert spec.env == {"LLAMABOARD_ENABLED": "1", "LLAMABOARD_WORKDIR": str(spec.output_dir)}
    assert yaml.safe_load(spec.yaml_text) == p  # the frozen text is exactly the params


def test_user_may_lower_save_limit_and_change_logging_steps(tmp_path: Path) -> None:
    spec = _render(tmp_path, overrides={"save_total_limit": 1, "logging_steps": 5})
    assert spec.params["save_total_limit"] == 1 and spec.params["logging_steps"] == 5


def test_checkpoint_limit_is_capped_so_checkpoints_cannot_fill_the_disk(tmp_path: Path) -> None:
    with pytest.raises(SpecProblem, match="save_total_limit 50 is above this server's limit of 2"):
        _render(tmp_path, overrides=["save_total_limit=50"], defaults=SpecDefaults(save_total_limit=2))
    # a template's own value above the limit is lowered to it
    assert _render(tmp_path, defaults=SpecDefaults(save_total_limit=2)).params["save_total_limit"] == 2


def test_daemon_owned_keys_cannot_be_overridden(tmp_path: Path) -> None:
    with pytest.raises(SpecProblem) as err:
        _render(tmp_path, overrides=["output_dir=/tmp/x", "overwrite_output_dir=true"])
    assert len(err.value.problems) == 2
    assert "output_dir is set by the daemon" in str(err.value) and "remove --set output_dir" in str(err.value)


def test_eval_template_puts_dataset_in_eval_dataset(tmp_path: Path) -> None:
    spec = _render(tmp_path, "qwen2vl_eval", overrides=["adapter_name_or_path=/a"])
    assert spec.kind == "eval" and spec.command == "train"
    assert spec.params["eval_dataset"] == "tiny_sft" and "dataset" not in spec.params
    assert spec.params["do_predict"] is True and spec.params["predict_with_generate"] is True


def test_export_template_runs_export_with_only_export_dir_forced(tmp_path: Path) -> None:
    spec = _render(tmp_path, "qwen2vl_export", overrides=["adapter_name_or_path=/a"], gpus=0)
    assert spec.kind == "export" and spec.command == "export"
    assert spec.params["export_dir"] == str(tmp_path / "job-7" / "merged") == str(spec.output_dir)
    for key in ("output_dir", "report_to", "logging_steps", "dataset_dir", "save_total_limit"):
        assert key not in spec.params  # `llamafactory-cli export` would reject training keys
    assert spec.env == {}
    with pytest.raises(SpecProblem, match="reads no dataset"):
        _render(tmp_path, "qwen2vl_export", datasets=["tiny_sft"])


def test_removing_a_template_key_with_an_empty_override(tmp_path: Path) -> None:
    spec = _render(tmp_path, overrides=["plot_loss="])
    assert "plot_loss" not in spec.params


def test_unknown_template_suggests_the_closest(tmp_path: Path) -> None:
    with pytest.raises(SpecProblem, match="did you mean 'qwen2vl_lora_sft'"):
        _render(tmp_path, "qwen2vl_lora_sf")


def test_deepspeed_short_name_resolves_to_configs_deepspeed(tmp_path: Path) -> None:
    spec = _render(tmp_path, overrides=["deepspeed=ds_z3_config.json"])
    assert spec.params["deepspeed"] == str(ROOT / "configs" / "deepspeed" / "ds_z3_config.json")


def test_job_yaml_is_written_atomically_and_reads_back(tmp_path: Path) -> None:
    spec = _render(tmp_path)
    path = tmp_path / "job-7" / "job.yaml"
    write_atomic(path, spec.yaml_text, mode=0o600)  # as the train kind writes job.yaml
    assert yaml.safe_load(path.read_text()) == spec.params
    assert [p.name for p in path.parent.iterdir()] == ["job.yaml"]  # no temp file left behind


def test_ftctl_makes_relative_model_paths_absolute(tmp_path: Path) -> None:
    (tmp_path / "models" / "m").mkdir(parents=True)
    out = absolutize_paths({"model_name_or_path": "models/m", "adapter_name_or_path": "Qwen/x",
                            "learning_rate": 1e-4}, tmp_path)
    assert out["model_name_or_path"] == str(tmp_path / "models" / "m")
    assert out["adapter_name_or_path"] == "Qwen/x" and out["learning_rate"] == 1e-4


# ------------------------------------------------------------------------ the user's own YAML, report_to

LF_EXAMPLE = """\
### model
model_name_or_path: /models/Qwen2-VL-7B-Instruct
trust_remote_code: true
### method
stage: sft
do_train: true
finetuning_type: lora
lora_target: all
### dataset
dataset: mllm_demo,identity
template: qwen2_vl
### output
output_dir: saves/qwen2_vl-7b/lora/sft
overwrite_output_dir: true
report_to: none  # choices: [none, wandb, tensorboard, swanlab, mlflow]
### train
learning_rate: 1.0e-4
resume_from_checkpoint: null
"""


def test_a_users_yaml_renders_like_a_template_with_the_daemons_keys_replaced(tmp_path: Path) -> None:
    base = user_yaml(LF_EXAMPLE, "my.yaml")
    assert "resume_from_checkpoint" not in base  # null is LLaMA-Factory's default: as if absent
    spec = render("my.yaml", templates_dir=TEMPLATES, job_dir=tmp_path / "job-7", dataset_dir=tmp_path / "ds",
                  base=base, overrides=["learning_rate=2e-4"])
    p = spec.params
    assert spec.kind == "train" and spec.template == "my.yaml" and spec.datasets == ("mllm_demo", "identity")
    assert p["output_dir"] == str(tmp_path / "job-7" / "output") and p["overwrite_output_dir"] is False
    assert p["dataset_dir"] == str(tmp_path / "ds") and p["report_to"] == "none" and p["learning_rate"] == 2e-4
    assert spec.yaml_text.startswith("# ftmllm job: your YAML my.yaml (train), gpus 1\n")
    assert "# set by the daemon instead of the YAML's own: output_dir, overwrite_output_dir\n" in spec.yaml_text
    assert TENSORBOARD_ENV not in spec.env and tensorboard_command(spec.env) is None
    with_datasets = render("my.yaml", templates_dir=TEMPLATES, job_dir=tmp_path, dataset_dir=tmp_path, base=base,
                           datasets=["tiny_sft"])
    assert with_datasets.params["dataset"] == "tiny_sft"  # --dataset wins over the YAML's own


@pytest.mark.parametrize(("text", "problem"), [
    ("stage: [sft\n", "my.yaml: not valid YAML ("),
    ("- stage: sft\n", "my.yaml: a LLaMA-Factory config is a YAML mapping of keys"),
    ("x: " + "a" * (256 * 1024) + "\n", "my.yaml: larger than 256 KiB"),
])
def test_a_users_yaml_that_is_no_config_is_refused_in_one_line(text: str, problem: str) -> None:
    with pytest.raises(SpecProblem) as err:
        user_yaml(text, "my.yaml")
    [line] = err.value.problems
    assert line.startswith(problem) and "\n" not in line


def test_report_to_tensorboard_logs_into_the_job_folder_and_phoning_out_is_refused(tmp_path: Path) -> None:
    spec = _render(tmp_path, overrides=["report_to=tensorboard"])
    assert spec.params["report_to"] == "tensorboard"
    logdir = tmp_path / "job-7" / "tensorboard"
    assert spec.env[TENSORBOARD_ENV] == str(logdir)
    assert tensorboard_command(spec.env) == f"tensorboard --logdir {logdir}"
    assert _render(tmp_path, overrides=["report_to=[none]"]).params["report_to"] == "none"
    for value, named in (("wandb", "wandb"), ("[tensorboard, mlflow]", "mlflow"), ("all", "all")):
        with pytest.raises(SpecProblem) as err:
            _render(tmp_path, overrides=[f"report_to={value}"])
        [line] = err.value.problems
        assert line.startswith(f"report_to {named}: ") and "off this server" in line
        assert line.endswith("use report_to: tensorboard (logs stay in the job's folder) or none")
    assert report_to(None) == ("none", None) and report_to([]) == ("none", None)


def test_a_users_yaml_keys_pass_the_same_allow_list_as_set_plus_what_the_job_is() -> None:
    catalog = load_catalog()
    policy = Policy()
    base = user_yaml(LF_EXAMPLE, "my.yaml")
    assert yaml_problems(base, policy, catalog.keys.keys(), "my.yaml") == []  # do_train, dataset, output_dir…
    assert override_problems({"do_train": True}, policy, catalog.keys.keys())  # not a --set knob
    refused = yaml_problems({**base, "hub_token": "x", "torch_compile": True}, policy, catalog.keys.keys(), "my.yaml")
    assert refused[0].startswith("my.yaml: key hub_token is refused: a secret") and refused[0].endswith(
        "remove it from my.yaml")
    assert refused[1].startswith("my.yaml: key torch_compile is not a training knob this server takes (")
    assert yaml_problems({"torch_compile": True}, Policy(extra_allowed_keys=("torch_compile",)),
                         catalog.keys.keys(), "my.yaml") == []
