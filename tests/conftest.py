"""
Shared fixtures.

Database tests run against real PostgreSQL: the server named by
``POLYSTREAM_TEST_DSN`` (an admin DSN, e.g.
``postgresql://postgres@127.0.0.1:5432/postgres``) or, when it is unset, an
embedded server started once per session.  Each test gets its own migrated
database.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil  # type: ignore[import-untyped]
import pytest
from throwaway_pg import ThrowawayPostgres

from polystream.store.db import connect, create_database, drop_database, dsn_with_dbname, migrate
from polystream.store.embedded import open_embedded_postgres

# --- PostgreSQL ---------------------------------------------------------------


@contextlib.contextmanager
def _embedded_state_dir() -> Iterator[Path]:
    """
    A scratch directory for an embedded server, removed afterwards.

    Not under pytest's ``tmp_path``: as root, the server runs as another user
    and needs its ancestors traversable, but every pytest session resets
    ``/tmp/pytest-of-root`` to 0700, which breaks a server started by a
    concurrent session.
    """
    with tempfile.TemporaryDirectory(prefix="polystream-pg-", ignore_cleanup_errors=True) as tmp:
        try:
            yield Path(tmp)
        finally:
            for lock_file in Path(tmp).glob("**/pgdata/postmaster.pid"):
                _stop_leftover(lock_file)


def _stop_leftover(lock_file: Path) -> None:
    """Terminate a server a failed test left running (its ``postmaster.pid``)."""
    with contextlib.suppress(OSError, ValueError, psutil.Error):
        process = psutil.Process(int(lock_file.read_text().split("\n", 1)[0]))
        if process.name() == "postgres":
            process.terminate()
            process.wait(10)


@pytest.fixture
def embedded_state_dir() -> Iterator[Path]:
    """A fresh state directory for :func:`open_embedded_postgres`."""
    with _embedded_state_dir() as path:
        yield path


@pytest.fixture(scope="session")
def pg_admin_dsn() -> Iterator[str]:
    """DSN of a server where tests may create and drop databases."""
    configured = os.environ.get("POLYSTREAM_TEST_DSN")
    if configured:
        yield configured
        return
    with _embedded_state_dir() as state_dir, open_embedded_postgres(state_dir) as dsn:
        yield dsn


@contextlib.contextmanager
def _fresh_database(pg_admin_dsn: str) -> Iterator[str]:
    """DSN of a fresh, migrated database ``ps_test_<random>``, dropped afterwards."""
    name = f"ps_test_{uuid.uuid4().hex[:12]}"
    create_database(pg_admin_dsn, name)
    dsn = dsn_with_dbname(pg_admin_dsn, name)
    try:
        with connect(dsn) as conn:
            migrate(conn)
        yield dsn
    finally:
        drop_database(pg_admin_dsn, name)


@pytest.fixture
def db_dsn(pg_admin_dsn: str) -> Iterator[str]:
    """DSN of a fresh, migrated database ``ps_test_<random>``, dropped afterwards."""
    with _fresh_database(pg_admin_dsn) as dsn:
        yield dsn


@pytest.fixture
def other_db_dsn(pg_admin_dsn: str) -> Iterator[str]:
    """A second fresh database beside ``db_dsn``, for a test comparing two runs."""
    with _fresh_database(pg_admin_dsn) as dsn:
        yield dsn


@pytest.fixture
def throwaway_server() -> Iterator[ThrowawayPostgres]:
    """A PostgreSQL server of the test's own, which it may stop and start (an outage)."""
    pg = ThrowawayPostgres()
    pg.init()
    pg.start()
    try:
        yield pg
    finally:
        pg.remove()
