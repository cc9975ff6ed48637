"""
Position prices written in short transactions (``write_positions_in_chunks``):
every active position of a moved token is priced, at most ``limit`` rows per
transaction, so a TP/SL decision never waits long for their row locks. Real
PostgreSQL through a real ``DbLink``.
"""

from __future__ import annotations

import contextlib
import time
from decimal import Decimal
from typing import Any

import orjson
import psycopg

from polystream.pipeline.writers import (
    MARKETS_CHANNEL,
    NOTIFY_PAYLOAD_BYTES,
    POSITIONS_PRICED_CHANNEL,
    MarketRow,
    Written,
    write_markets,
    write_positions,
    write_positions_in_chunks,
)
from polystream.stats import Stats
from polystream.store.link import DbLink


def _insert(dsn: str, token: str, count: int, status: str = "active") -> None:
    with psycopg.connect(dsn) as conn:
        for _ in range(count):
            conn.execute(
                "INSERT INTO positions (user_id, market_id, token_id, size, entry_price, status)"
                " VALUES ('u', 'm', %s, 10, 0.5, %s)",
                [token, status],
            )


def _priced(dsn: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(
            "SELECT token_id, status, current_price, pnl_amount, count(*) FROM positions"
            " GROUP BY 1, 2, 3, 4 ORDER BY 1, 2"
        ).fetchall()


def _rows_per_transaction(dsn: str) -> list[int]:
    """Rows of each transaction that last wrote a priced position (``xmin``), in id order."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT xmin::text::bigint, count(*) FROM positions"
            " WHERE current_price IS NOT NULL GROUP BY 1 ORDER BY min(id)"
        ).fetchall()
    return [count for _, count in rows]


async def test_every_position_is_priced_a_few_rows_per_transaction(db_dsn: str) -> None:
    _insert(db_dsn, "t1", 10)
    _insert(db_dsn, "t2", 3)
    _insert(db_dsn, "t1", 2, status="closed")
    link = DbLink(dsn=db_dsn, name="positions-test", stats=Stats())
    prices = [("t1", Decimal("0.6")), ("t2", Decimal("0.4"))]

    async def write() -> int:
        written = await link.call_in_transactions(write_positions_in_chunks, prices, 4)
        return written.rows

    try:
        assert await write() == 13  # one call (one thread hop), four transactions
        assert _rows_per_transaction(db_dsn) == [4, 4, 4, 1]  # by id, never more than 4
        assert _priced(db_dsn) == [
            ("t1", "active", Decimal("0.6"), Decimal("1.0"), 10),
            ("t1", "closed", None, None, 2),
            ("t2", "active", Decimal("0.4"), Decimal("-1.0"), 3),
        ]
        assert await write() == 0  # nothing moved
        assert _rows_per_transaction(db_dsn) == [4, 4, 4, 1]
        _insert(db_dsn, "t2", 4)  # exactly one transaction's worth: one transaction
        assert await write() == 4
        assert _rows_per_transaction(db_dsn) == [4, 4, 4, 1, 4]
    finally:
        link.close()


def test_the_first_transaction_returns_where_each_later_span_starts(db_dsn: str) -> None:
    _insert(db_dsn, "t1", 5)
    _insert(db_dsn, "t2", 1, status="closed")
    with psycopg.connect(db_dsn) as conn:
        ids = [row[0] for row in conn.execute("SELECT id FROM positions ORDER BY id")]
        prices = [("t1", Decimal("0.7")), ("t2", Decimal("0.7"))]
        assert write_positions(conn, prices, None, 2) == (2, [ids[2], ids[4]], ["u"])
        conn.execute("UPDATE positions SET status = 'closed' WHERE id = %s", [ids[3]])
        assert write_positions(conn, prices, (ids[2], ids[4])) == (1, [], ["u"])  # the active one
        assert write_positions(conn, prices, (ids[4], ids[4] + 1)) == (1, [], ["u"])
        assert write_positions(conn, prices, None, 2) == (0, [], [])  # all priced


def _listener(dsn: str, channel: str) -> psycopg.Connection[Any]:
    conn = psycopg.connect(dsn, autocommit=True)
    conn.execute(f"LISTEN {channel}")
    return conn


def _received(conn: psycopg.Connection[Any]) -> list[dict[str, list[str]]]:
    payloads = [orjson.loads(n.payload) for n in conn.notifies(timeout=0.5, stop_after=1000)]
    for payload in payloads:  # stamped when queued, just before the commit
        assert 0 <= time.time() * 1000 - payload.pop("sent_ms") < 60_000
    return payloads


async def test_a_flush_tells_each_priced_user_once_after_it_committed(db_dsn: str) -> None:
    for user, count in (("alice", 7), ("bob", 3)):
        with psycopg.connect(db_dsn) as conn:
            for _ in range(count):
                conn.execute(
                    "INSERT INTO positions (user_id, market_id, token_id, size, entry_price)"
                    " VALUES (%s, 'm', 't1', 10, 0.5)",
                    [user],
                )
    listener = _listener(db_dsn, POSITIONS_PRICED_CHANNEL)
    link = DbLink(dsn=db_dsn, name="positions-test", stats=Stats())
    try:
        written = await link.call_in_transactions(
            write_positions_in_chunks, [("t1", Decimal("0.6"))], 4
        )
        assert written == Written(10, ("alice", "bob"))  # three transactions, one notification
        assert _received(listener) == [{"users": ["alice", "bob"]}]
        again = await link.call_in_transactions(
            write_positions_in_chunks, [("t1", Decimal("0.6"))], 4
        )
        assert again == Written(0)
        assert _received(listener) == []  # nothing repriced: nothing said
    finally:
        link.close()
        listener.close()


def test_market_ids_are_told_once_per_flush_in_payloads_under_the_limit(db_dsn: str) -> None:
    ids = [f"{900_000_000 + i}" for i in range(2_000)]  # ~26 KB of ids: several payloads
    with psycopg.connect(db_dsn) as conn, conn.cursor() as cur:
        cur.executemany("INSERT INTO markets (id) VALUES (%s)", [[i] for i in ids])
    listener = _listener(db_dsn, MARKETS_CHANNEL)
    try:
        rows = [
            MarketRow(i, None, True, Decimal("0.4"), Decimal("0.6"), None, None, None) for i in ids
        ]
        with psycopg.connect(db_dsn) as conn:
            with conn.transaction():
                assert write_markets(conn, rows) == Written(len(ids), tuple(ids))
            rolled_back = psycopg.connect(db_dsn)
            with rolled_back, contextlib.suppress(ValueError), rolled_back.transaction():
                write_markets(rolled_back, rows[:5])
                raise ValueError  # rolled back: told nothing
        payloads = [n.payload for n in listener.notifies(timeout=0.5, stop_after=1000)]
        assert len(payloads) > 1 and all(len(p.encode()) <= NOTIFY_PAYLOAD_BYTES for p in payloads)
        told = [i for p in payloads for i in orjson.loads(p)["ids"]]
        assert sorted(told) == sorted(ids)  # each once
    finally:
        listener.close()


async def test_pipeline_notify_off_writes_the_same_rows_and_tells_nothing(db_dsn: str) -> None:
    with psycopg.connect(db_dsn) as conn:
        conn.execute("INSERT INTO markets (id) VALUES ('m1')")
        conn.execute(
            "INSERT INTO positions (user_id, market_id, token_id, size, entry_price)"
            " VALUES ('alice', 'm1', 't1', 10, 0.5)"
        )
    listeners = [_listener(db_dsn, c) for c in (MARKETS_CHANNEL, POSITIONS_PRICED_CHANNEL)]
    link = DbLink(dsn=db_dsn, name="positions-test", stats=Stats())
    row = MarketRow("m1", None, True, Decimal("0.4"), Decimal("0.6"), None, None, None)
    try:
        assert await link.call(write_markets, [row], None, False) == Written(1, ("m1",))
        priced = await link.call_in_transactions(
            write_positions_in_chunks, [("t1", Decimal("0.6"))], 4, None, False
        )
        assert priced == Written(1, ("alice",))  # the cache invalidation still learns of it
        assert [_received(listener) for listener in listeners] == [[], []]
    finally:
        link.close()
        for listener in listeners:
            listener.close()
