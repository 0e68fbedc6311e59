"""Training runs no code a member supplied and reads only what the caller may (issue 11), end to end: the real
ftmllmd (as root here, as in tests/systemd/test_daemon_trust.py) and the real ftctl run by real Unix users
(alice and bob: members; carol: admin). Each attack is made and refused at submit with one line, and nothing
is written: no job, no job dir, the member's code never ran, the colleague's files unchanged.

The trainer is a stand-in executable (these are submit-time refusals: LLaMA-Factory itself is not needed); a
job that is accepted runs it and fails, which is all the tests need of it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from shared.client import RemoteError
from shared.protocol import JobDetail, JobList, ListJobs, ShowJob, Submit
from tests.daemon_proc import ROOT, DaemonProc, wait_for
from tests.fixtures.tiny_dataset import write_dataset
from tests.systemd.unix_users import Account, UnixUsers, unix_users
from tests.train_daemon.support import toml_section

CLIENT_PACKAGES = ("zmq", "msgspec", "typing_extensions", "rich", "yaml", "shared", "tui")
DEADLINE_S = 60.0
EXIT_USAGE, EXIT_FORBIDDEN = 2, 4
EVIL_PY = "import pathlib\npathlib.Path({marker!r}).write_text('ran as the daemon')\n"


@dataclass
class Site:
    d: DaemonProc
    users: UnixUsers
    roots: Path  # train.model_roots
    plain: Path  # an admin's model in the roots
    trusted: Path  # a model in train.trusted_models
    drop: Path  # a folder inside the roots that members may write (a shared upload spot)
    alice_home: Path
    bob_private: Path  # bob's 0700 model folder
    marker: Path  # what alice's code would write if it ran

    @property
    def carol(self) -> Account:
        assert self.users.carol is not None
        return self.users.carol

    def ftctl(self, who: Account, *args: str) -> subprocess.CompletedProcess[str]:
        argv = self.users.command(who, ["-m", "tui.ftctl", "--home", str(self.d.home), *args])
        return subprocess.run(argv, env=self.users.env(), cwd=self.users.pythonpath, capture_output=True,
                              text=True, timeout=DEADLINE_S, check=False)

    def train(self, who: Account, *sets: str, kind: str = "train", extra: tuple[str, ...] = ()) \
            -> subprocess.CompletedProcess[str]:
        args = [kind, *(["qwen2vl_lora_sft", "--dataset", "tiny_sft"] if kind == "train" else []), "--gpus", "0",
                *extra]
        for s in sets:
            args += ["--set", s]
        return self.ftctl(who, *args)

    def jobs(self) -> list[int]:
        return sorted(j.id for j in self.d.client().call(ListJobs(all=True), JobList).jobs)

    def job_dirs(self) -> list[str]:
        jobs = self.d.paths.state_dir / "jobs"
        return sorted(p.name for p in jobs.iterdir()) if jobs.is_dir() else []


def _model(path: Path, config: dict[str, object] | None = None) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config or {"model_type": "qwen2_vl"}))
    (path / "tokenizer.json").write_text("{}")
    return path


def _chown_tree(path: Path, who: Account) -> None:
    for p in [path, *path.rglob("*")]:
        os.lchown(p, who.uid, who.gid)


@pytest.fixture(scope="module")
def site() -> Iterator[Site]:
    with unix_users(packages=CLIENT_PACKAGES, admin=True) as users:
        home = Path(tempfile.mkdtemp(prefix="ftr", dir="/tmp"))  # short: unix socket paths ≤ 107 bytes
        try:
            home.chmod(0o755)
            roots = home / "models"
            plain = _model(roots / "plain")
            trusted = _model(roots / "trusted" / "custom", {"model_type": "custom",
                                                            "auto_map": {"AutoConfig": "custom.Config"}})
            drop = roots / "drop"
            drop.mkdir(mode=0o777)
            drop.chmod(0o1777)
            alice_home = home / "alice"
            alice_home.mkdir()
            bob_private = _model(home / "bob" / "model")
            _chown_tree(home / "bob", users.bob)
            (home / "bob").chmod(0o700)
            marker = home / "pwned"
            cli = home / "fake-llamafactory-cli"
            cli.write_text("#!/bin/sh\nexit 3\n")
            cli.chmod(0o755)
            for p in (home, roots):
                p.chmod(0o755)
            config = home / "ftmllm.toml"
            config.write_text(
                toml_section("daemon", {"socket_group": users.group, "admin_group": users.admin_group})
                + toml_section("hotfolder", {"enabled": False})
                + toml_section("train", {"llamafactory_cli": str(cli), "model_roots": [str(roots)],
                                         "trusted_models": [str(roots / "trusted")],
                                         "extra_allowed_keys": ["hub_token", "torch_compile"]}))
            run = home / "run"
            run.mkdir(mode=0o750)
            os.chown(run, 0, users.gid)
            d = DaemonProc(home=home, config=config)
            try:
                d.start(timeout=DEADLINE_S)
                src = write_dataset(home / "src", records=2)
                added = subprocess.run([sys.executable, "-m", "tui.ftctl", "--home", str(home), "dataset", "add",
                                        "tiny_sft", str(src["sft"])], capture_output=True, text=True,
                                       timeout=DEADLINE_S, cwd=ROOT, check=False)
                assert added.returncode == 0, added.stderr
                yield Site(d=d, users=users, roots=roots, plain=plain, trusted=trusted, drop=drop,
                           alice_home=alice_home, bob_private=bob_private, marker=marker)
            finally:
                d.close()
        finally:
            shutil.rmtree(home, ignore_errors=True)


def _alice_model(site: Site, name: str) -> Path:
    """A model folder of alice's whose config.json maps to her own Python, as in the issue."""
    model = _model(site.alice_home / name, {"model_type": "evil", "auto_map": {"AutoConfig": "evil.EvilConfig"}})
    (model / "evil.py").write_text(EVIL_PY.format(marker=str(site.marker)))
    _chown_tree(model, site.users.alice)
    return model


def _refused(site: Site, r: subprocess.CompletedProcess[str], before: tuple[list[int], list[str]], *expected: str,
             code: int = EXIT_USAGE) -> str:
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    line = r.stderr.strip()
    assert len(line.splitlines()) == 1, line
    for text in expected:
        assert text in line, (text, line)
    assert (site.jobs(), site.job_dirs()) == before, "a refused submit left a job behind"
    assert not site.marker.exists()
    return line


def _state(site: Site) -> tuple[list[int], list[str]]:
    return site.jobs(), site.job_dirs()


def test_a_members_model_with_her_own_code_is_refused(site: Site) -> None:
    alice = site.users.alice
    model = _alice_model(site, "evil-model")
    before = _state(site)
    r = site.train(alice, f"model_name_or_path={model}", "trust_remote_code=true")
    line = _refused(site, r, before, f"{alice.name} cannot read model_name_or_path {model}", "train.model_roots",
                    f"{alice.name} cannot set trust_remote_code: true", "train.trusted_models")
    assert "config.json" not in line  # the folder was not looked into


def test_trust_remote_code_in_the_roots_needs_a_trusted_folder(site: Site) -> None:
    alice = site.users.alice
    before = _state(site)
    r = site.train(alice, f"model_name_or_path={site.plain}", "trust_remote_code=true")
    _refused(site, r, before, f"{alice.name} cannot set trust_remote_code: true for model {site.plain}",
             "ask an admin to list the folder", "train.trusted_models")
    # the same from the admin's trusted folder is accepted (and only that)
    ok = site.train(alice, f"model_name_or_path={site.trusted}", "trust_remote_code=true")
    assert ok.returncode == 0, ok.stderr
    assert site.jobs() == [*before[0], int(ok.stdout.strip().splitlines()[-1])]


def test_a_link_in_a_shared_root_to_a_colleagues_private_model_is_refused(site: Site) -> None:
    alice = site.users.alice
    link = site.drop / "bobs"
    subprocess.run(site.users.command(alice, ["-c", f"import os; os.symlink({str(site.bob_private)!r}, "
                                                    f"{str(link)!r})"]), env=site.users.env(), check=True)
    config_before = (site.bob_private / "config.json").read_bytes()
    try:
        before = _state(site)
        r = site.train(alice, f"model_name_or_path={link}")
        _refused(site, r, before, f"{alice.name} cannot read model_name_or_path {link} (a link to "
                                  f"{site.bob_private})")
    finally:
        link.unlink()
    assert (site.bob_private / "config.json").read_bytes() == config_before


@pytest.mark.parametrize(("setting", "expected"), [
    ("hub_token=hf_stolen", "--set hub_token is refused: a secret"),
    ("push_to_hub=true", "--set push_to_hub is refused: it sends data off this server"),
    ("use_swanlab=true", "--set use_swanlab is refused: it sends data off this server"),
    ("swanlab_api_key=k", "--set swanlab_api_key is refused: a secret"),
    ("ray_init_kwargs={address: 'ray://evil:10001'}", "--set ray_init_kwargs is refused"),
    ("tokenized_path=/var/lib/ftmllm/state.sqlite", "--set tokenized_path is refused: a path the trainer"),
    ("logging_dir=/var/lib/ftmllm", "--set logging_dir is refused"),
    ("profiler_output_dir=/tmp/x", "--set profiler_output_dir is refused"),
    ("cache_dir=/home/bob/.cache", "--set cache_dir is refused"),
    ("media_dir=/home/bob", "--set media_dir is refused"),
    ("resume_from_checkpoint=/home/bob/ckpt", "--set resume_from_checkpoint is refused"),
    ("use_unsloth=true", "--set use_unsloth is not a training knob this server takes"),
])
def test_set_refuses_what_is_not_a_training_knob(site: Site, setting: str, expected: str) -> None:
    before = _state(site)
    line = _refused(site, site.train(site.users.alice, f"model_name_or_path={site.plain}", setting), before, expected)
    if "hub_token" in setting:
        assert "train.extra_allowed_keys cannot allow it" in line  # the admin listed it: still refused
        assert "hf_stolen" not in line
    if "not a training knob" in expected:
        assert "train.extra_allowed_keys" in line and "daemon/train/access.py" in line


def test_an_admin_extended_knob_is_accepted(site: Site) -> None:
    r = site.train(site.users.alice, f"model_name_or_path={site.plain}", "torch_compile=false")
    assert r.returncode == 0, r.stderr


def test_deepspeed_takes_a_name_of_the_admins_configs_never_a_members_file(site: Site) -> None:
    alice = site.users.alice
    evil = site.alice_home / "evil.json"
    evil.write_text('{"zero_optimization": {"offload_param": {"device": "nvme", "nvme_path": "/var/lib"}}}')
    os.chown(evil, alice.uid, alice.gid)
    before = _state(site)
    r = site.train(alice, f"model_name_or_path={site.plain}", f"deepspeed={evil}")
    _refused(site, r, before, f"deepspeed {evil}: give the name of a file in", "ds_z3_config.json", "not a path")


def test_a_colleagues_adapter_is_refused_to_her_and_allowed_to_him_and_the_admin(site: Site) -> None:
    alice, bob = site.users.alice, site.users.bob
    r = site.train(bob, f"model_name_or_path={site.plain}")
    assert r.returncode == 0, r.stderr
    bobs = int(r.stdout.strip().splitlines()[-1])
    wait_for(lambda: site.d.client().call(ShowJob(job_id=bobs), JobDetail).job.state in ("failed", "succeeded"),
             DEADLINE_S, f"bob's job {bobs} to end")
    before = _state(site)
    r = site.ftctl(alice, "eval", "--adapter", str(bobs), "--dataset", "tiny_sft", "--gpus", "0")
    _refused(site, r, before, f"{alice.name} cannot use the adapter of job {bobs}: it belongs to {bob.name}")
    out = site.d.paths.state_dir / "jobs" / str(bobs) / "output"
    r = site.ftctl(alice, "eval", "--adapter", str(out), "--dataset", "tiny_sft", "--gpus", "0",
                   "--set", f"model_name_or_path={site.plain}")
    _refused(site, r, before, f"{alice.name} cannot read adapter_name_or_path {out}: it is job {bobs}'s, which "
                              f"belongs to {bob.name}")
    r = site.ftctl(alice, "deploy", str(bobs))
    _refused(site, r, before, f"{alice.name} cannot deploy the adapter of job {bobs}: it belongs to {bob.name}",
             code=EXIT_FORBIDDEN)
    # bob and the admin get past the owner check to the real state of the job: it saved no adapter
    for who in (bob, site.carol):
        r = site.ftctl(who, "eval", "--adapter", str(bobs), "--dataset", "tiny_sft", "--gpus", "0")
        assert r.returncode == EXIT_USAGE and f"job {bobs} has no adapter" in r.stderr, (who, r.stderr)


def test_a_refused_submit_is_refused_at_submit_every_time(site: Site) -> None:
    model = _alice_model(site, "refused-model")
    c = site.d.client(timeout=DEADLINE_S)
    for sets, expected in ([[f"model_name_or_path={model}", "trust_remote_code=true"], "cannot read"],
                           [["hub_token=x"], "--set hub_token is refused"]):
        spec = {"template": "qwen2vl_lora_sft", "dataset": "tiny_sft", "gpus": 0, "set": sets}
        for _ in range(3):  # the first call also connects
            with pytest.raises(RemoteError) as err:
                c.call(Submit(kind="train", spec=spec), JobDetail)
            assert expected in err.value.message
