"""What a member may point a training job at (daemon/train/access.py): the --set allow-list, model roots,
trusted models, adapters of one's own jobs, deepspeed by name. Real folders and links; the end-to-end attacks
by real Unix users through the daemon are in tests/train_daemon/test_member_rights.py."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from daemon.jobs.base import Caller
from daemon.train.access import ALLOWED_KEYS, NEVER, Policy, override_problems, path_problems
from daemon.train.spec import render
from daemon.train.validate import load_catalog
from shared.config import TrainConfig
from shared.protocol import JobInfo

ROOT = Path(__file__).resolve().parents[2]
TEMPLATES = ROOT / "configs" / "llamafactory"
DEEPSPEED = ROOT / "configs" / "deepspeed"
CATALOG = load_catalog()
ALICE = Caller(user="alice", uid=5001)
BOB = Caller(user="bob", uid=5002)
ADMIN = Caller(user="carol", uid=5003, is_admin=True)


def _model(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    (path / "tokenizer.json").write_text("{}")
    return path


@pytest.fixture
def site(tmp_path: Path) -> dict[str, Path]:
    roots = tmp_path / "srv" / "models"
    return {"roots": roots, "plain": _model(roots / "plain"), "trusted": _model(roots / "trusted" / "m"),
            "outside": _model(tmp_path / "home" / "alice" / "m"), "jobs": tmp_path / "state" / "jobs"}


def _policy(site: dict[str, Path], **kw: object) -> Policy:
    given: dict[str, object] = {"model_roots": [str(site["roots"])], "trusted_models": [str(site["roots"] / "trusted")],
                                **kw}
    cfg = TrainConfig(**given)  # type: ignore[arg-type]
    return Policy.from_config(cfg, jobs_dir=site["jobs"], deepspeed_dir=DEEPSPEED)


def _jobs(*jobs: JobInfo) -> dict[int, JobInfo]:
    return {j.id: j for j in jobs}


def _train_job(job_id: int, owner: str, kind: str = "train") -> JobInfo:
    return JobInfo(id=job_id, kind=kind, owner=owner, state="succeeded", name="", spec={}, created=0.0)


def _paths(site: dict[str, Path], params: dict[str, object], caller: Caller = ALICE,
           jobs: dict[int, JobInfo] | None = None, **kw: object) -> list[str]:
    return path_problems(params, policy=_policy(site, **kw), caller=caller, job_of=(jobs or {}).get)


def test_the_allow_list_holds_only_catalogue_keys_and_no_refused_one() -> None:
    assert not ALLOWED_KEYS - set(CATALOG.keys)
    assert not ALLOWED_KEYS & NEVER.keys()
    assert set(NEVER) <= CATALOG.keys.keys()
    # what the issue found settable, and the knobs a member needs
    assert {"hub_token", "push_to_hub", "use_swanlab", "swanlab_api_key", "ray_init_kwargs", "tokenized_path",
            "logging_dir", "profiler_output_dir", "cache_dir"} <= NEVER.keys()
    assert {"learning_rate", "lora_rank", "max_samples", "bf16", "logging_steps", "cutoff_len",
            "image_max_pixels"} <= ALLOWED_KEYS


def test_every_shipped_template_leaves_trust_remote_code_off() -> None:
    for path in TEMPLATES.glob("*.yaml"):
        params = render(path.stem, templates_dir=TEMPLATES, job_dir=Path("/j"), dataset_dir=Path("/d")).params
        assert params["trust_remote_code"] is False, path.name


@pytest.mark.parametrize("key", sorted(NEVER))
def test_a_refused_key_stays_refused_even_when_the_admin_lists_it(site: dict[str, Path], key: str) -> None:
    problems = override_problems({key: "x"}, _policy(site, extra_allowed_keys=[key]), CATALOG.keys.keys())
    assert len(problems) == 1 and problems[0].startswith(f"--set {key} is refused: ")
    assert "train.extra_allowed_keys cannot allow it" in problems[0]


def test_a_key_off_the_list_is_refused_with_where_the_list_is_and_the_admin_may_add_it(
        site: dict[str, Path]) -> None:
    [problem] = override_problems({"torch_compile": True, "learning_rate": 1e-4}, _policy(site),
                                  CATALOG.keys.keys())
    assert problem.startswith("--set torch_compile is not a training knob this server takes (learning_rate")
    assert "daemon/train/access.py (ALLOWED_KEYS)" in problem and "train.extra_allowed_keys" in problem
    assert "\n" not in problem and len(problem) < 300
    assert override_problems({"torch_compile": True}, _policy(site, extra_allowed_keys=["torch_compile"]),
                             CATALOG.keys.keys()) == []


def test_forced_unknown_and_trust_keys_are_left_to_their_own_checks(site: dict[str, Path]) -> None:
    given = {"output_dir": "/x", "report_to": "wandb", "lora_rnak": 8, "trust_remote_code": True}
    assert override_problems(given, _policy(site), CATALOG.keys.keys()) == []


def test_a_model_outside_the_roots_is_refused_naming_the_caller_and_the_config_key(site: dict[str, Path]) -> None:
    assert _paths(site, {"model_name_or_path": str(site["plain"])}) == []
    [problem] = _paths(site, {"model_name_or_path": str(site["outside"])})
    assert problem.startswith(f"alice cannot read model_name_or_path {site['outside']}: ")
    assert f"train.model_roots ({site['roots']})" in problem
    # no roots configured: only hub ids
    policy = Policy(jobs_dir=site["jobs"], deepspeed_dir=DEEPSPEED)
    [problem] = path_problems({"model_name_or_path": str(site["plain"])}, policy=policy, caller=ALICE,
                              job_of=_jobs().get)
    assert "train.model_roots (none set)" in problem
    assert path_problems({"model_name_or_path": "Qwen/Qwen2-VL-7B-Instruct"}, policy=policy, caller=ALICE,
                         job_of=_jobs().get) == []


def test_links_and_dot_dots_are_resolved_before_comparing(site: dict[str, Path]) -> None:
    link = site["roots"] / "link"
    link.symlink_to(site["outside"])
    [problem] = _paths(site, {"model_name_or_path": str(link)})
    assert f"{link} (a link to {site['outside']})" in problem
    sneaky = f"{site['roots']}/../../home/alice/m"
    assert _paths(site, {"model_name_or_path": sneaky})[0].startswith(f"alice cannot read model_name_or_path {sneaky}")
    # a root that is itself a link still contains its own folders
    alias = site["roots"].parent / "alias"
    alias.symlink_to(site["roots"])
    assert _paths(site, {"model_name_or_path": str(site["plain"])}, model_roots=[str(alias)],
                  trusted_models=[]) == []


def test_relative_paths_and_odd_names_are_not_taken_as_hub_ids(site: dict[str, Path]) -> None:
    for value in ("../srv/models/plain", "a/b/c", "./m", "gpt2"):
        [problem] = _paths(site, {"model_name_or_path": value})
        assert problem.startswith(f"model_name_or_path {value}: give an absolute path"), value


def test_a_missing_model_is_left_to_validate_which_says_directory_not_found(site: dict[str, Path]) -> None:
    assert _paths(site, {"model_name_or_path": "/nonexistent/model"}) == []


def test_trust_remote_code_only_for_trusted_model_folders(site: dict[str, Path]) -> None:
    assert _paths(site, {"model_name_or_path": str(site["trusted"]), "trust_remote_code": True}) == []
    assert _paths(site, {"model_name_or_path": str(site["plain"]), "trust_remote_code": False}) == []
    for model in (str(site["plain"]), "Qwen/Qwen2-VL-7B-Instruct"):
        [problem] = _paths(site, {"model_name_or_path": model, "trust_remote_code": True})
        assert problem.startswith(f"alice cannot set trust_remote_code: true for model {model}: ")
        assert "train.trusted_models" in problem and "--set trust_remote_code=false" in problem


def test_adapters_of_ones_own_jobs_only_and_admins_any(site: dict[str, Path]) -> None:
    jobs = _jobs(_train_job(7, "bob"), _train_job(8, "alice"), _train_job(9, "alice", kind="eval"))
    bobs = str(site["jobs"] / "7" / "output")
    [problem] = _paths(site, {"adapter_name_or_path": bobs}, jobs=jobs)
    assert problem.startswith(f"alice cannot read adapter_name_or_path {bobs}: it is job 7's, which belongs to bob")
    assert _paths(site, {"adapter_name_or_path": bobs}, caller=BOB, jobs=jobs) == []
    assert _paths(site, {"adapter_name_or_path": bobs}, caller=ADMIN, jobs=jobs) == []
    own = site["jobs"] / "8" / "output"
    assert _paths(site, {"adapter_name_or_path": f"{own},{own}/checkpoint-5"}, jobs=jobs) == []
    for bad in (site["jobs"] / "8", site["jobs"] / "8" / "job.yaml", own / "checkpoint-5" / "x",
                site["jobs"] / "9" / "output"):
        [problem] = _paths(site, {"adapter_name_or_path": str(bad)}, jobs=jobs)
        assert "not a train job's adapter" in problem, bad
    [problem] = _paths(site, {"adapter_name_or_path": str(site["jobs"] / "55" / "output")}, jobs=jobs)
    assert "not the output of a train job" in problem
    # a folder in the model roots is fine; one elsewhere is not
    assert _paths(site, {"adapter_name_or_path": str(site["plain"])}) == []
    [problem] = _paths(site, {"adapter_name_or_path": str(site["outside"])})
    assert problem.startswith(f"alice cannot read adapter_name_or_path {site['outside']}: ")


def test_a_link_in_ones_own_job_dir_to_someone_elses_is_refused(site: dict[str, Path]) -> None:
    jobs = _jobs(_train_job(7, "bob"), _train_job(8, "alice"))
    (site["jobs"] / "7" / "output").mkdir(parents=True)
    (site["jobs"] / "8").mkdir()
    (site["jobs"] / "8" / "output").symlink_to(site["jobs"] / "7" / "output")
    [problem] = _paths(site, {"adapter_name_or_path": str(site["jobs"] / "8" / "output")}, jobs=jobs)
    assert "it is job 7's, which belongs to bob" in problem


def test_deepspeed_by_name_only(site: dict[str, Path], tmp_path: Path) -> None:
    assert _paths(site, {"deepspeed": str(DEEPSPEED / "ds_z3_config.json")}) == []
    evil = tmp_path / "evil.json"
    evil.write_text("{}")
    [problem] = _paths(site, {"deepspeed": str(evil)})
    assert problem.startswith(f"deepspeed {evil}: give the name of a file in {DEEPSPEED} (ds_z3_config.json")
    [problem] = _paths(site, {"deepspeed": f"{DEEPSPEED}/../../{os.path.relpath(evil, ROOT)}"})
    assert "not a path" in problem
    [problem] = _paths(site, {"deepspeed": "nosuch.json"})
    assert problem == f"deepspeed nosuch.json: no such file in {DEEPSPEED}; choose one of ds_z3_config.json"


def test_a_link_in_the_deepspeed_folder_to_a_file_outside_is_refused(site: dict[str, Path], tmp_path: Path) -> None:
    folder = tmp_path / "ds"
    folder.mkdir()
    (tmp_path / "evil.json").write_text("{}")
    (folder / "z3.json").symlink_to(tmp_path / "evil.json")
    policy = Policy(jobs_dir=site["jobs"], deepspeed_dir=folder)
    [problem] = path_problems({"deepspeed": str(folder / "z3.json")}, policy=policy, caller=ALICE,
                              job_of=_jobs().get)
    assert problem.startswith(f"deepspeed z3.json: the file in {folder} is a link to {tmp_path / 'evil.json'}")


def test_checks_take_well_under_a_second(site: dict[str, Path]) -> None:
    params = {"model_name_or_path": str(site["outside"]), "trust_remote_code": True,
              "adapter_name_or_path": str(site["outside"]), "deepspeed": "/etc/passwd"}
    t0 = time.perf_counter()
    assert len(_paths(site, params)) == 4
    assert time.perf_counter() - t0 < 0.1
