"""Which config file is read (the XDG one without --config), keys that do nothing refused, `--check-config`,
and what SIGHUP applies to a running daemon and what it says waits for a restart."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from daemon.daemon import LIVE_KEYS
from shared.client import RemoteError
from shared.config import ConfigError, load_settings, parse_config
from shared.protocol import Done, JobDetail, PauseQueue, Submit
from tests.daemon_proc import ROOT, DaemonProc, wait_for


def ftmllmd(*argv: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "daemon.main", *argv], capture_output=True, text=True, timeout=60,
                          cwd=ROOT, env=env)


def xdg_env(tmp_path: Path, text: str) -> tuple[dict[str, str], Path]:
    cfg = tmp_path / "xdg" / "ftmllm" / "ftmllm.toml"
    cfg.parent.mkdir(parents=True)
    cfg.write_text(text)
    env = {k: v for k, v in os.environ.items() if k not in ("FTMLLM_CONFIG", "FTMLLM_HOME")}
    return {**env, "XDG_CONFIG_HOME": str(tmp_path / "xdg")}, cfg


def test_the_xdg_config_file_is_read_without_config_by_the_daemon_and_the_clients(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env, cfg = xdg_env(tmp_path, "[ocr]\nworkers = 3\n")
    r = ftmllmd("--check-config", env=env)
    assert r.returncode == 0 and r.stdout.strip() == f"ftmllmd: {cfg}: config OK", r.stdout + r.stderr
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("FTMLLM_CONFIG", raising=False)
    monkeypatch.delenv("FTMLLM_HOME", raising=False)
    for client in (False, True):
        s = load_settings(client=client)
        assert s.config_file == cfg and s.config.ocr.workers == 3
    # --config wins, and --home keeps its setup free of the user's file
    other = tmp_path / "other.toml"
    other.write_text("[ocr]\nworkers = 5\n")
    assert load_settings(other).config.ocr.workers == 5
    assert load_settings(None, tmp_path / "home").config.ocr.workers == 2


def test_a_key_that_does_nothing_is_refused_by_check_config_in_one_line(tmp_path: Path) -> None:
    env, cfg = xdg_env(tmp_path, '[daemon]\ntcp_endpoint = "tcp://0.0.0.0:5555"\n')
    r = ftmllmd("--check-config", env=env)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip() == (f"ftmllmd: {cfg}: key 'daemon.tcp_endpoint' does nothing (remote clients are not "
                                "supported: run ftctl/ftui on the server, over ssh); remove it")
    with pytest.raises(ConfigError, match=r"key 'daemon\.curve_authorized_keys' does nothing"):
        parse_config('[daemon]\ncurve_authorized_keys = "/etc/keys"\n', "f.toml")


@pytest.mark.parametrize("listen", ["0.0.0.0:9464", "[::]:9464", "192.168.1.5:9464"])
def test_a_metrics_listener_off_loopback_is_refused(listen: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_config(f'[metrics]\nlisten = "{listen}"\n', "/etc/ftmllm/ftmllm.toml")
    assert str(exc.value).startswith("/etc/ftmllm/ftmllm.toml: key 'metrics.listen': ") and "127.0.0.1:PORT" in str(
        exc.value)


def test_sighup_applies_the_live_keys_and_names_those_that_wait_for_a_restart() -> None:
    d = DaemonProc()
    cfg = d.home / "ftmllm.toml"
    cfg.write_text("[daemon]\nlog_level = \"info\"\n")
    d.config = cfg
    d.start()
    try:
        c = d.client()
        c.call(PauseQueue(), Done)  # what is submitted stays queued: the per-user cap counts it
        cfg.write_text("[daemon]\nlog_level = \"debug\"\nmax_queued_per_user = 1\n[ocr]\nworkers = 3\n")
        assert d.proc is not None
        d.proc.send_signal(signal.SIGHUP)
        line = (f"reloaded {cfg}: applied daemon.log_level, daemon.max_queued_per_user; "
                "needs a restart: ocr.workers")
        wait_for(lambda: line in d.log_text(), 20, "the reload's line")
        c.call(Submit(kind="selftest", spec={"steps": 1}), JobDetail)
        with pytest.raises(RemoteError, match="max_queued_per_user"):
            c.call(Submit(kind="selftest", spec={"steps": 1}), JobDetail)
        # a key still waiting is said again at the next reload; one that was applied is not
        d.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: f"reloaded {cfg}: nothing to apply; needs a restart: ocr.workers" in d.log_text(), 20,
                 "the second reload's line")
    finally:
        d.close()


def test_the_docs_name_every_key_sighup_applies() -> None:
    header = (ROOT / "configs" / "ftmllm.toml").read_text().split("[paths]", 1)[0]
    readme = (ROOT / "README.md").read_text()
    for key in LIVE_KEYS:
        assert key in header, key
        # the README abbreviates the retention pair as daemon.event_retention[_days]
        assert key.removesuffix("_days") in readme, key
