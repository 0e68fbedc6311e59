"""The config file: every key documented with its default; a bad file stops the daemon with one line."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import msgspec
import pytest

from shared.config import Config, ConfigError, load_settings, parse_config

ROOT = Path(__file__).resolve().parents[2]


def test_documented_config_lists_every_key_with_its_default() -> None:
    documented = tomllib.loads((ROOT / "configs" / "ftmllm.toml").read_text())
    assert documented == msgspec.to_builtins(Config())


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[ocr]\ndpi = 'high'\n", "key 'ocr.dpi': Expected `int`, got `str`"),
        ("[ocr]\nengnie = 'cpu'\n", "unknown key 'ocr.engnie'"),
        ("[daemon]\nlog_level = 'loud'\n", "key 'daemon.log_level'"),
        ("[ocr\n", "not valid TOML"),
    ],
)
def test_bad_config_is_one_line_naming_file_key_and_fix(text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_config(text, "/etc/ftmllm/ftmllm.toml")
    msg = str(exc.value)
    assert msg.startswith("/etc/ftmllm/ftmllm.toml: ") and expected in msg and "\n" not in msg


def test_daemon_with_bad_config_exits_at_start_with_the_reason(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[hotfolder]\nsettle_s = 'soon'\n")
    r = subprocess.run([sys.executable, "-m", "daemon.main", "--config", str(cfg)], capture_output=True,
                       text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 2
    assert str(cfg) in r.stderr and "hotfolder.settle_s" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_home_puts_everything_under_one_dir(tmp_path: Path) -> None:
    s = load_settings(None, tmp_path)
    assert s.paths.state_dir == tmp_path / "state"
    assert s.paths.runtime_dir == tmp_path / "run"
    assert s.paths.inbox == tmp_path / "inbox"


def test_too_long_runtime_dir_is_refused_with_the_fix(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="too long for a Unix socket path"):
        load_settings(None, tmp_path / ("x" * 120))
