"""The embedded PostgreSQL server: start, connect, stop, share, and reap orphans."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
from pathlib import Path

import orjson
import psutil  # type: ignore[import-untyped]
import pytest
from structlog.testing import capture_logs

from polystream.store.db import connect
from polystream.store.embedded import database_dsn, open_embedded_postgres

pytestmark = pytest.mark.slow  # each start runs initdb/pg_ctl: about a second

CHILD = """
import sys
from pathlib import Path

import structlog

structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
from polystream.store.embedded import open_embedded_postgres

with open_embedded_postgres(Path(sys.argv[1])) as dsn:
    print("READY", flush=True)
    sys.stdin.read()
"""


def _gone(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


def _record(state_dir: Path) -> dict[str, int]:
    record: dict[str, int] = orjson.loads((state_dir / "embedded.json").read_bytes())
    return record


def _dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def _select_one(dsn: str) -> object:
    with connect(dsn) as conn:
        row = conn.execute("SELECT 1").fetchone()
    return row[0] if row else None


def test_start_connect_stop(embedded_state_dir: Path) -> None:
    state_dir = embedded_state_dir / "not" / "yet" / "state"
    with open_embedded_postgres(state_dir) as dsn:
        assert _select_one(dsn) == 1
        record = _record(state_dir)
        assert record["owner_pid"] == os.getpid()
        postmaster = record["postmaster_pid"]
        assert not _gone(postmaster)
        assert (state_dir / "pgdata" / "PG_VERSION").exists()
    assert _gone(postmaster)
    assert not (state_dir / "embedded.json").exists()

    # Stale leftovers: a record naming a dead owner, a lock file naming a live
    # process that is not postgres.  Neither stops a fresh start.
    (state_dir / "embedded.json").write_bytes(
        orjson.dumps({"owner_pid": _dead_pid(), "postmaster_pid": _dead_pid()})
    )
    lock_file = state_dir / "pgdata" / "postmaster.pid"
    lock_file.write_text(f"{os.getpid()}\n{state_dir / 'pgdata'}\n0\n5432\n\n\n\nready\n")
    with open_embedded_postgres(state_dir) as dsn:
        assert _select_one(dsn) == 1
        assert _record(state_dir)["owner_pid"] == os.getpid()


def test_nested_open_shares_server(embedded_state_dir: Path) -> None:
    with open_embedded_postgres(embedded_state_dir) as outer:
        postmaster = _record(embedded_state_dir)["postmaster_pid"]
        with open_embedded_postgres(embedded_state_dir) as inner:
            assert inner == outer
        assert _select_one(outer) == 1
    assert _gone(postmaster)


def test_orphan_is_stopped_and_replaced(embedded_state_dir: Path) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(embedded_state_dir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert child.stdout is not None
        ready, _, _ = select.select([child.stdout], [], [], 30.0)
        assert ready and child.stdout.readline() == b"READY\n"
        record = _record(embedded_state_dir)
        assert record["owner_pid"] == child.pid
    finally:
        child.send_signal(signal.SIGKILL)  # no atexit, no cleanup: an orphan
        child.wait()
    orphan = record["postmaster_pid"]
    assert not _gone(orphan)

    with capture_logs() as logs, open_embedded_postgres(embedded_state_dir) as dsn:
        assert _gone(orphan)
        fresh = _record(embedded_state_dir)
        assert fresh["owner_pid"] == os.getpid()
        assert fresh["postmaster_pid"] != orphan
        assert _select_one(dsn) == 1
    found = [e for e in logs if e["event"] == "embedded_postgres_orphan_found"]
    assert found and found[0]["owner_pid"] == child.pid
    assert found[0]["postmaster_pid"] == orphan
    assert found[0]["log_level"] == "warning"


def test_database_dsn_prefers_configured(embedded_state_dir: Path) -> None:
    configured = "postgresql://u:pw@db.example/prod"
    with database_dsn(configured, embedded_state_dir / "unused") as dsn:
        assert dsn == configured
    assert not (embedded_state_dir / "unused").exists()
    with database_dsn("", embedded_state_dir / "state") as dsn:
        assert _select_one(dsn) == 1
