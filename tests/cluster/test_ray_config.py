"""[cluster] through the real daemon, without a cluster: the default stays local, and a ray backend the daemon
cannot use stops it with one line saying what to do."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from shared.config import ClusterConfig, load_settings
from tests.daemon_proc import ROOT

EXIT_CONFIG = 2


def _daemon(tmp_path: Path, cluster: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    home = tmp_path / "home"
    config = tmp_path / "ftmllm.toml"
    config.write_text(f"[hotfolder]\nenabled = false\n[cluster]\n{cluster}")
    return subprocess.run([sys.executable, "-m", "daemon.main", "--home", str(home), "--config", str(config)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60, env={**os.environ, **(env or {})})


def test_the_default_backend_is_local(tmp_path: Path) -> None:
    assert load_settings(None, tmp_path).config.cluster == ClusterConfig(backend="local", address="", shared_dir="")


def test_without_ray_installed_the_daemon_says_in_one_line_what_to_install(tmp_path: Path) -> None:
    # Ray is installed here ('.[test,ray]'); a module named ray that fails to import stands for a machine
    # without it, as Python's own "No module named" error would
    shadow = tmp_path / "noray"
    shadow.mkdir()
    (shadow / "ray.py").write_text("raise ModuleNotFoundError(\"No module named 'ray'\", name='ray')\n")
    r = _daemon(tmp_path, f'backend = "ray"\naddress = "http://127.0.0.1:1"\nshared_dir = "{tmp_path}"\n',
                env={"PYTHONPATH": f"{shadow}:{ROOT}"})
    assert r.returncode == EXIT_CONFIG, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "pip install 'ftmllm[ray]'" in lines[0] and 'backend = "local"' in lines[0]


def test_a_ray_backend_without_a_dashboard_url_or_a_shared_dir_is_refused_naming_the_key(tmp_path: Path) -> None:
    r = _daemon(tmp_path, f'backend = "ray"\naddress = "head:8265"\nshared_dir = "{tmp_path}"\n')
    assert r.returncode == EXIT_CONFIG and "[cluster] address" in r.stderr and "http://head:8265" in r.stderr
    assert "ray://head:10001" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = _daemon(tmp_path, 'backend = "ray"\naddress = "http://127.0.0.1:1"\n')
    assert r.returncode == EXIT_CONFIG and "[cluster] shared_dir" in r.stderr


def test_a_cluster_that_does_not_answer_stops_the_daemon_with_the_address(tmp_path: Path) -> None:
    r = _daemon(tmp_path, f'backend = "ray"\naddress = "http://127.0.0.1:1"\nshared_dir = "{tmp_path}"\n')
    assert r.returncode == EXIT_CONFIG, r.stderr
    assert "http://127.0.0.1:1 does not answer" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_an_unreadable_token_file_is_refused_naming_the_key(tmp_path: Path) -> None:
    r = _daemon(tmp_path, f'backend = "ray"\naddress = "http://127.0.0.1:1"\nshared_dir = "{tmp_path}"\n'
                          f'auth_token_file = "{tmp_path}/missing"\n')
    assert r.returncode == EXIT_CONFIG, r.stderr
    assert f"cannot read [cluster] auth_token_file {tmp_path}/missing" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
