"""
PostgreSQL restarted under the running daemon (a throwaway server of this
test's own): writers keep the latest state and retry, LISTEN comes back with
a full reconcile, and afterwards the database equals an undisturbed run's
final state; every TP/SL rule fired once, none lost or doubled.
"""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import trio
from expected import (
    UPDOWN,
    expected_assets,
    insert_position,
    insert_rules,
    mismatches,
)
from throwaway_pg import ThrowawayPostgres

from polystream.app import App, run
from polystream.config import Config, DatabaseConfig, FeedConfig, HealthConfig, PipelineConfig
from polystream.errors import DatabaseError
from polystream.replay import ReplayServer, serve_replay
from polystream.store import db
from polystream.store.markets import import_markets_file

RULES = [("900003", "Up", "take_profit", "0.60"), ("900005", "Down", "stop_loss", "0.40")]


def _listening(dsn: str) -> bool:
    try:
        with db.connect(dsn) as conn:
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'polystream-listen'"
            ).fetchone()
    except DatabaseError:  # the server may still be starting
        return False
    return row == (1,)


def seed(dsn: str) -> dict[int, Decimal]:
    """
    Migrate ``dsn``, import the capture's markets, three plain positions and
    one per :data:`RULES`; returns ``{rule position id: best bid at its first
    crossing}`` (every rule crosses).
    """
    with db.connect(dsn) as conn:
        db.migrate(conn)
        import_markets_file(conn, Path(f"{UPDOWN}.markets.json"))
        for market, outcome in [("900003", "Down"), ("900001", "Up"), ("900006", "Up")]:
            insert_position(conn, market, outcome, "25", "0.5")
        rules = insert_rules(conn, RULES)
        conn.commit()
    assert all(crossing is not None for _, crossing in rules.values())
    return {pid: crossing for pid, (_, crossing) in rules.items() if crossing is not None}


def restart_config(dsn: str, replay: ReplayServer, **feed: Any) -> Config:
    """A daemon that retries within a second, on ``replay``; ``feed``: more FeedConfig."""
    return Config(
        database=DatabaseConfig(dsn=dsn, retry_max=1.0, statement_timeout=5.0),
        feed=FeedConfig(url=f"ws://127.0.0.1:{replay.port}/ws/market", **feed),
        pipeline=PipelineConfig(market_flush_interval=0.1, debounce=0.2),
        health=HealthConfig(listen="127.0.0.1:0"),
    )


@pytest.mark.slow
async def test_database_restart_loses_nothing(throwaway_server: ThrowawayPostgres) -> None:
    server = throwaway_server
    dsn = server.dsn
    expected_triggers = seed(dsn)

    with trio.fail_after(150):
        async with trio.open_nursery() as nursery:
            replay: ReplayServer = await nursery.start(
                lambda task_status: serve_replay(
                    [Path(f"{UPDOWN}.jsonl.gz")], speed=60.0, task_status=task_status
                )
            )
            app: App = await nursery.start(run, restart_config(dsn, replay), dsn)
            # The tape runs 15 s at 60x: stop the database mid-run, once prices flow.
            await app.positions.batches.after(0)
            await trio.to_thread.run_sync(server.stop)
            while app.stats.db_errors < 3:  # the writers notice, and retry in vain a while
                await trio.sleep(0.1)
            await trio.to_thread.run_sync(server.start)
            while not await trio.to_thread.run_sync(_listening, dsn):  # LISTEN is back
                await trio.sleep(0.1)
            await replay.finished.wait()
            expected = expected_assets(UPDOWN)
            while problems := await trio.to_thread.run_sync(mismatches, dsn, expected):
                await trio.sleep(0.2)
            assert not problems
            while app.executor.pending:
                await trio.sleep(0.1)
            app.stop()
            nursery.cancel_scope.cancel()

    with db.connect(dsn) as conn:
        fired = conn.execute("SELECT position_id, price FROM triggers ORDER BY id").fetchall()
    assert dict(fired) == expected_triggers
    assert len(fired) == len(expected_triggers)
    assert app.stats.db_errors > 0  # the outage really happened
