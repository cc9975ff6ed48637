"""
Statements run on trio itself, without a worker thread, for the one path that
must not wait: a TP/SL decision's ``triggers`` row and its NOTIFY.

A :class:`~polystream.store.link.DbLink` call hops to a worker thread, which
must win the GIL back from the event loop after each libpq call (every 5 ms
at most while the loop is busy parsing frames): a few milliseconds each, tens
under load. :class:`DirectLink` instead sends the statement with libpq's
asynchronous API (psycopg's ``pq.PGconn``, non-blocking), waits for the
socket with ``trio.lowlevel.wait_readable`` / ``wait_writable`` and reads the
result on the loop: one prepared statement, one autocommit round trip (a
single statement is its own transaction). Parameters are dumped by psycopg's
own adapters (``psycopg.adapt.Transformer``), in text format, and statements
use ``$1``.. placeholders (:func:`numbered` turns ``%(name)s`` ones into them).

Any failure, and a cancellation mid-statement, closes the connection (its
state is unknown); the next call reconnects (the connect runs in a worker
thread, once). The DSN's password never reaches a message.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from typing import Any

import attrs
import psycopg
import structlog
import trio
from psycopg import pq
from psycopg.adapt import PyFormat, Transformer

from polystream.errors import DatabaseError
from polystream.logs import redact
from polystream.stats import Stats
from polystream.store import db

__all__ = ["DirectLink", "Rows", "numbered"]

logger = structlog.get_logger(__name__)

Rows = list[tuple[str | None, ...]]
"""Result rows, each value as PostgreSQL's text form (``None`` for NULL)."""

_NAMED = re.compile(r"%\((\w+)\)s")


def numbered(sql: str) -> tuple[str, tuple[str, ...]]:
    """
    ``sql`` with ``%(name)s`` placeholders as ``$1``.. and the names in that
    order (a name used twice keeps its number).
    """
    names: list[str] = []

    def place(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in names:
            names.append(name)
        return f"${names.index(name) + 1}"

    return _NAMED.sub(place, sql), tuple(names)


@attrs.define(eq=False)
class DirectLink:
    """
    One autocommit connection whose statements run on the trio loop (see the
    module docstring). ``execute`` is serialised: one statement at a time.
    """

    dsn: str
    name: str
    stats: Stats | None = None
    statement_timeout: float = 30.0
    _conn: psycopg.Connection[Any] | None = None
    _prepared: dict[str, bytes] = attrs.field(factory=dict)
    _lock: trio.Lock = attrs.field(factory=trio.Lock)

    async def _connected(self) -> psycopg.Connection[Any]:
        if self._conn is not None and not self._conn.closed:
            return self._conn
        self._prepared.clear()
        conn: psycopg.Connection[Any] = await trio.to_thread.run_sync(
            lambda: db.connect(
                self.dsn,
                application_name=f"polystream-{self.name}",
                statement_timeout_s=self.statement_timeout,
                autocommit=True,
            )
        )
        self._conn = conn
        return conn

    async def warm_up(self) -> None:
        """
        Connect ahead of the first statement, so that the first trigger does not
        wait for a connect (tens of milliseconds, in a worker thread). A failure
        is logged and counted like a statement's; the first :meth:`execute`
        connects again. Never raises a database error.
        """
        async with self._lock:
            try:
                await self._connected()
            except (psycopg.Error, OSError, DatabaseError) as exc:
                self._drop()
                self._failed(self._error(exc))

    def _error(self, exc: BaseException) -> DatabaseError:
        return DatabaseError(f"{self.name}: {redact(str(exc)).splitlines()[0]}")

    async def execute(self, sql: str, params: Sequence[Any]) -> Rows:
        """
        Run ``sql`` (``$n`` placeholders) with ``params`` as a prepared
        statement; the rows of its result, values in text form.

        Raises:
            DatabaseError: PostgreSQL is unreachable or the statement failed
                (the connection is closed; the next call reconnects).
        """
        try:  # uncontended (the common case): no scheduling round before the statement
            self._lock.acquire_nowait()
        except trio.WouldBlock:
            await self._lock.acquire()
        try:
            started = time.monotonic()
            try:
                conn = await self._connected()
                rows = await self._run(conn, sql, params)
            except (psycopg.Error, OSError, DatabaseError) as exc:
                self._drop()
                error = self._error(exc)
                self._failed(error)
                raise error from None
            except BaseException:
                self._drop()  # cancelled mid-statement: the connection's state is unknown
                raise
        finally:
            self._lock.release()
        if self.stats is not None:
            self.stats.db_connected = True
            self.stats.last_write_at = now = time.monotonic()
            self.stats.db_seconds.labels(self.name).observe(now - started)
        return rows

    def _failed(self, error: DatabaseError) -> None:
        if self.stats is not None:
            self.stats.db_errors += 1
            self.stats.db_connected = False
            self.stats.last_db_error = str(error)[:300]
        logger.warning("db_call_failed", link=self.name, error=str(error)[:300])

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.close()
        self._conn = None

    async def _run(self, conn: psycopg.Connection[Any], sql: str, params: Sequence[Any]) -> Rows:
        pg = conn.pgconn
        transformer = Transformer(conn)
        values = transformer.dump_sequence(params, [PyFormat.TEXT] * len(params))
        name = self._prepared.get(sql)
        if name is None:
            name = f"polystream_{len(self._prepared)}".encode()
            pg.send_prepare(name, sql.encode())
            await _result(pg)
            self._prepared[sql] = name
        pg.send_query_prepared(name, values, param_formats=transformer.formats)
        result = await _result(pg)
        return [
            tuple(_text(result.get_value(row, column)) for column in range(result.nfields))
            for row in range(result.ntuples)
        ]

    def close(self) -> None:
        """Close the connection (safe to call twice)."""
        self._drop()


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode()


async def _result(pg: pq.abc.PGconn) -> pq.abc.PGresult:
    """Flush what was sent, wait for the whole answer on the loop, return its last result."""
    while pg.flush():  # 1: more to send, the socket is full
        await trio.lowlevel.wait_writable(pg.socket)
    while True:
        pg.consume_input()
        if not pg.is_busy():
            break
        await trio.lowlevel.wait_readable(pg.socket)
    last = None
    while (result := pg.get_result()) is not None:
        last = result
    if last is None:
        raise DatabaseError("no result")
    if last.status not in (pq.ExecStatus.COMMAND_OK, pq.ExecStatus.TUPLES_OK):
        message = (last.error_message or b"statement failed").decode(errors="replace").strip()
        raise DatabaseError(message)
    return last
