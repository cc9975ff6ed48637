"""
The main job, end to end: real PostgreSQL, real loopback WebSocket (the
replay server on recorded frames), the daemon's real ``run``.

The final ``markets`` and ``positions`` rows must equal, exactly (Decimal),
what ``*.expected.json`` says a correct consumer holds after the last frame,
including a position inserted by another connection after start-up and the
two-outcome market of ``aaimek-2025-01``.
"""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import psycopg
import trio

from polystream.app import App, run
from polystream.config import Config, FeedConfig, HealthConfig, PipelineConfig
from polystream.markets import import_markets_file
from polystream.replay import ReplayServer, serve_replay

ROOT = Path(__file__).parent.parent
UPDOWN = ROOT / "examples" / "updown-2025-12-11"
AAIMEK = ROOT / "tests" / "data" / "replay" / "aaimek-2025-01"

# (market id, outcome, size, entry price)
POSITIONS = [
    ("900003", "Up", "100", "0.40"),  # sol 15m: book + trades
    ("900005", "Down", "200", "0.50"),  # btc 1h: book + trades
    ("900001", "Up", "80", "0.45"),  # btc 15m: trades only
    ("900101", "No", "300", "0.80"),  # aaimek: price changes only
]
LATE = ("900006", "Up", "120", "0.48")  # eth 1h, inserted after start-up


def _expected() -> dict[str, dict[str, Any]]:
    assets: dict[str, dict[str, Any]] = {}
    for capture in (UPDOWN, AAIMEK):
        assets.update(orjson.loads(Path(f"{capture}.expected.json").read_bytes())["assets"])
    return assets


def _dec(value: str | None) -> Decimal | None:
    return None if value is None else Decimal(value)


def _insert(
    conn: psycopg.Connection[Any], market: str, outcome: str, size: str, entry: str
) -> None:
    conn.execute(
        """
        INSERT INTO positions (user_id, market_id, outcome, token_id, size, entry_price)
        SELECT 'e2e', m.id, %s, m.clob_token_ids ->> (o.ord::int - 1), %s, %s
        FROM markets m, jsonb_array_elements_text(m.outcomes) WITH ORDINALITY o(name, ord)
        WHERE m.id = %s AND o.name = %s
        """,
        (outcome, Decimal(size), Decimal(entry), market, outcome),
    )


def _state(dsn: str) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    with psycopg.connect(dsn) as conn:
        markets = conn.execute(
            "SELECT id, clob_token_ids, outcome_prices, best_bid, best_ask, last_mid_price,"
            " last_trade_price, source FROM markets ORDER BY id"
        ).fetchall()
        positions = conn.execute(
            "SELECT token_id, size, entry_price, current_price, pnl_amount, pnl_percentage"
            " FROM positions ORDER BY id"
        ).fetchall()
    return markets, positions


def _mismatches(dsn: str, expected: dict[str, dict[str, Any]]) -> list[str]:
    markets, positions = _state(dsn)
    problems = []
    held = {row[0] for row in positions}
    for market_id, tokens, prices, bid, ask, mid, last, source in markets:
        if not held & set(tokens):
            continue
        want_prices = [_dec(expected[t]["display_price"]) for t in tokens]
        got_prices = [None if p is None else Decimal(p) for p in prices or []]
        first = expected[tokens[0]]
        got = (got_prices, bid, ask, mid, last, source)
        want = (
            want_prices,
            _dec(first["best_bid"]),
            _dec(first["best_ask"]),
            _dec(first["midpoint"]),
            _dec(first["last_trade_price"]),
            "ws",
        )
        if got != want:
            problems.append(f"market {market_id}: {got} != {want}")
    for token, size, entry, price, pnl, pct in positions:
        want_price = _dec(expected[token]["display_price"])
        assert want_price is not None
        want_pnl = size * (want_price - entry)
        want_pct = ((want_price - entry) / entry * 100).quantize(Decimal("0.0001"))
        if (price, pnl, pct) != (want_price, want_pnl, want_pct):
            problems.append(
                f"position {token[:8]}: {(price, pnl, pct)} != {(want_price, want_pnl, want_pct)}"
            )
    return problems


async def test_replay_into_postgres_matches_expected(db_dsn: str) -> None:
    expected = _expected()
    with psycopg.connect(db_dsn) as conn:
        for capture in (UPDOWN, AAIMEK):
            import_markets_file(conn, Path(f"{capture}.markets.json"))
        for position in POSITIONS:
            _insert(conn, *position)
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
                _insert(other, *LATE)
            await server.finished.wait()
            while problems := await trio.to_thread.run_sync(_mismatches, db_dsn, expected):
                await trio.sleep(0.1)
            assert not problems
            assert app.stats.desired_assets == 10
            assert app.stats.parse_errors == {}
            assert app.stats.rows_written["positions"] >= 5
            app.stop()
            nursery.cancel_scope.cancel()
    markets, _ = _state(db_dsn)
    assert {row[0] for row in markets if row[7] == "ws"} == {
        "900001",
        "900003",
        "900005",
        "900006",
        "900101",
    }
