"""The systemd unit: rendering, install, and `systemd-analyze verify`."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from polystream.ops.service import install, render_unit, service_app

REPO = Path(__file__).resolve().parent.parent
EXE = Path("/opt/polystream/venv/bin/polystream")
CONFIG = Path("/etc/polystream/config.toml")


def settings(text: str) -> dict[str, list[str]]:
    """``Key=value`` lines of a unit, by key (comments and sections skipped)."""
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key, []).append(value)
    return found


def system_unit() -> str:
    return render_unit(executable=EXE, config_path=CONFIG, user="polystream", user_mode=False)


def test_system_unit() -> None:
    unit = settings(system_unit())
    expected = {
        "Type": "notify",
        "NotifyAccess": "main",
        "WatchdogSec": "30",
        "ExecStart": f"{EXE} run --config {CONFIG}",
        "Restart": "on-failure",
        "RestartSec": "5",
        "TimeoutStopSec": "30",
        "KillSignal": "SIGTERM",
        "KillMode": "mixed",
        "User": "polystream",
        "StateDirectory": "polystream",
        "RuntimeDirectory": "polystream",
        "EnvironmentFile": "-/etc/polystream/env",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectControlGroups": "yes",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
        "LockPersonality": "yes",
        "RestrictRealtime": "yes",
        "SystemCallArchitectures": "native",
        "UMask": "0077",
        "After": "network-online.target postgresql.service",
        "Wants": "network-online.target",
        "WantedBy": "multi-user.target",
    }
    for key, value in expected.items():
        assert unit[key] == [value], key
    assert unit["Environment"] == ["XDG_RUNTIME_DIR=%t/polystream"]
    assert "DSN" not in system_unit()  # secrets live in the environment file


def test_user_unit() -> None:
    text = render_unit(
        executable=Path("/home/ann/.venv/bin/polystream"),
        config_path=Path("/home/ann/.config/polystream/config.toml"),
        user="ignored",
        user_mode=True,
    )
    unit = settings(text)
    assert unit["WantedBy"] == ["default.target"]
    assert unit["Type"] == ["notify"]
    assert unit["WatchdogSec"] == ["30"]
    assert unit["EnvironmentFile"] == ["-/home/ann/.config/polystream/env"]
    for dropped in (
        "User",
        "After",
        "Wants",
        "ProtectSystem",
        "ProtectHome",
        "PrivateTmp",
        "PrivateDevices",
        "ProtectKernelTunables",
        "ProtectControlGroups",
        "Environment",
    ):
        assert dropped not in unit, dropped
    assert unit["NoNewPrivileges"] == ["yes"]
    assert unit["StateDirectory"] == ["polystream"]


def test_executable_under_home_relaxes_protect_home() -> None:
    text = render_unit(
        executable=Path("/home/ann/.venv/bin/polystream"),
        config_path=CONFIG,
        user="polystream",
        user_mode=False,
    )
    assert settings(text)["ProtectHome"] == ["read-only"]


def test_exec_start_quoting() -> None:
    text = render_unit(
        executable=Path("/opt/my apps/100%/polystream"),
        config_path=CONFIG,
        user=None,
        user_mode=False,
    )
    assert settings(text)["ExecStart"] == [f'"/opt/my apps/100%%/polystream" run --config {CONFIG}']
    assert "User" not in settings(text)


def test_relative_paths_are_refused() -> None:
    with pytest.raises(ValueError, match="absolute"):
        render_unit(executable=Path("polystream"), config_path=CONFIG, user=None, user_mode=False)


def test_deploy_file_is_the_rendering() -> None:
    assert (REPO / "deploy" / "polystream.service").read_text() == system_unit()


def test_install_system(tmp_path: Path) -> None:
    exe = tmp_path / "bin" / "polystream"
    result = install(
        False,
        executable=exe,
        unit_dir=tmp_path / "units",
        config_dir=tmp_path / "etc",
    )
    assert result.unit_path == tmp_path / "units" / "polystream.service"
    assert result.created == (
        result.unit_path,
        tmp_path / "etc" / "config.toml",
        tmp_path / "etc" / "env",
    )
    unit = settings(result.unit_path.read_text())
    assert unit["ExecStart"] == [f"{exe} run --config {tmp_path / 'etc' / 'config.toml'}"]
    assert stat.S_IMODE(result.env_path.stat().st_mode) == 0o600
    assert any(command.startswith("id -u polystream") for command in result.commands)
    assert "systemctl daemon-reload" in result.commands
    assert "systemctl enable --now polystream" in result.commands
    assert any("journalctl -u polystream" in command for command in result.commands)
    assert any("does not exist" in note for note in result.notes)

    result.config_path.write_text('[log]\nlevel = "debug"\n')
    again = install(False, executable=exe, unit_dir=tmp_path / "units", config_dir=tmp_path / "etc")
    assert again.created == (again.unit_path,)  # existing config and env are kept
    assert 'level = "debug"' in again.config_path.read_text()


def test_install_user(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    result = install(True, executable=Path("/usr/bin/true"), home=tmp_path)
    assert result.unit_path == tmp_path / ".config" / "systemd" / "user" / "polystream.service"
    assert result.config_path == tmp_path / ".config" / "polystream" / "config.toml"
    assert "WantedBy=default.target" in result.unit_path.read_text()
    assert "systemctl --user enable --now polystream" in result.commands
    assert not any("useradd" in command for command in result.commands)
    # pytest's tmp_path is under /tmp: the only note is the warning about that.
    assert [note for note in result.notes if "under /tmp" not in note] == []


def test_cli(tmp_path: Path) -> None:
    runner = CliRunner()
    out = runner.invoke(
        service_app,
        [
            "install",
            "--executable",
            "/usr/bin/true",
            "--unit-dir",
            str(tmp_path / "u"),
            "--config-dir",
            str(tmp_path / "c"),
        ],
    )
    assert out.exit_code == 0, out.output
    assert f"wrote {tmp_path / 'u' / 'polystream.service'}" in out.output
    assert "  systemctl enable --now polystream" in out.output
    shown = runner.invoke(service_app, ["show", "--user", "--executable", "/usr/bin/true"])
    assert shown.exit_code == 0
    assert "WantedBy=default.target" in shown.output


# --- systemd-analyze verify ------------------------------------------------------------

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_systemd_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None, reason="systemd-analyze not installed (apt-get install systemd)"
)


def verify(unit: Path, *, user_mode: bool, runtime_dir: Path) -> subprocess.CompletedProcess[str]:
    assert SYSTEMD_ANALYZE is not None
    env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime_dir)}  # a user manager needs one
    args = [SYSTEMD_ANALYZE, *(["--user"] if user_mode else []), "verify", str(unit)]
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=60, check=False)


@needs_systemd_analyze
@pytest.mark.parametrize("user_mode", [False, True], ids=["system", "user"])
def test_systemd_analyze_verify(tmp_path: Path, user_mode: bool) -> None:
    exe = tmp_path / "bin" / "polystream"
    exe.parent.mkdir()
    exe.write_text("#!/bin/sh\nexit 0\n")
    exe.chmod(0o755)
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    result = install(
        user_mode,
        executable=exe,
        unit_dir=tmp_path / "units",
        config_dir=tmp_path / "etc",
        home=tmp_path,
    )
    done = verify(result.unit_path, user_mode=user_mode, runtime_dir=runtime)
    # verify exits 0 on unknown keys and bad values (they are "ignored"): demand silence.
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ""
    assert done.stderr.strip() == ""


@needs_systemd_analyze
def test_systemd_analyze_catches_mistakes(tmp_path: Path) -> None:
    """The check above can fail: a bad value is reported."""
    unit = tmp_path / "polystream.service"
    unit.write_text(system_unit().replace("KillMode=mixed", "KillMode=sometimes"))
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    done = verify(unit, user_mode=False, runtime_dir=runtime)
    assert "KillMode" in done.stderr or "not executable" in done.stderr
