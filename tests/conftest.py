"""
Shared fixtures.

Database tests run against real PostgreSQL: the server named by
``POLYSTREAM_TEST_DSN`` (an admin DSN, e.g.
``postgresql://postgres@127.0.0.1:5432/postgres``) or, when it is unset, an
embedded server started once per session.  Each test gets its own migrated
database.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from polystream.db import connect, create_database, drop_database, dsn_with_dbname, migrate
from polystream.embedded import open_embedded_postgres

# --- PostgreSQL ---------------------------------------------------------------


@pytest.fixture(scope="session")
def pg_admin_dsn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """DSN of a server where tests may create and drop databases."""
    configured = os.environ.get("POLYSTREAM_TEST_DSN")
    if configured:
        yield configured
        return
    state_dir: Path = tmp_path_factory.mktemp("embedded-pg")
    with open_embedded_postgres(state_dir) as dsn:
        yield dsn


@pytest.fixture
def db_dsn(pg_admin_dsn: str) -> Iterator[str]:
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
