"""
What a correct consumer of the recorded captures holds, computed from the
recordings themselves (``*.expected.json`` and the frames), and comparisons
of the database against it. Shared by the end-to-end, monitor and fault tests.
"""

from __future__ import annotations

import gzip
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import psycopg

from polystream.book import Books
from polystream.feed.protocol import parse_frame

ROOT = Path(__file__).parent.parent
UPDOWN = ROOT / "examples" / "updown-2025-12-11"
AAIMEK = ROOT / "tests" / "data" / "replay" / "aaimek-2025-01"


def dec(value: str | None) -> Decimal | None:
    """``Decimal`` of a JSON string, None stays None."""
    return None if value is None else Decimal(value)


def expected_assets(*captures: Path) -> dict[str, dict[str, Any]]:
    """Final per-asset state of ``captures`` from their ``.expected.json``."""
    assets: dict[str, dict[str, Any]] = {}
    for capture in captures:
        assets.update(orjson.loads(Path(f"{capture}.expected.json").read_bytes())["assets"])
    return assets


def apply_frame(books: Books, line: bytes) -> set[str]:
    """Apply one recorded frame to ``books`` (created as needed); returns the assets moved."""
    return books.apply(parse_frame(line).events).moved


def books_after(capture: Path = UPDOWN, frames: int | None = None) -> Books:
    """The books after the first ``frames`` frames of ``capture`` (all when None)."""
    books = Books()
    with gzip.open(f"{capture}.jsonl.gz", "rb") as handle:
        for number, line in enumerate(handle):
            if number == frames:
                break
            apply_frame(books, line)
    return books


def best_bid_frames(capture: Path = UPDOWN) -> dict[str, list[tuple[int, Decimal | None]]]:
    """``(frame index, best bid)`` of each asset after each frame that moved it."""
    books = Books()
    path: dict[str, list[tuple[int, Decimal | None]]] = {}
    with gzip.open(f"{capture}.jsonl.gz", "rb") as handle:
        for number, line in enumerate(handle):
            for asset in apply_frame(books, line):
                path.setdefault(asset, []).append((number, books[asset].best_bid))
    return path


def best_bid_path(capture: Path = UPDOWN) -> dict[str, list[Decimal | None]]:
    """Best bid of each asset after each frame that touched it, from the recording."""
    books = Books()
    path: dict[str, list[Decimal | None]] = {}
    with gzip.open(f"{capture}.jsonl.gz", "rb") as handle:
        for line in handle:
            for asset in apply_frame(books, line):
                path.setdefault(asset, []).append(books[asset].best_bid)
    return path


def first_crossing(bids: list[Decimal | None], kind: str, level: Decimal) -> Decimal | None:
    """The best bid at the first event crossing a TP (``>=``) or SL (``<=``) level."""
    for bid in bids:
        if bid is not None and (bid >= level if kind == "take_profit" else bid <= level):
            return bid
    return None


def mismatches(dsn: str, expected: dict[str, dict[str, Any]]) -> list[str]:
    """
    Differences between the database and the final state: ``markets`` rows
    of held markets (display prices in token order, quotes of the first
    token, ``source = 'ws'``) and the current price and P&L of every
    ``active`` position (mark ``display``). Empty when they agree exactly.
    """
    with psycopg.connect(dsn) as conn:
        markets = conn.execute(
            "SELECT id, clob_token_ids, outcome_prices, best_bid, best_ask, last_mid_price,"
            " last_trade_price, source FROM markets ORDER BY id"
        ).fetchall()
        positions = conn.execute(
            "SELECT token_id, size, entry_price, current_price, pnl_amount, pnl_percentage"
            " FROM positions WHERE status = 'active' ORDER BY id"
        ).fetchall()
    problems = []
    held = {row[0] for row in positions}
    for market_id, tokens, prices, bid, ask, mid, last, source in markets:
        if not held & set(tokens):
            continue
        first = expected[tokens[0]]
        got = ([dec(p) for p in prices or []], bid, ask, mid, last, source)
        want = (
            [dec(expected[t]["display_price"]) for t in tokens],
            dec(first["best_bid"]),
            dec(first["best_ask"]),
            dec(first["midpoint"]),
            dec(first["last_trade_price"]),
            "ws",
        )
        if got != want:
            problems.append(f"market {market_id}: {got} != {want}")
    for token, size, entry, price, pnl, pct in positions:
        want_price = dec(expected[token]["display_price"])
        assert want_price is not None
        want_pnl = size * (want_price - entry)
        want_pct = ((want_price - entry) / entry * 100).quantize(Decimal("0.0001"))
        if (price, pnl, pct) != (want_price, want_pnl, want_pct):
            problems.append(
                f"position {token[:8]}: {(price, pnl, pct)} != {(want_price, want_pnl, want_pct)}"
            )
    return problems


def insert_position(
    conn: psycopg.Connection[Any],
    market: str,
    outcome: str,
    size: str,
    entry: str,
    *,
    user: str = "test",
    take_profit: str | None = None,
    stop_loss: str | None = None,
) -> tuple[int, str]:
    """Insert an active position on ``outcome`` of ``market``; returns ``(id, token_id)``."""
    row = conn.execute(
        """
        INSERT INTO positions (user_id, market_id, outcome, token_id, size, entry_price,
                               take_profit_price, stop_loss_price)
        SELECT %s, m.id, %s, m.clob_token_ids ->> (o.ord::int - 1), %s, %s, %s, %s
        FROM markets m, jsonb_array_elements_text(m.outcomes) WITH ORDINALITY o(name, ord)
        WHERE m.id = %s AND o.name = %s
        RETURNING id, token_id
        """,
        (
            user,
            outcome,
            Decimal(size),
            Decimal(entry),
            dec(take_profit),
            dec(stop_loss),
            market,
            outcome,
        ),
    ).fetchone()
    assert row is not None, (market, outcome)
    return int(row[0]), str(row[1])


def hold_every_updown_token(dsn: str) -> None:
    """Import the demo capture's markets and hold a position (10 shares at 0.5) on each token."""
    from polystream.store.markets import import_markets_file

    with psycopg.connect(dsn) as conn:
        import_markets_file(conn, Path(f"{UPDOWN}.markets.json"))
        conn.execute(
            "INSERT INTO positions (user_id, market_id, token_id, size, entry_price)"
            " SELECT 'u', m.id, t, 10, 0.5 FROM markets m,"
            " jsonb_array_elements_text(m.clob_token_ids) t"
        )


def insert_rules(
    conn: psycopg.Connection[Any], rules: list[tuple[str, str, str, str]], *, user: str = "test"
) -> dict[int, tuple[str, Decimal | None]]:
    """
    One position (10 shares at 0.5) per ``(market, outcome, kind, level)`` rule,
    with that take profit or stop loss; returns ``{position id: (kind, best bid
    at the first crossing in the recording, or None)}``.
    """
    path = best_bid_path()
    found: dict[int, tuple[str, Decimal | None]] = {}
    for market, outcome, kind, level in rules:
        pid, token = insert_position(
            conn,
            market,
            outcome,
            "10",
            "0.5",
            user=user,
            take_profit=level if kind == "take_profit" else None,
            stop_loss=level if kind == "stop_loss" else None,
        )
        found[pid] = (kind, first_crossing(path[token], kind, Decimal(level)))
    return found


async def serve_updown(nursery: Any) -> Any:
    """The demo capture served at maximum speed on a free port (a ``ReplayServer``)."""
    from polystream.replay import serve_replay

    return await nursery.start(
        lambda task_status: serve_replay(
            [Path(f"{UPDOWN}.jsonl.gz")], max_speed=True, task_status=task_status
        )
    )


def replay_config(port: int, **sections: Any) -> Any:
    """
    A daemon ``Config`` for the replay server on ``port``: fast flushes
    (market 0.05 s, debounce 0.1 s), ``/health`` on a free port, plus ``sections``.
    """
    from polystream.config import Config, FeedConfig, HealthConfig, PipelineConfig

    return Config(
        **{
            "feed": FeedConfig(url=f"ws://127.0.0.1:{port}/ws/market"),
            "pipeline": PipelineConfig(market_flush_interval=0.05, debounce=0.1),
            "health": HealthConfig(listen="127.0.0.1:0"),
            **sections,
        }
    )
