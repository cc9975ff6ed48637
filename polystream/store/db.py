"""
PostgreSQL connections, schema migrations and database helpers.

All calls here are blocking (psycopg 3 sync connections); async code runs
them with ``trio.to_thread.run_sync``.  Errors leave this module as
:class:`polystream.errors.DatabaseError`, and no message or log line carries a
password: DSNs are passed through :func:`polystream.logs.redact` first.
"""

from __future__ import annotations

import itertools
import re
from importlib import resources
from typing import Any

import attrs
import psycopg
import structlog
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import TupleRow, tuple_row

from polystream.errors import DatabaseError
from polystream.logs import redact

__all__ = [
    "Migration",
    "connect",
    "create_database",
    "drop_database",
    "dsn_with_dbname",
    "load_migrations",
    "migrate",
    "pending_migrations",
]

logger = structlog.get_logger(__name__)

# Any constant works as long as every migrator uses the same one: "polystrm".
_MIGRATE_LOCK_ID = 0x706F6C797374726D
_MIGRATION_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")
_REDACTED = "***"
_CONNECT_TIMEOUT_S = 10  # unless the DSN sets connect_timeout


def _scrub(message: str, dsn: str) -> str:
    """Remove the password of ``dsn`` from a driver error ``message``."""
    try:
        password = conninfo_to_dict(dsn).get("password")
    except psycopg.Error:
        # An unparsable DSN: libpq's message may quote any part of it.
        return "invalid connection string"
    if password:
        message = message.replace(str(password), _REDACTED)
    return message.strip()


def connect(
    dsn: str,
    *,
    application_name: str = "polystream",
    statement_timeout_s: float | None = 30.0,
    autocommit: bool = False,
    synchronous_commit: bool = True,
) -> psycopg.Connection[TupleRow]:
    """
    Open a blocking connection to PostgreSQL.

    Args:
        dsn: a libpq key=value string or ``postgresql://`` URI.
        application_name: shown in ``pg_stat_activity``.
        statement_timeout_s: seconds the server lets one statement run
            before cancelling it; ``None`` keeps the server default.  This is
            the only way to bound a call made from a worker thread.
        autocommit: psycopg autocommit mode (needed for LISTEN, CREATE DATABASE).
        synchronous_commit: False sets the session's ``synchronous_commit``
            off: a commit returns before its WAL is flushed (the WAL writer
            flushes within ``wal_writer_delay``, 200 ms by default); a server
            crash can lose the last such commits, never corrupt anything
            (https://www.postgresql.org/docs/current/wal-async-commit.html).

    Waits at most 10 s for the server unless the DSN sets ``connect_timeout``.

    Raises:
        DatabaseError: the DSN is malformed or the server cannot be reached
            or refuses the login.  The message names the redacted DSN.
    """
    try:
        given = conninfo_to_dict(dsn)
        extra: dict[str, str | int] = {"application_name": application_name}
        if "connect_timeout" not in given:
            extra["connect_timeout"] = _CONNECT_TIMEOUT_S
        options = [str(given.get("options") or "")]  # after the DSN's own (a search_path...)
        if statement_timeout_s is not None:
            options.append(f"-c statement_timeout={max(1, round(statement_timeout_s * 1000))}")
        if not synchronous_commit:
            options.append("-c synchronous_commit=off")
        if len(options) > 1:
            extra["options"] = " ".join(options)
        return psycopg.connect(make_conninfo(dsn, **extra), autocommit=autocommit)
    except psycopg.Error as exc:
        # "from None": the driver's exception may quote the DSN, password included.
        raise DatabaseError(f"cannot connect to {redact(dsn)}: {_scrub(str(exc), dsn)}") from None


def dsn_with_dbname(dsn: str, name: str) -> str:
    """
    Return ``dsn`` pointing at database ``name`` (as a key=value string).

    Raises:
        DatabaseError: ``dsn`` cannot be parsed.
    """
    try:
        return make_conninfo(dsn, dbname=name)
    except psycopg.Error:
        raise DatabaseError(f"invalid connection string {redact(dsn)}") from None


def create_database(admin_dsn: str, name: str) -> None:
    """
    Create database ``name`` on the server of ``admin_dsn``.

    Raises:
        DatabaseError: the server is unreachable or the database exists.
    """
    with connect(admin_dsn, autocommit=True) as conn:
        try:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        except psycopg.Error as exc:
            raise DatabaseError(f"cannot create database {name!r}: {exc}") from exc


def drop_database(admin_dsn: str, name: str) -> None:
    """
    Drop database ``name`` if it exists, disconnecting its sessions.

    Raises:
        DatabaseError: the server is unreachable or refuses.
    """
    with connect(admin_dsn, autocommit=True) as conn:
        try:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )
        except psycopg.Error as exc:
            raise DatabaseError(f"cannot drop database {name!r}: {exc}") from exc


@attrs.frozen
class Migration:
    """
    One numbered SQL file of ``polystream/migrations``.

    Attributes:
        version: the file's four-digit prefix, e.g. ``1`` for ``0001_init.sql``.
        name: the file name without ``.sql``, e.g. ``"0001_init"``.
        sql: the file's text: plain statements, no BEGIN/COMMIT.
    """

    version: int
    name: str
    sql: str

    @classmethod
    def from_file(cls, filename: str, text: str) -> Migration:
        """
        Build a migration from its file name and text.

        Raises:
            DatabaseError: the name is not ``NNNN_lower_snake.sql``.
        """
        match = _MIGRATION_NAME.match(filename)
        if match is None:
            raise DatabaseError(f"migration file {filename!r} is not named NNNN_name.sql")
        return cls(version=int(match.group(1)), name=filename.removesuffix(".sql"), sql=text)


def load_migrations() -> list[Migration]:
    """
    Read the packaged migrations, ordered by version.

    Raises:
        DatabaseError: a file is misnamed or two files share a version.
    """
    folder = resources.files("polystream.store").joinpath("migrations")
    found = sorted(
        (
            Migration.from_file(entry.name, entry.read_text(encoding="utf-8"))
            for entry in folder.iterdir()
            if entry.name.endswith(".sql")
        ),
        key=lambda m: m.version,
    )
    for before, after in itertools.pairwise(found):
        if before.version == after.version:
            raise DatabaseError(f"migrations {before.name} and {after.name} share a version")
    return found


def _lock(conn: psycopg.Connection[Any]) -> None:
    conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATE_LOCK_ID,))


def _applied_versions(conn: psycopg.Connection[Any]) -> set[int]:
    with conn.transaction():
        _lock(conn)
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version int PRIMARY KEY,"
            " name text,"
            " applied_at timestamptz DEFAULT now())"
        )
        with conn.cursor(row_factory=tuple_row) as cur:
            rows = cur.execute("SELECT version FROM schema_migrations").fetchall()
    return {int(row[0]) for row in rows}


def _apply(conn: psycopg.Connection[Any], migration: Migration) -> bool:
    """Apply one migration in its own transaction; False if another migrator did."""
    with conn.transaction():
        _lock(conn)
        done = conn.execute(
            "SELECT 1 FROM schema_migrations WHERE version = %s", (migration.version,)
        ).fetchone()
        if done is not None:
            return False
        # bytes: sent as one simple-protocol query, so a file may hold many statements.
        conn.execute(migration.sql.encode("utf-8"))
        conn.execute(
            "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)",
            (migration.version, migration.name),
        )
    return True


def pending_migrations(conn: psycopg.Connection[Any]) -> list[str]:
    """
    Names of the packaged migrations not yet applied, oldest first.

    Read-only: a database never migrated (no ``schema_migrations``) has all
    of them pending.  Runs in ``conn.transaction()``.

    Raises:
        DatabaseError: the query failed.
    """
    try:
        with conn.transaction(), conn.cursor(row_factory=tuple_row) as cur:
            cur.execute("SELECT to_regclass('schema_migrations') IS NOT NULL")
            exists = cur.fetchone()
            done: set[int] = set()
            if exists is not None and exists[0]:
                cur.execute("SELECT version FROM schema_migrations")
                done = {int(row[0]) for row in cur.fetchall()}
    except psycopg.Error as exc:
        raise DatabaseError(f"cannot read schema_migrations: {exc}") from exc
    return [m.name for m in load_migrations() if m.version not in done]


def migrate(conn: psycopg.Connection[Any]) -> list[str]:
    """
    Apply the pending migrations, oldest first; return the names applied.

    Each file runs in its own transaction, recorded in ``schema_migrations``,
    under ``pg_advisory_xact_lock`` so that concurrent migrators apply each
    file once.  A second run returns ``[]``.  ``conn`` must be idle (no
    transaction open); it may be in autocommit mode or not.

    Raises:
        DatabaseError: ``conn`` is inside a transaction, or a statement failed
            (the message names the migration; its transaction is rolled back).
    """
    if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
        raise DatabaseError("migrate needs a connection with no transaction open")
    log = logger.bind(database=conn.info.dbname)
    migrations = load_migrations()
    applied: list[str] = []
    current = "schema_migrations"
    try:
        done = _applied_versions(conn)
        for migration in migrations:
            if migration.version in done:
                continue
            current = migration.name
            if _apply(conn, migration):
                log.info("migration_applied", migration=migration.name)
                applied.append(migration.name)
    except psycopg.Error as exc:
        raise DatabaseError(f"migration {current} failed: {exc}") from exc
    return applied
