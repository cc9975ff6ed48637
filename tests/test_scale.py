"""
Scale: 10,000 assets (5,000 synthetic markets, one active position each) over
50 connections of at most 200 assets, against the replay server on a real
loopback socket and a real PostgreSQL.

Every asset must get its book snapshot; no connection may hold more than
``max_assets_per_connection`` ids nor send a subscribe frame over 40 KiB; and
after the server drops every connection, each shard must come back with its
exact set, every asset getting a fresh snapshot, no asset on two connections.

The tape plays at a tenth of recorded speed with events forwarded to the
synthetic copies, so subscribing and reconnecting happen on a live feed while
the whole test stays well under a minute on a shared 2-core machine (at
recorded speed, ~13k events/s, it took up to 57 s there under load).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
import trio

from polystream.app import App, run
from polystream.config import Config, FeedConfig, HealthConfig, PipelineConfig
from polystream.replay import Capture, ReplayServer, Synthetic, Tape
from polystream.store.markets import GammaMarket, upsert_markets

pytestmark = pytest.mark.slow

ROOT = Path(__file__).parent.parent
UPDOWN = ROOT / "examples" / "updown-2025-12-11.jsonl.gz"
ASSETS = 10_000
PER_CONNECTION = 200
MAX_FRAME_BYTES = 40 * 1024
SPEED = 0.1  # a live trickle: ~1,300 synthetic events/s fanned out to 10,000 copies


async def wait_until(predicate: Callable[[], Any], poll: float = 0.05) -> None:
    """Poll a condition on real I/O (callers bound it with ``trio.fail_after``)."""
    while not predicate():
        await trio.sleep(poll)


def _insert_markets_and_positions(dsn: str, synthetic: Synthetic) -> None:
    markets = [GammaMarket.from_gamma(obj) for obj in synthetic.gamma_markets()]
    assert len(markets) == ASSETS // 2
    assert all(len(m.clob_token_ids) == 2 for m in markets)
    with psycopg.connect(dsn) as conn:
        upsert_markets(conn, markets)
        conn.execute(
            "INSERT INTO positions (user_id, market_id, outcome, token_id, size, entry_price)"
            " SELECT 'scale', u.id, 'Yes', u.token, 10, 0.5"
            " FROM unnest(%s::text[], %s::text[]) AS u(id, token)",
            ([m.id for m in markets], [m.clob_token_ids[0] for m in markets]),
        )


def _live(server: ReplayServer, after: int) -> dict[int, frozenset[str]]:
    """Open connections numbered above ``after`` -> their subscription sets."""
    return {n: s for n, s in server.subscriptions().items() if n > after}


def _restored(server: ReplayServer, app: App, after: int, since: float, wanted: set[str]) -> bool:
    """Every asset subscribed on a connection newer than ``after`` and snapshotted since ``since``."""
    live = _live(server, after)
    if sum(len(s) for s in live.values()) != len(wanted):
        return False
    if set().union(*live.values()) != wanted:
        return False
    times = server.snapshot_times
    if any(times.get(asset, 0.0) < since for asset in wanted):
        return False
    seen = set().union(*(s.seen_assets for s in app.stats.shards.values()))
    return seen == wanted


def _check_limits(server: ReplayServer) -> None:
    for log in server.connection_logs:
        for request in log.requests:
            assert request.size_bytes <= MAX_FRAME_BYTES, (log.number, request.size_bytes)
            assert request.subscribed_after <= PER_CONNECTION, (log.number, request)
    assert server.stats.max_message_bytes <= MAX_FRAME_BYTES
    assert server.stats.max_subscribed <= PER_CONNECTION


async def test_ten_thousand_assets_subscribe_and_survive_reconnect(db_dsn: str) -> None:
    capture = Capture.load([UPDOWN])
    synthetic = Synthetic.build(capture.markets, ASSETS)
    wanted = set(synthetic.assets)
    await trio.to_thread.run_sync(_insert_markets_and_positions, db_dsn, synthetic)
    server = ReplayServer(tape=Tape(capture), speed=SPEED, synthetic=synthetic, record=True)
    with trio.fail_after(180):
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve)
            config = Config(
                feed=FeedConfig(
                    url=server.url,
                    max_assets_per_connection=PER_CONNECTION,
                    connect_stagger=0.01,
                    reconcile_interval=300.0,
                    backoff_initial=0.2,
                    backoff_max=2.0,
                ),
                pipeline=PipelineConfig(market_flush_interval=0.25),
                health=HealthConfig(listen="127.0.0.1:0"),
            )
            started = time.monotonic()
            app: App = await nursery.start(run, config, db_dsn)
            await wait_until(lambda: app.stats.desired_assets == ASSETS)

            # 1. Cold start: every asset subscribed once and snapshotted.
            await wait_until(lambda: _restored(server, app, 0, started, wanted))
            first = _live(server, 0)
            assert len(first) >= ASSETS // PER_CONNECTION
            assert all(len(s) <= PER_CONNECTION for s in first.values())
            shards = {frozenset(s.assets) for s in app.pool.shards.values()}
            assert set(first.values()) == shards
            _check_limits(server)

            # 2. The server drops every connection: each shard restores its exact set.
            newest = server.stats.connections
            dropped_at = time.monotonic()
            assert await server.close_clients("scale test") == len(first)
            await wait_until(lambda: _restored(server, app, newest, dropped_at, wanted))
            second = _live(server, newest)
            assert sorted(map(sorted, second.values())) == sorted(map(sorted, first.values()))
            assert {frozenset(s.assets) for s in app.pool.shards.values()} == shards
            assert sum(len(s) for s in second.values()) == ASSETS  # no asset twice
            assert all(shard.reconnects >= 1 for shard in app.stats.shards.values())
            _check_limits(server)
            for log in server.connection_logs[newest:]:
                assert log.requests[0].operation == "type"
                assert set(log.snapshots) == set(log.subscribed)
            app.stop()
            nursery.cancel_scope.cancel()
