"""
One blocking psycopg connection per owner, used from trio through worker
threads (psycopg 3's async connection does not run under trio): a whole batch
per thread hop, ``statement_timeout`` bounding every statement (a call in a
worker thread cannot be cancelled), reconnect on the next call after a
failure, and the DSN's password never in a message.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

import attrs
import psycopg
import structlog
import trio

from polystream.errors import DatabaseError
from polystream.stats import Stats
from polystream.store import db

__all__ = ["DbLink"]

logger = structlog.get_logger(__name__)
T = TypeVar("T")


@attrs.define(eq=False)
class DbLink:
    """
    One blocking psycopg connection, used from trio through worker threads.

    ``call(fn, *args)`` runs ``fn(conn, *args)`` in a transaction in a
    thread, connecting first if needed. Any failure closes the connection
    (the next call reconnects) and raises :class:`DatabaseError`; the DSN's
    password never reaches the message. ``synchronous_commit`` False: its
    commits do not wait for the WAL flush (see :func:`db.connect`).
    """

    dsn: str
    name: str
    stats: Stats | None = None
    statement_timeout: float = 30.0
    synchronous_commit: bool = True
    _conn: psycopg.Connection[Any] | None = None
    _lock: trio.Lock = attrs.field(factory=trio.Lock)

    def _call_sync(self, fn: Callable[..., T], args: tuple[Any, ...], transaction: bool) -> T:
        if self._conn is None or self._conn.closed:
            self._conn = db.connect(
                self.dsn,
                application_name=f"polystream-{self.name}",
                statement_timeout_s=self.statement_timeout,
                synchronous_commit=self.synchronous_commit,
            )
        try:
            if not transaction:
                return fn(self._conn, *args)
            with self._conn.transaction():
                return fn(self._conn, *args)
        except psycopg.Error as exc:
            self._conn.close()
            self._conn = None
            raise DatabaseError(f"{self.name}: {type(exc).__name__}: {exc}") from None

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(conn, *args)`` in a transaction in a worker thread; raises DatabaseError."""
        return await self._call(fn, args, transaction=True)

    async def call_in_transactions(self, fn: Callable[..., T], *args: Any) -> T:
        """
        Run ``fn(conn, *args)`` in a worker thread, ``fn`` opening its own
        transactions (``with conn.transaction():``, several in one call: one
        thread hop for all of them); raises DatabaseError. What ``fn``
        committed before a failure stays committed.
        """
        return await self._call(fn, args, transaction=False)

    async def _call(self, fn: Callable[..., T], args: tuple[Any, ...], transaction: bool) -> T:
        async with self._lock:
            started = time.monotonic()
            try:
                result = await trio.to_thread.run_sync(self._call_sync, fn, args, transaction)
            except DatabaseError as exc:
                if self.stats is not None:
                    self.stats.db_errors += 1
                    self.stats.db_connected = False
                    self.stats.last_db_error = str(exc)[:300]
                logger.warning("db_call_failed", link=self.name, error=str(exc)[:300])
                raise
        if self.stats is not None:
            self.stats.db_connected = True
            self.stats.last_write_at = now = time.monotonic()
            self.stats.db_seconds.labels(self.name).observe(now - started)
            batch = args[0] if args and isinstance(args[0], list | tuple) else None
            if batch is not None:
                self.stats.db_batch_rows.labels(self.name).observe(len(batch))
        return result

    def close(self) -> None:
        """Close the connection (safe to call twice)."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None
