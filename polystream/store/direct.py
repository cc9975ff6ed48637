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

Beside :meth:`DirectLink.execute` (send, wait, read), a statement can be
sent *without waiting* from whichever task decides, with no scheduling round
in between (:meth:`DirectLink.send_now`), and its answer read later by any
task: without waiting (:meth:`DirectLink.poll`, which the router calls
between frames) or by waiting for it (:meth:`DirectLink.finish`, the
executor's task). PostgreSQL commits and delivers the NOTIFY as soon as the
statement arrives; reading the answer only frees the connection for the next.
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
    # One statement at a time; a semaphore, not a lock: the task that sends a
    # statement (send_now) need not be the one that reads its answer.
    _busy: trio.Semaphore = attrs.field(factory=lambda: trio.Semaphore(1, max_value=1))
    _sent_at: float | None = None  # a send_now statement is on the wire since (monotonic s)
    _waiter: trio.CancelScope | None = None  # finish() waiting on the socket

    async def _connected(self) -> psycopg.Connection[Any]:
        if self._conn is not None and self.connected:
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

    async def warm_up(self, statements: Sequence[str] = ()) -> None:
        """
        Connect ahead of the first statement and prepare ``statements``
        (``$n`` placeholders), so that the first trigger waits for no connect
        (tens of milliseconds, in a worker thread) and can go out at once
        (:meth:`send_now` needs a prepared statement). A failure is logged and
        counted like a statement's; the first :meth:`execute` connects again.
        Never raises a database error.
        """
        async with self._busy:
            try:
                conn = await self._connected()
                for sql in statements:
                    await self._prepare(conn, sql)
            except (psycopg.Error, OSError, DatabaseError) as exc:
                self._broken(exc)

    def _error(self, exc: BaseException) -> DatabaseError:
        return DatabaseError(f"{self.name}: {redact(str(exc)).splitlines()[0]}")

    def _broken(self, exc: BaseException) -> DatabaseError:
        """A statement failed: close the connection (the next call reconnects), count, log."""
        self._drop()
        error = self._error(exc)
        self._failed(error)
        return error

    async def execute(self, sql: str, params: Sequence[Any]) -> Rows:
        """
        Run ``sql`` (``$n`` placeholders) with ``params`` as a prepared
        statement; the rows of its result, values in text form.

        Raises:
            DatabaseError: PostgreSQL is unreachable or the statement failed
                (the connection is closed; the next call reconnects).
        """
        try:  # uncontended (the common case): no scheduling round before the statement
            self._busy.acquire_nowait()
        except trio.WouldBlock:
            await self._busy.acquire()
        try:
            started = time.monotonic()
            try:
                conn = await self._connected()
                rows = await self._run(conn, sql, params)
            except (psycopg.Error, OSError, DatabaseError) as exc:
                raise self._broken(exc) from None
            except BaseException:
                self._drop()  # cancelled mid-statement: the connection's state is unknown
                raise
        finally:
            self._busy.release()
        self._succeeded(started)
        return rows

    def _succeeded(self, started: float) -> None:
        if self.stats is not None:
            self.stats.db_connected = True
            self.stats.last_write_at = now = time.monotonic()
            self.stats.db_seconds.labels(self.name).observe(now - started)

    # ------------------------------------------------------------ send now, read later

    @property
    def connected(self) -> bool:
        """
        Whether the connection is open (after a failure or a cancellation it
        is closed, and what the session held, e.g. advisory locks, is gone).
        """
        return self._conn is not None and not self._conn.closed

    @property
    def in_flight(self) -> bool:
        """Whether a :meth:`send_now` statement's answer is still to be read."""
        return self._sent_at is not None

    def can_send_now(self, sql: str) -> bool:
        """Whether :meth:`send_now` of ``sql`` would send now (a cheap look, nothing is sent)."""
        return self.connected and sql in self._prepared and self._busy.value > 0

    def send_now(self, sql: str, params: Sequence[Any]) -> bool:
        """
        Send ``sql`` (prepared by :meth:`warm_up` or an earlier
        :meth:`execute`) with ``params`` at once, without waiting: no
        scheduling round, callable from any task. False, and nothing sent,
        when that cannot be done now: another statement is on the wire, the
        connection is not open, or ``sql`` is not prepared on it (then use
        :meth:`execute`). After True, read the answer with :meth:`poll` or
        :meth:`finish`.

        Raises:
            DatabaseError: the send failed (the connection is closed).
        """
        conn, name = self._conn, self._prepared.get(sql)
        if conn is None or conn.closed or name is None:
            return False
        try:
            self._busy.acquire_nowait()
        except trio.WouldBlock:
            return False
        try:
            _send_prepared(conn, name, params)
            conn.pgconn.flush()  # what a full socket keeps, poll() and finish() send
        except (psycopg.Error, OSError) as exc:
            self._busy.release()
            raise self._broken(exc) from None
        self._sent_at = time.monotonic()
        return True

    def poll(self) -> Rows | None:
        """
        The answer of the :meth:`send_now` statement if it has all arrived
        (rows, values in text form), else None; never waits. Taking it frees
        the connection and ends a :meth:`finish` that waits for it elsewhere.

        Raises:
            DatabaseError: the statement failed or the connection broke (it is
                closed; the next call reconnects).
        """
        if self._sent_at is None or self._conn is None:
            return None
        pg = self._conn.pgconn
        try:
            if pg.flush() == 0:
                pg.consume_input()
            if pg.is_busy():
                return None
            rows = _rows(_last_result(pg))
        except (psycopg.Error, OSError, DatabaseError) as exc:
            self._settle()
            raise self._broken(exc) from None
        started = self._sent_at
        self._settle()
        self._succeeded(started)
        return rows

    def _settle(self) -> None:
        """The send_now statement is answered (or lost): free the link, end a waiting finish()."""
        self._sent_at = None
        self._busy.release()
        if self._waiter is not None:
            self._waiter.cancel()

    async def finish(self) -> Rows | None:
        """
        Wait for the :meth:`send_now` statement's answer and return it; None
        when another task took it meanwhile (:meth:`poll`) or none is on the
        wire. A cancellation closes the connection (its state is unknown) and
        frees the link.

        Raises:
            DatabaseError: as :meth:`poll`.
        """
        while self._sent_at is not None and self._conn is not None:
            rows = self.poll()
            if rows is not None or self._sent_at is None:
                return rows
            pg = self._conn.pgconn
            with trio.CancelScope() as self._waiter:
                try:
                    if pg.flush():
                        await trio.lowlevel.wait_writable(pg.socket)
                    else:
                        await trio.lowlevel.wait_readable(pg.socket)
                except BaseException:
                    if self._sent_at is not None and not self._waiter.cancel_called:
                        self._settle()  # cancelled from outside mid-statement
                        self._drop()
                    raise
                finally:
                    self._waiter = None
        return None

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

    async def _prepare(self, conn: psycopg.Connection[Any], sql: str) -> bytes:
        name = self._prepared.get(sql)
        if name is None:
            name = f"polystream_{len(self._prepared)}".encode()
            conn.pgconn.send_prepare(name, sql.encode())
            await _result(conn.pgconn)
            self._prepared[sql] = name
        return name

    async def _run(self, conn: psycopg.Connection[Any], sql: str, params: Sequence[Any]) -> Rows:
        _send_prepared(conn, await self._prepare(conn, sql), params)
        return _rows(await _result(conn.pgconn))

    def close(self) -> None:
        """Close the connection (safe to call twice); a statement on the wire is abandoned."""
        if self._sent_at is not None:
            self._settle()
        self._drop()


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode()


def _send_prepared(conn: psycopg.Connection[Any], name: bytes, params: Sequence[Any]) -> None:
    """Queue prepared statement ``name`` with ``params`` (dumped in text form by psycopg)."""
    transformer = Transformer(conn)
    values = transformer.dump_sequence(params, [PyFormat.TEXT] * len(params))
    conn.pgconn.send_query_prepared(name, values, param_formats=transformer.formats)


def _rows(result: pq.abc.PGresult) -> Rows:
    return [
        tuple(_text(result.get_value(row, column)) for column in range(result.nfields))
        for row in range(result.ntuples)
    ]


async def _result(pg: pq.abc.PGconn) -> pq.abc.PGresult:
    """Flush what was sent, wait for the whole answer on the loop, return its last result."""
    while pg.flush():  # 1: more to send, the socket is full
        await trio.lowlevel.wait_writable(pg.socket)
    while True:
        pg.consume_input()
        if not pg.is_busy():
            break
        await trio.lowlevel.wait_readable(pg.socket)
    return _last_result(pg)


def _last_result(pg: pq.abc.PGconn) -> pq.abc.PGresult:
    """The last result of a whole answer (``is_busy()`` is false); raises DatabaseError on failure."""
    last = None
    while (result := pg.get_result()) is not None:
        last = result
    if last is None:
        raise DatabaseError("no result")
    if last.status not in (pq.ExecStatus.COMMAND_OK, pq.ExecStatus.TUPLES_OK):
        message = (last.error_message or b"statement failed").decode(errors="replace").strip()
        raise DatabaseError(message)
    return last
