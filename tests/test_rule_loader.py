"""
The rule loader on a real PostgreSQL, fed the real ``polystream_positions``
notifications: a position that leaves ``active`` (a burst of triggers moves
hundreds to ``closing``) loses its rules without a query; a changed threshold
is read back.
"""

from __future__ import annotations

from typing import Any

import attrs
import psycopg
import trio

from polystream.monitor.engine import Monitor
from polystream.monitor.loader import RuleLoader
from polystream.stats import Stats
from polystream.store.link import DbLink


@attrs.define(eq=False)
class CountingLink(DbLink):
    """A real link that counts its calls (each is one query round in a worker thread)."""

    calls: int = 0

    async def call(self, fn: Any, *args: Any) -> Any:
        self.calls += 1
        return await super().call(fn, *args)


def _positions(dsn: str, count: int) -> list[int]:
    with psycopg.connect(dsn) as conn:
        return [
            int(row[0])
            for row in conn.execute(
                "INSERT INTO positions (user_id, market_id, token_id, size, entry_price,"
                " take_profit_price, stop_loss_price)"
                " SELECT 'u', 'm', 't', 1, 0.5, 0.8, 0.2 FROM generate_series(1, %s)"
                " RETURNING id",
                [count],
            ).fetchall()
        ]


def _notes_of(dsn: str, statements: list[str]) -> list[tuple[str, str]]:
    """Run ``statements`` and return the notifications they sent (channel, payload)."""
    with psycopg.connect(dsn, autocommit=True) as listener:
        listener.execute("LISTEN polystream_positions")
        with psycopg.connect(dsn, autocommit=True) as writer:
            for sql in statements:
                writer.execute(sql)
        return [(n.channel, n.payload) for n in listener.notifies(timeout=1.0)]


def _take_profit(monitor: Monitor, position_id: int) -> str | None:
    rule = monitor.rule(position_id, "take_profit")
    return None if rule is None else str(rule.threshold)


async def _until(predicate: Any) -> None:
    with trio.fail_after(10):
        while not predicate():
            await trio.sleep(0.01)


async def test_positions_that_left_active_lose_their_rules_without_a_query(
    db_dsn: str,
) -> None:
    first, second, third = _positions(db_dsn, 3)
    stats = Stats()
    monitor = Monitor(decide=lambda _: None, stats=stats)
    link = CountingLink(dsn=db_dsn, name="rules-test", stats=stats)
    loader = RuleLoader(link=link, monitor=monitor, interval=3600)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(loader.run)
            assert monitor.rule_count == 6 and link.calls == 1  # the full load
            closing = _notes_of(
                db_dsn,
                [f"UPDATE positions SET status = 'closing' WHERE id IN ({first}, {second})"],
            )
            assert len(closing) == 2
            loader.notify(closing)
            await _until(lambda: monitor.rule_count == 2)
            assert link.calls == 1  # no query: the payload said 'closing'
            moved = _notes_of(
                db_dsn, [f"UPDATE positions SET take_profit_price = 0.9 WHERE id = {third}"]
            )
            loader.notify(moved)
            await _until(lambda: _take_profit(monitor, third) == "0.9")
            assert link.calls == 2  # that one was read back
            nursery.cancel_scope.cancel()
    finally:
        link.close()
