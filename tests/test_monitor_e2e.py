"""
TP/SL end to end on the recorded price path of ``updown-2025-12-11``: real
PostgreSQL, the replay server, two daemons at once on the same database, and
a third run after them. Each rule fires exactly once, at the first event that
crosses it (computed here from the recording, independently of the daemon).
Predictions due while their asset has no ask are deferred, visibly, then
decided with an ask or skipped ``no_price`` when their window closes.
"""

from __future__ import annotations

import datetime
import gzip
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import trio
from expected import (
    UPDOWN,
    apply_frame,
    insert_rules,
    replay_config,
    serve_updown,
)

from polystream.app import App, run
from polystream.book import Books
from polystream.config import Config, FeedConfig, HealthConfig
from polystream.replay import ReplayServer, serve_replay
from polystream.store.markets import import_markets_file

D = Decimal

# (market id, outcome, kind, level)
RULES = [
    ("900003", "Up", "take_profit", "0.60"),
    ("900003", "Up", "stop_loss", "0.40"),
    ("900005", "Up", "take_profit", "0.60"),
    ("900005", "Down", "stop_loss", "0.40"),
    ("900003", "Down", "take_profit", "0.99"),  # never reached: must not fire
]


def _rows(dsn: str, query: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(query).fetchall()


async def _run_daemons(dsn: str, count: int) -> list[tuple[int, int, int]]:
    """
    Run ``count`` daemons at once on one database over one max-speed replay,
    to the end of the tape.

    Returns per daemon: (rules fired in memory, triggers written, duplicates refused).
    """
    async with trio.open_nursery() as nursery:
        server: ReplayServer = await serve_updown(nursery)
        config = replay_config(server.port)
        apps: list[App] = [await nursery.start(run, config, dsn) for _ in range(count)]
        await server.finished.wait()
        for app in apps:
            while app.executor.pending:  # let the last decisions reach the database
                await trio.sleep(0.05)
        for app in apps:
            app.stop()
        nursery.cancel_scope.cancel()
    return [
        (sum(a.stats.triggers.values()), a.stats.triggers_written, a.stats.triggers_duplicate)
        for a in apps
    ]


async def test_tpsl_fires_once_at_first_crossing(db_dsn: str) -> None:
    with psycopg.connect(db_dsn) as conn:
        import_markets_file(conn, Path(f"{UPDOWN}.markets.json"))
        expected = {
            pid: (kind, crossing)
            for pid, (kind, crossing) in insert_rules(conn, RULES, user="tpsl").items()
            if crossing is not None
        }
    assert len(expected) == 4  # the levels do lie inside the recorded path

    with trio.fail_after(120):
        outcomes = await _run_daemons(db_dsn, count=2)  # two daemons on one database
    # Whatever each daemon decided (the second may join the tape late, or learn
    # through NOTIFY that a position is already closing), the database took
    # each decision once.
    assert sum(written for _, written, _ in outcomes) == 4
    assert sum(fired for fired, _, _ in outcomes) == 4 + sum(dup for _, _, dup in outcomes)
    fired = _rows(db_dsn, "SELECT position_id, kind, price, dedupe_key FROM triggers")
    assert {pid: (kind, price) for pid, kind, price, _ in fired} == expected
    assert len(fired) == 4  # once each, although two daemons saw every crossing
    statuses = dict(_rows(db_dsn, "SELECT id, status FROM positions"))
    assert {pid for pid, status in statuses.items() if status == "closing"} == set(expected)

    with trio.fail_after(120):
        again = await _run_daemons(db_dsn, count=1)  # a restart replays every crossing again
    assert again == [(0, 0, 0)]  # closing positions are not watched any more
    assert sorted(_rows(db_dsn, "SELECT position_id, kind, price, dedupe_key FROM triggers")) == (
        sorted(fired)
    )


def test_concurrent_writers_decide_once(db_dsn: str) -> None:
    """The compare-and-set itself: two connections write one decision at the same time."""
    import threading

    from polystream.monitor.executor import write_decisions
    from polystream.monitor.rules import Decision

    with psycopg.connect(db_dsn) as conn:
        (pid,) = conn.execute(
            "INSERT INTO positions (user_id, market_id, token_id, size, entry_price,"
            " take_profit_price) VALUES ('u', 'm', 't', 1, 0.5, 0.6) RETURNING id"
        ).fetchone() or (None,)
    decision = Decision(
        "take_profit",
        f"position:{pid}:take_profit:0.6",
        D("0.61"),
        "best_bid_above",
        position_id=pid,
    )
    barrier = threading.Barrier(8)
    results: list[int | None] = []

    def write() -> None:
        with psycopg.connect(db_dsn) as conn:
            barrier.wait()
            results.extend(write_decisions(conn, [decision]))

    threads = [threading.Thread(target=write) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len([r for r in results if r is not None]) == 1
    assert _rows(db_dsn, "SELECT count(*) FROM triggers") == [(1,)]
    assert _rows(db_dsn, "SELECT status FROM positions") == [("closing",)]


def _asks(token: str) -> set[Decimal]:
    """Every best ask ``token`` has after a frame of the recording."""
    books, asks = Books(), set()
    with gzip.open(f"{UPDOWN}.jsonl.gz", "rb") as handle:
        for line in handle:
            ask = books[token].best_ask if token in apply_frame(books, line) else None
            if ask is not None:
                asks.add(ask)
    return asks


def _insert_prediction(
    conn: psycopg.Connection[Any], market: str, outcome: str, closes_in_s: float
) -> tuple[int, str]:
    """A from_start prediction on ``outcome`` of ``market``, due now; returns (id, token)."""
    now = datetime.datetime.now(datetime.UTC)
    row = conn.execute(
        """
        INSERT INTO predictions (user_id, market_id, token_id, outcome, stake_usdc, limit_price,
                                 opens_at, closes_at, timing_mode, delay_s)
        SELECT 'e2e', m.id, m.clob_token_ids ->> (o.ord::int - 1), o.name, 5, 0.99, %s, %s,
               'from_start', 0
        FROM markets m, jsonb_array_elements_text(m.outcomes) WITH ORDINALITY o(name, ord)
        WHERE m.id = %s AND o.name = %s
        RETURNING id, token_id
        """,
        (
            now - datetime.timedelta(seconds=1),
            now + datetime.timedelta(seconds=closes_in_s),
            market,
            outcome,
        ),
    ).fetchone()
    assert row is not None
    return int(row[0]), str(row[1])


async def test_due_predictions_without_an_ask_are_deferred(db_dsn: str) -> None:
    with psycopg.connect(db_dsn) as conn:
        import_markets_file(conn, Path(f"{UPDOWN}.markets.json"))
        never, _ = _insert_prediction(conn, "900001", "Up", 600)  # the tape never quotes it
        closing, _ = _insert_prediction(conn, "900001", "Down", 4)  # nor this; closes in 4 s
        quoted, token = _insert_prediction(conn, "900005", "Up", 600)  # quoted from frame 0
    closes_at = time.time() + 4
    async with trio.open_nursery() as nursery:
        server: ReplayServer = await nursery.start(
            lambda task_status: serve_replay(
                [Path(f"{UPDOWN}.jsonl.gz")], max_speed=True, task_status=task_status
            )
        )
        config = Config(
            feed=FeedConfig(url=f"ws://127.0.0.1:{server.port}/ws/market"),
            health=HealthConfig(listen="127.0.0.1:0"),
        )
        with trio.fail_after(60):
            app: App = await nursery.start(run, config, db_dsn)
            await server.finished.wait()
            await trio.sleep(max(0.0, closes_at - time.time()) + 0.5)
            while app.executor.pending or app.stats.triggers["prediction_skipped"] < 1:
                await trio.sleep(0.05)
        monitor = app.stats.health()["monitor"]
        app.stop()
        nursery.cancel_scope.cancel()
    rows = {
        pid: (status, reason, price)
        for pid, status, reason, price in _rows(
            db_dsn, "SELECT id, status, decision_reason, decision_price FROM predictions"
        )
    }
    assert rows[never] == ("pending", None, None)
    assert rows[closing] == ("skipped", "no_price", None)
    status, reason, price = rows[quoted]
    assert (status, reason) == ("decided", "from_start")
    assert price in _asks(token)
    assert monitor["predictions_deferred"] == 1  # ``never``, still waiting for an ask
    assert monitor["prediction_deferrals"]["no_price"] >= 2
