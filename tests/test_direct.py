"""
The trigger path's connection on the event loop (:class:`DirectLink`): opened
ahead of the first trigger, and a failure to open it is counted, not raised.
Real PostgreSQL.
"""

from __future__ import annotations

import psycopg

from polystream.stats import Stats
from polystream.store.direct import DirectLink


def _backends(dsn: str, name: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", [name]
        ).fetchone()
        assert row is not None
        return int(row[0])


async def test_warm_up_opens_the_connection_before_the_first_statement(db_dsn: str) -> None:
    link = DirectLink(dsn=db_dsn, name="warm-test", stats=Stats())
    try:
        assert _backends(db_dsn, "polystream-warm-test") == 0
        await link.warm_up()
        assert _backends(db_dsn, "polystream-warm-test") == 1
        await link.warm_up()  # already open: nothing more
        assert await link.execute("SELECT $1::int + 1", [41]) == [("42",)]
        assert _backends(db_dsn, "polystream-warm-test") == 1
    finally:
        link.close()


async def test_warm_up_against_a_database_that_is_down_is_counted_not_raised() -> None:
    stats = Stats()
    link = DirectLink(
        dsn="postgresql://nobody:hunter2@127.0.0.1:9/none?connect_timeout=2",
        name="warm-down",
        stats=stats,
    )
    await link.warm_up()
    assert stats.db_errors == 1 and not stats.db_connected
    assert stats.last_db_error is not None and "hunter2" not in stats.last_db_error
