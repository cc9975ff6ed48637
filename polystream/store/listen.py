"""
``LISTEN`` on the schema's notification channels without a thread: wait with
``trio.lowlevel.wait_readable`` on the connection's socket, then drain
``notifies(timeout=0)``. After every (re)connection the callback receives
``None``: a notification lost while disconnected costs at most one full read.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import psycopg
import structlog
import trio

from polystream.errors import DatabaseError
from polystream.store import db
from polystream.timing import Backoff

__all__ = ["POSITIONS_CHANNEL", "PREDICTIONS_CHANNEL", "Notes", "run_listener"]

logger = structlog.get_logger(__name__)

POSITIONS_CHANNEL = "polystream_positions"
PREDICTIONS_CHANNEL = "polystream_predictions"


Notes = list[tuple[str, str]] | None
"""``(channel, payload)`` of each notification; None = reconnected, anything may have changed."""


async def _drain_forever(conn: psycopg.Connection[Any], on_notify: Callable[[Notes], None]) -> None:
    """Wait for the socket to be readable, drain notifications, repeat."""
    while True:
        await trio.lowlevel.wait_readable(conn.fileno())
        notes = [(n.channel, n.payload) for n in conn.notifies(timeout=0)]
        if notes:
            on_notify(notes)


async def run_listener(
    dsn: str,
    on_notify: Callable[[Notes], None],
    *,
    retry_max: float = 30.0,
    channels: tuple[str, ...] = (POSITIONS_CHANNEL, PREDICTIONS_CHANNEL),
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """
    ``LISTEN`` on ``channels`` and call ``on_notify(notes)`` for each batch
    of notifications, and ``on_notify(None)`` after every (re)connection so
    that a notification lost while disconnected costs nothing. No thread: waits with
    ``trio.lowlevel.wait_readable`` on the connection's socket.
    """
    backoff = Backoff(0.5, retry_max)
    started = False
    while True:
        conn = None
        try:
            conn = await trio.to_thread.run_sync(
                lambda: db.connect(
                    dsn,
                    application_name="polystream-listen",
                    statement_timeout_s=None,
                    autocommit=True,
                )
            )
            for channel in channels:
                conn.execute(f"LISTEN {channel}")
            logger.info("db_listening", channels=list(channels))
            backoff.reset()
            on_notify(None)
            if not started:
                started = True
                task_status.started()
            await _drain_forever(conn, on_notify)
        except (DatabaseError, psycopg.Error, OSError) as exc:
            logger.warning("db_listen_lost", error=str(exc)[:300])
        finally:
            if conn is not None:
                conn.close()
        if not started:
            started = True
            task_status.started()
        await trio.sleep(backoff.next_delay())
