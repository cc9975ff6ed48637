"""
The main job, end to end: real PostgreSQL, real loopback WebSocket (the
replay server on recorded frames), the daemon's real ``run``.

The final ``markets`` and ``positions`` rows must equal, exactly (Decimal),
what ``*.expected.json`` says a correct consumer holds after the last frame,
including a position inserted by another connection after start-up and the
two-outcome market of ``aaimek-2025-01``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg
import trio
from expected import AAIMEK, UPDOWN, expected_assets, insert_position, mismatches

from polystream.app import App, run
from polystream.config import Config, FeedConfig, HealthConfig, PipelineConfig
from polystream.replay import ReplayServer, serve_replay
from polystream.store.markets import import_markets_file

# (market id, outcome, size, entry price)
POSITIONS = [
    ("900003", "Up", "100", "0.40"),  # sol 15m: book + trades
    ("900005", "Down", "200", "0.50"),  # btc 1h: book + trades
    ("900001", "Up", "80", "0.45"),  # btc 15m: trades only
    ("900101", "No", "300", "0.80"),  # aaimek: price changes only
]
LATE = ("900006", "Up", "120", "0.48")  # eth 1h, inserted after start-up


def _state(dsn: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT id, source FROM markets ORDER BY id").fetchall()


async def test_replay_into_postgres_matches_expected(db_dsn: str) -> None:
    expected = expected_assets(UPDOWN, AAIMEK)
    with psycopg.connect(db_dsn) as conn:
        for capture in (UPDOWN, AAIMEK):
            import_markets_file(conn, Path(f"{capture}.markets.json"))
        for position in POSITIONS:
            insert_position(conn, *position)
    with trio.fail_after(90):
        async with trio.open_nursery() as nursery:
            server: ReplayServer = await nursery.start(
                lambda task_status: serve_replay(
                    [Path(f"{UPDOWN}.jsonl.gz"), Path(f"{AAIMEK}.jsonl.gz")],
                    max_speed=True,
                    task_status=task_status,
                )
            )
            config = Config(
                feed=FeedConfig(
                    url=f"ws://127.0.0.1:{server.port}/ws/market", reconcile_interval=30.0
                ),
                pipeline=PipelineConfig(market_flush_interval=0.05, debounce=0.2),
                health=HealthConfig(listen="127.0.0.1:0"),
            )
            app: App = await nursery.start(run, config, db_dsn)
            assert app.stats.desired_assets == 8  # 4 markets x 2 outcomes
            # Another service opens a position while the daemon runs: NOTIFY subscribes it.
            with psycopg.connect(db_dsn) as other:
                insert_position(other, *LATE)
            await server.finished.wait()
            while problems := await trio.to_thread.run_sync(mismatches, db_dsn, expected):
                await trio.sleep(0.1)
            assert not problems
            assert app.stats.desired_assets == 10
            assert app.stats.parse_errors == {}
            assert app.stats.rows_written["positions"] >= 5
            app.stop()
            nursery.cancel_scope.cancel()
    assert {market for market, source in _state(db_dsn) if source == "ws"} == {
        "900001",
        "900003",
        "900005",
        "900006",
        "900101",
    }
