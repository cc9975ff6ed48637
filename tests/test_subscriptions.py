"""
Subscriptions follow the database: positions written by another service (a
plain SQL connection) are subscribed through NOTIFY, closed ones are
unsubscribed after the grace period, and a killed LISTEN connection loses
nothing once it is back.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest
import trio

from polystream.app import App, run
from polystream.config import Config, FeedConfig, HealthConfig, PipelineConfig
from polystream.replay import ReplayServer, serve_replay
from polystream.store.markets import import_markets_file

ROOT = Path(__file__).parent.parent
UPDOWN = ROOT / "examples" / "updown-2025-12-11"
SOL_UP = "26975287284659697395137026699226669940909216664286471914722914103715066514506"
SOL_DOWN = "43480974677375827891722101312344369582184206145113152473282188970519344902742"


async def wait_until(predicate: Callable[[], Any], poll: float = 0.02) -> None:
    """Poll a condition on real I/O (callers bound it with ``trio.fail_after``)."""
    while not predicate():
        await trio.sleep(poll)


def _sql(dsn: str, query: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.execute(query, params)
        return cur.fetchall() if cur.description else []


@pytest.fixture
async def daemon(db_dsn: str, nursery: trio.Nursery) -> AsyncIterator[tuple[App, ReplayServer]]:
    with psycopg.connect(db_dsn) as conn:
        import_markets_file(conn, Path(f"{UPDOWN}.markets.json"))
    server: ReplayServer = await nursery.start(
        lambda task_status: serve_replay(
            [Path(f"{UPDOWN}.jsonl.gz")], max_speed=True, task_status=task_status
        )
    )
    config = Config(
        feed=FeedConfig(
            url=f"ws://127.0.0.1:{server.port}/ws/market",
            reconcile_interval=300.0,  # far away: only NOTIFY can explain a change
            unsubscribe_grace=0.5,
        ),
        pipeline=PipelineConfig(market_flush_interval=0.05, debounce=0.1),
        health=HealthConfig(listen="127.0.0.1:0"),
    )
    app: App = await nursery.start(run, config, db_dsn)
    yield app, server
    app.stop()


async def test_position_from_another_service_is_subscribed_and_priced(
    db_dsn: str, daemon: tuple[App, ReplayServer]
) -> None:
    app, server = daemon
    assert app.pool.asset_shard == {}  # zero positions: running, nothing subscribed
    with trio.fail_after(60):
        _sql(
            db_dsn,
            "INSERT INTO positions (user_id, market_id, outcome, size, entry_price)"
            " VALUES ('bot', '900003', 'Up', 10, 0.5)",
        )
        await wait_until(lambda: {SOL_UP, SOL_DOWN} <= set(app.pool.asset_shard))
        await server.finished.wait()

        def priced() -> bool:
            rows = _sql(
                db_dsn,
                "SELECT m.source, p.token_id, p.current_price FROM markets m"
                " JOIN positions p ON p.market_id = m.id",
            )
            return rows == [("ws", SOL_UP, Decimal("0.99"))]

        await wait_until(priced)


async def test_closed_position_unsubscribes_after_grace(
    db_dsn: str, daemon: tuple[App, ReplayServer]
) -> None:
    app, _ = daemon
    with trio.fail_after(60):
        (pid,) = _sql(
            db_dsn,
            "INSERT INTO positions (user_id, market_id, token_id, size,"
            " entry_price) VALUES ('bot', '900003', %s, 10, 0.5) RETURNING id",
            SOL_UP,
        )[0]
        await wait_until(lambda: SOL_UP in app.pool.asset_shard)
        _sql(db_dsn, "UPDATE positions SET status = 'closed' WHERE id = %s", pid)
        await wait_until(lambda: app.stats.desired_assets == 0)
        closed_at = trio.current_time()
        assert SOL_UP in app.pool.asset_shard  # still inside the grace period
        # Reopen within the grace period: no flap, nothing unsubscribed.
        _sql(db_dsn, "UPDATE positions SET status = 'active' WHERE id = %s", pid)
        await wait_until(lambda: app.stats.desired_assets == 2)
        assert not app.reconciler._leaving
        _sql(db_dsn, "UPDATE positions SET status = 'closed' WHERE id = %s", pid)
        await wait_until(lambda: not app.pool.asset_shard)
        assert trio.current_time() - closed_at >= 0.5
        assert app.pool.shards == {}  # the emptied shard was closed


async def test_killed_listen_connection_loses_nothing(
    db_dsn: str, daemon: tuple[App, ReplayServer]
) -> None:
    app, _ = daemon
    listening = (
        "SELECT pid FROM pg_stat_activity"
        " WHERE application_name = 'polystream-listen' AND datname = current_database()"
    )
    with trio.fail_after(60):
        [(old_pid,)] = _sql(db_dsn, listening)
        assert _sql(db_dsn, "SELECT pg_terminate_backend(%s)", old_pid) == [(True,)]
        await wait_until(lambda: (old_pid,) not in _sql(db_dsn, listening))
        # Written while nobody listens: the reconcile after re-LISTEN must find it,
        # long before the 300 s periodic check.
        _sql(
            db_dsn,
            "INSERT INTO positions (user_id, market_id, token_id, size, entry_price)"
            " VALUES ('bot', '900003', %s, 10, 0.5)",
            SOL_DOWN,
        )
        await wait_until(lambda: SOL_DOWN in app.pool.asset_shard)
        await wait_until(lambda: len(_sql(db_dsn, listening)) == 1)
        [(new_pid,)] = _sql(db_dsn, listening)
        assert new_pid != old_pid
