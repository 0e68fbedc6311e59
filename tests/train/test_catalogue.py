"""The key catalogue comes from the LLaMA-Factory that train.llamafactory_cli runs (daemon/train/catalogue.py):
the shipped copy for its own version, a catalogue generated from the configured version's dataclasses (a real
child process of that venv's python) and cached per version otherwise, the shipped copy with one warning
when that fails. The newer "version" is tests/train/lf_stub.py's recorded-fixture stand-in (see there)."""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from daemon.train.catalogue import CatalogueNotReady, Catalogues
from daemon.train.validate import load_catalog, validate_params
from tests.daemon_proc import wait_for
from tests.engines import stack
from tests.train import lf_stub

pytestmark = pytest.mark.llamafactory

GENERATE_TIMEOUT_S = 600.0  # importing LLaMA-Factory on a loaded 2-core box


@dataclass
class Stub:
    cli: Path
    env: dict[str, str]
    cache: Path
    first_refusal: str  # what the first use answered while the catalogue was being generated


@pytest.fixture(scope="module")
def stub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stub]:
    root = tmp_path_factory.mktemp("lfstub")
    real_python = stack.llamafactory_venv() / "bin" / "python"
    cli = lf_stub.build_stub(root / "venv", real_python, tensorboard=True)
    env = {**os.environ, **stack.llamafactory_env(root / "lf")}
    cache = root / "state" / "llamafactory"
    catalogues = Catalogues(cache, wait_s=0.0)
    with pytest.raises(CatalogueNotReady) as refused:
        catalogues.current(str(cli), env)
    wait_for(lambda: list(cache.glob("keys-*.json")), GENERATE_TIMEOUT_S, "the stub version's catalogue")
    yield Stub(cli=cli, env=env, cache=cache, first_refusal=str(refused.value))
    shutil.rmtree(root, ignore_errors=True)


def test_the_shipped_copy_is_used_as_is_for_the_version_it_was_generated_from(tmp_path: Path) -> None:
    catalogues = Catalogues(tmp_path / "cache", wait_s=0.0)
    env = {**os.environ, **stack.llamafactory_env(tmp_path / "lf")}
    catalog = catalogues.current(str(stack.llamafactory_cli()), env)
    shipped = load_catalog()
    assert (catalog.llamafactory_version, catalog.transformers_version) == ("0.9.5", shipped.transformers_version)
    assert catalog.keys == shipped.keys and catalog.commands == shipped.commands
    assert catalog.tensorboard is False  # the test venv has neither tensorboard nor tensorboardX
    assert not (tmp_path / "cache").exists()  # nothing generated, nothing cached


def test_a_key_added_in_a_newer_llamafactory_is_accepted_when_that_version_is_configured(
        stub: Stub, tmp_path: Path) -> None:
    assert stub.first_refusal.startswith("the key catalogue of LLaMA-Factory 0.9.99 (train.llamafactory_cli ")
    assert "submit again" in stub.first_refusal and "\n" not in stub.first_refusal
    [cached] = stub.cache.iterdir()  # written to a temporary file and renamed: nothing else is left there
    assert cached.name == "keys-llamafactory-0.9.99-transformers-5.6.0.json"

    catalog = Catalogues(stub.cache, wait_s=0.0).current(str(stub.cli), stub.env)  # a restarted daemon: cached
    assert catalog.llamafactory_version == lf_stub.VERSION and catalog.tensorboard is True
    assert lf_stub.NEW_KEY in catalog.accepted("train") and lf_stub.NEW_KEY in catalog.accepted("export")
    params = {"model_name_or_path": "Qwen/Qwen2-VL-2B-Instruct", "stage": "sft", lf_stub.NEW_KEY: 3}
    assert validate_params(params, command="train", catalog=catalog, dataset_dir=tmp_path, env={}) == []
    [old] = validate_params(params, command="train", catalog=load_catalog(), dataset_dir=tmp_path, env={})
    assert old.startswith(f"unknown key '{lf_stub.NEW_KEY}'") and "LLaMA-Factory 0.9.5 " in old
    # every key of the released version is still there, with the same types
    shipped = load_catalog()
    assert {k: v for k, v in catalog.keys.items() if k != lf_stub.NEW_KEY} == dict(shipped.keys)


def test_a_broken_llamafactory_falls_back_to_the_shipped_copy_with_one_warning(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    real_python = stack.llamafactory_venv() / "bin" / "python"
    cli = lf_stub.build_stub(tmp_path / "venv", real_python)
    init = tmp_path / "venv" / "site" / "llamafactory" / "__init__.py"
    init.write_text(init.read_text() + "raise ImportError('this release is broken')\n")
    env = {**os.environ, **stack.llamafactory_env(tmp_path / "lf")}
    catalogues = Catalogues(tmp_path / "cache", wait_s=GENERATE_TIMEOUT_S)
    with caplog.at_level(logging.WARNING, logger="daemon.train.catalogue"):
        first = catalogues.current(str(cli), env)
        again = catalogues.current(str(cli), env)
    assert first is again and first.llamafactory_version == "0.9.5"  # the shipped copy
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "cannot generate the key catalogue of LLaMA-Factory 0.9.99" in warning
    assert "this release is broken" in warning and "shipped for LLaMA-Factory 0.9.5" in warning
    assert "\n" not in warning
    assert not list((tmp_path / "cache").glob("keys-*.json"))


def test_a_cli_without_llamafactory_falls_back_with_one_warning(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").symlink_to(os.path.realpath(stack.llamafactory_venv() / "bin" / "python"))
    cli = bin_dir / "llamafactory-cli"
    cli.write_text("#!/bin/sh\nexit 1\n")
    cli.chmod(0o755)
    catalogues = Catalogues(tmp_path / "cache", wait_s=0.0)
    with caplog.at_level(logging.WARNING, logger="daemon.train.catalogue"):
        catalog = catalogues.current(str(cli), {"PATH": os.environ.get("PATH", "")})
        catalogues.current(str(cli), {})
    assert catalog.llamafactory_version == "0.9.5" and catalog.tensorboard is None
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warning.startswith(f"cannot ask {cli}'s python for its version (exit status 1: ")
    assert "PackageNotFoundError" in warning or "llamafactory" in warning
