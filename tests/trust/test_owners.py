"""Owners where there should be (issue 11), end to end: the real ftmllmd (as root) and the real ftctl run by real
Unix users: alice and bob are members, carol an admin (tests/trust/test_visibility.py's site).

* LoRA adapters in the engine are namespaced by owner: alice's ``invoices`` is served as ``alice/invoices``,
  recorded as hers in the engine's registry; only she or an admin replaces or unloads it, and a member has the
  engine (which reads with the daemon's rights) read only an adapter she may read herself.
* Pausing and resuming the shared queue, and starting, stopping, putting to sleep or waking the engine, are an
  admin's.

The vLLM engine is configured but never started (``ocr.engine = "cpu"``): the supervisor records an adapter
to load when vLLM is ready, which is all the ownership rules touch. Each attack is made, refused with one line
(exit 4), and the registry read back unchanged."""

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
from typing import Any

import pytest

from shared.protocol import TERMINAL_STATES, EngineCommand, EngineReply, JobDetail, ShowJob, Status, StatusReply
from tests.daemon_proc import ROOT, wait_for
from tests.fixtures.tiny_dataset import write_dataset
from tests.systemd.unix_users import Account
from tests.train_daemon.support import toml_section
from tests.trust.members import CLIENT_PACKAGES, DEADLINE_S, Server
from tests.trust.test_visibility import member_site

EXIT_FORBIDDEN = 4


@dataclass
class Site:
    server: Server
    roots: Path  # train.model_roots
    shared: Path  # an adapter inside the roots, which every member may have the engine read

    @property
    def users(self) -> Any:
        return self.server.users

    @property
    def carol(self) -> Account:
        assert self.server.users.carol is not None
        return self.server.users.carol

    def ftctl(self, who: Account, *args: str) -> subprocess.CompletedProcess[str]:
        return self.server.ftctl(who, *args)

    def registry(self) -> dict[str, Any]:
        path = self.server.d.paths.state_dir / "vllm" / "adapters.json"
        return dict(json.loads(path.read_text())) if path.exists() else {}


def adapter(path: Path, who: Account | None = None, mode: int = 0o755) -> Path:
    """A PEFT adapter folder (what the engine checks before loading)."""
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 8}')
    (path / "adapter_model.safetensors").write_bytes(b"\0" * 16)
    if who is not None:
        for p in (path, *path.iterdir()):
            os.chown(p, who.uid, who.gid)
    path.chmod(mode)
    return path


@pytest.fixture(scope="module")
def site() -> Iterator[Site]:
    outside = Path(tempfile.mkdtemp(prefix="ftk", dir="/tmp"))  # the roots and the stand-in trainer
    try:
        outside.chmod(0o755)
        cli = outside / "fake-llamafactory-cli"
        cli.write_text("#!/bin/sh\nexit 3\n")
        cli.chmod(0o755)
        roots = outside / "models"
        model = roots / "base"
        model.mkdir(parents=True)
        (model / "config.json").write_text('{"model_type": "qwen2_vl"}')
        (model / "tokenizer.json").write_text("{}")
        drop = roots / "drop"
        drop.mkdir()
        drop.chmod(0o1777)  # a shared upload spot inside the roots, as a site may have
        shared = adapter(roots / "team-lora")
        roots.chmod(0o755)
        extra = (toml_section("ocr", {"engine": "cpu"})
                 + toml_section("vllm", {"model": "/nonexistent/base-model", "enable_lora": True})
                 + toml_section("train", {"llamafactory_cli": str(cli), "model_roots": [str(roots)]}))
        with member_site("", extra=extra, packages=(*CLIENT_PACKAGES, "yaml")) as server:
            src = write_dataset(server.home / "src", records=2)
            added = subprocess.run([sys.executable, "-m", "tui.ftctl", "--home", str(server.home), "dataset", "add",
                                    "tiny_sft", str(src["sft"])], capture_output=True, text=True,
                                   timeout=DEADLINE_S, cwd=ROOT, check=False)
            assert added.returncode == 0, added.stderr
            yield Site(server, roots, shared)
    finally:
        shutil.rmtree(outside, ignore_errors=True)


def refused(site: Site, res: subprocess.CompletedProcess[str], before: dict[str, Any], *expected: str) -> None:
    assert res.returncode == EXIT_FORBIDDEN, (res.returncode, res.stdout, res.stderr)
    line = res.stderr.strip()
    assert len(line.splitlines()) == 1, line
    for text in expected:
        assert text in line, (text, line)
    assert site.registry() == before, "a refused command changed the engine's adapters"


def ok(res: subprocess.CompletedProcess[str], *expected: str) -> str:
    assert res.returncode == 0, (res.returncode, res.stdout, res.stderr)
    for text in expected:
        assert text in res.stdout, (text, res.stdout)
    return res.stdout


def bobs_train_job_with_an_adapter(site: Site) -> tuple[int, Path]:
    """A train job of bob's (the stand-in trainer fails at once) whose output holds an adapter, as a run
    canceled gracefully leaves it."""
    bob = site.users.bob
    res = site.ftctl(bob, "train", "qwen2vl_lora_sft", "--dataset", "tiny_sft", "--gpus", "0",
                     "--set", f"model_name_or_path={site.roots / 'base'}")
    assert res.returncode == 0, res.stderr
    job = int(res.stdout.strip().splitlines()[-1])
    c = site.server.d.client()
    wait_for(lambda: c.call(ShowJob(job_id=job), JobDetail).job.state in TERMINAL_STATES, DEADLINE_S,
             f"bob's job {job} to end")
    out = site.server.d.paths.state_dir / "jobs" / str(job) / "output"
    out.mkdir(parents=True, exist_ok=True)
    (out / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 8}')
    (out / "adapter_model.safetensors").write_bytes(b"\0" * 16)
    return job, out


# ------------------------------------------------------------------------------------------------ adapters


def test_a_members_adapter_goes_under_her_name_and_only_she_or_an_admin_changes_it(site: Site) -> None:
    alice, bob, carol = site.users.alice, site.users.bob, site.carol
    a, b = alice.name, bob.name
    ok(site.ftctl(alice, "engine", "load", "invoices", str(site.shared)), f"adapter {a}/invoices")
    assert site.registry() == {f"{a}/invoices": {"owner": a, "path": str(site.shared)}}
    # everyone sees whose it is
    ok(site.ftctl(bob, "engine", "adapters"), f"{a}/invoices ({a}: {site.shared})")
    before = site.registry()
    refused(site, site.ftctl(bob, "engine", "unload", f"{a}/invoices"), before,
            f"{b} cannot unload adapter '{a}/invoices': it is {a}'s; ask {a} or an admin")
    refused(site, site.ftctl(bob, "engine", "load", f"{a}/invoices", str(site.shared)), before,
            f"{b} cannot load an adapter as '{a}/invoices': names under '{a}/' are {a}'s", f"{b}/invoices")
    # the same name is his own
    ok(site.ftctl(bob, "engine", "load", "invoices", str(site.shared)), f"adapter {b}/invoices")
    assert site.registry()[f"{a}/invoices"] == before[f"{a}/invoices"]
    ok(site.ftctl(bob, "engine", "unload", "invoices"), f"adapter {b}/invoices unloaded")  # a bare name: his
    assert site.registry() == before
    # an admin's bare name is the team's: a member's same name stays apart, and only an admin removes it
    ok(site.ftctl(carol, "engine", "load", "team", str(site.shared)), "adapter team ")
    assert site.registry()["team"] == {"owner": carol.name, "path": str(site.shared)}
    ok(site.ftctl(bob, "engine", "load", "team", str(site.shared)), f"adapter {b}/team")
    ok(site.ftctl(bob, "engine", "unload", "team"), f"adapter {b}/team unloaded")
    before = site.registry()
    refused(site, site.ftctl(bob, "engine", "unload", "team"), before,
            f"{b} cannot unload adapter 'team': it is {carol.name}'s")
    # the admin may, and so may alice her own
    ok(site.ftctl(carol, "engine", "unload", "team"), "adapter team unloaded")
    ok(site.ftctl(alice, "engine", "unload", "invoices"), f"adapter {a}/invoices unloaded")
    assert site.registry() == {}


def test_a_member_has_the_engine_read_only_adapters_she_may_read(site: Site) -> None:
    alice, bob = site.users.alice, site.users.bob
    a, b = alice.name, bob.name
    job, out = bobs_train_job_with_an_adapter(site)
    private = adapter(site.server.folder(bob, "bob-lora") / "lora", bob, mode=0o700)
    link = site.roots / "drop" / f"{a}-link"
    link.symlink_to(private)  # in a folder of the roots that members may write: it leads out of them
    os.lchown(link, alice.uid, alice.gid)
    before = site.registry()
    for path in (private, link):
        refused(site, site.ftctl(alice, "engine", "load", "stolen", str(path)), before,
                f"{a} cannot load the adapter in", "train.model_roots", "ftctl deploy JOB")
    refused(site, site.ftctl(alice, "engine", "load", "stolen", str(out)), before,
            f"{a} cannot load the adapter in {out}: it is job {job}'s, which belongs to {b}")
    refused(site, site.ftctl(alice, "deploy", str(job)), before,
            f"{a} cannot deploy the adapter of job {job}: it belongs to {b}")
    refused(site, site.ftctl(bob, "engine", "load", "mine", str(out.parent)), before,
            "not the adapter of a train job")
    # bob: his own job's adapter, by deploy or by path, under his name
    ok(site.ftctl(bob, "deploy", str(job)), f"adapter {b}/job{job}", f"--adapter {b}/job{job}")
    ok(site.ftctl(bob, "engine", "load", "mine", str(out)), f"adapter {b}/mine")
    before = site.registry()
    assert before[f"{b}/job{job}"]["owner"] == b and before[f"{b}/mine"] == {"owner": b, "path": str(out)}
    refused(site, site.ftctl(bob, "deploy", str(job), "--name", f"{a}/job{job}"), before,
            f"names under '{a}/' are {a}'s")
    ok(site.ftctl(site.carol, "engine", "unload", f"{b}/job{job}"))
    ok(site.ftctl(bob, "engine", "unload", "mine"))
    assert site.registry() == {}


# ------------------------------------------------------------------------------------ shared switches


def test_pausing_the_queue_and_switching_the_engine_are_an_admins(site: Site) -> None:
    bob, carol = site.users.bob, site.carol
    c = site.server.d.client()
    for verb in ("pause", "resume"):
        res = site.ftctl(bob, verb)
        assert res.returncode == EXIT_FORBIDDEN and len(res.stderr.strip().splitlines()) == 1, res.stderr
        assert f"{bob.name} cannot {verb} the queue" in res.stderr and "ask an admin" in res.stderr
        assert c.call(Status(), StatusReply).queue_paused is False
    engine = c.call(EngineCommand(action="adapters"), EngineReply).engine
    for action in ("start", "stop", "sleep", "wake"):
        res = site.ftctl(bob, "engine", action)
        assert res.returncode == EXIT_FORBIDDEN and "ask an admin" in res.stderr, (action, res.stderr)
        assert c.call(EngineCommand(action="adapters"), EngineReply).engine == engine
    ok(site.ftctl(carol, "pause"))
    assert c.call(Status(), StatusReply).queue_paused is True
    ok(site.ftctl(carol, "resume"))
    assert c.call(Status(), StatusReply).queue_paused is False


def test_a_member_may_lower_her_jobs_priority_and_only_an_admin_raises_it(site: Site) -> None:
    bob, carol = site.users.bob, site.carol
    c = site.server.d.client()
    ok(site.ftctl(carol, "pause"))  # the jobs stay queued while their priority changes
    try:
        res = site.ftctl(bob, "submit", "selftest", "--priority", "5", "--set", "steps=1")
        assert res.returncode == EXIT_FORBIDDEN and len(res.stderr.strip().splitlines()) == 1, res.stderr
        assert "member_max_priority" in res.stderr and "ask an admin" in res.stderr
        job = json.loads(ok(site.ftctl(bob, "submit", "selftest", "--priority", "-3", "--set", "steps=1",
                                       "--json")))["id"]
        assert c.call(ShowJob(job_id=job), JobDetail).job.priority == -3
        res = site.ftctl(bob, "priority", str(job), "1")
        assert res.returncode == EXIT_FORBIDDEN and "member_max_priority" in res.stderr, res.stderr
        assert c.call(ShowJob(job_id=job), JobDetail).job.priority == -3
        ok(site.ftctl(bob, "priority", str(job), "0"))
        ok(site.ftctl(carol, "priority", str(job), "50"))
        assert c.call(ShowJob(job_id=job), JobDetail).job.priority == 50
        ok(site.ftctl(carol, "cancel", str(job)))
    finally:
        ok(site.ftctl(carol, "resume"))
