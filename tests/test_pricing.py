"""
A new position is priced from the current book at once, whatever the path,
on a market that does not move (the replay tape is paused): inserted with a
``token_id`` or only an ``outcome``, on a market already subscribed or newly
subscribed, re-opened within the unsubscribe grace, inserted while LISTEN
was down. Real PostgreSQL, the real daemon, the replay server on loopback.

The expected price is the display price (``positions.mark`` default) of the
asset's book after the frames the tape played before it paused, computed
independently from the recording (``expected.books_after``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest
import trio
from expected import UPDOWN, books_after

from polystream.app import App, run
from polystream.config import Config, FeedConfig, HealthConfig, PipelineConfig
from polystream.replay import Capture, ReplayServer, ScheduledFault, Tape
from polystream.store.markets import import_markets_file

PAUSE_AT = 3000  # frames played before the tape holds: the market is quiet from then on
SOL = "900003"
SOL_UP = "26975287284659697395137026699226669940909216664286471914722914103715066514506"
SOL_DOWN = "43480974677375827891722101312344369582184206145113152473282188970519344902742"
BTC_1H = "900005"
TIMEOUT = 60  # a guard against a hang, not a timing assertion


@pytest.fixture(scope="module")
def marks() -> dict[str, Decimal | None]:
    """The display price of every asset once the tape has paused."""
    return {asset: book.top().display for asset, book in books_after(UPDOWN, PAUSE_AT).items()}


def _sql(dsn: str, query: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.execute(query, params)
        return cur.fetchall() if cur.description else []


def _insert(dsn: str, market: str, *, token: str | None = None, outcome: str | None = None) -> int:
    rows = _sql(
        dsn,
        "INSERT INTO positions (user_id, market_id, outcome, token_id, size, entry_price)"
        " VALUES ('bot', %s, %s, %s, 10, 0.5) RETURNING id",
        market,
        outcome,
        token,
    )
    return int(rows[0][0])


async def priced(app: App, dsn: str, position_id: int) -> tuple[str, Decimal]:
    """Wait (on the position writer's writes, not a clock) until the position has a price."""
    while True:
        seen = app.positions.batches.count
        [(token, price)] = await trio.to_thread.run_sync(
            _sql, dsn, "SELECT token_id, current_price FROM positions WHERE id = %s", position_id
        )
        if price is not None:
            return token, price
        await app.positions.batches.after(seen)


@pytest.fixture
async def quiet(db_dsn: str, nursery: trio.Nursery) -> AsyncIterator[tuple[App, ReplayServer]]:
    """The daemon on a replay whose tape has paused for good after ``PAUSE_AT`` frames."""
    await trio.to_thread.run_sync(
        lambda: import_markets_file(psycopg.connect(db_dsn), Path(f"{UPDOWN}.markets.json"))
    )
    server = ReplayServer(
        tape=Tape(Capture.load([Path(f"{UPDOWN}.jsonl.gz")])),
        max_speed=True,
        start_when_subscribed=False,
        faults=(ScheduledFault("pause", after=PAUSE_AT),),
    )
    await nursery.start(server.serve)
    with trio.fail_after(TIMEOUT):
        while not server.paused:
            await trio.sleep(0.01)
    config = Config(
        feed=FeedConfig(url=server.url, reconcile_interval=300.0, unsubscribe_grace=60.0),
        pipeline=PipelineConfig(market_flush_interval=0.05, debounce=0.1),
        health=HealthConfig(listen="127.0.0.1:0"),
    )
    app: App = await nursery.start(run, config, db_dsn)
    yield app, server
    assert server.paused and server.tape.frames_played == PAUSE_AT  # nothing moved meanwhile
    app.stop()


async def test_second_position_on_a_quiet_subscribed_market(
    db_dsn: str, quiet: tuple[App, ReplayServer], marks: dict[str, Decimal | None]
) -> None:
    app, _ = quiet
    with trio.fail_after(TIMEOUT):
        first = _insert(db_dsn, SOL, token=SOL_UP)
        assert await priced(app, db_dsn, first) == (SOL_UP, marks[SOL_UP])
        # The market is subscribed, its book known, and it will not move again.
        second = _insert(db_dsn, SOL, token=SOL_DOWN)
        assert await priced(app, db_dsn, second) == (SOL_DOWN, marks[SOL_DOWN])


async def test_position_named_by_outcome_only(
    db_dsn: str, quiet: tuple[App, ReplayServer], marks: dict[str, Decimal | None]
) -> None:
    app, _ = quiet
    with trio.fail_after(TIMEOUT):
        subscribed = _insert(db_dsn, SOL, token=SOL_UP)
        await priced(app, db_dsn, subscribed)
        by_outcome = _insert(db_dsn, SOL, outcome="Down")  # token filled in by the daemon
        assert await priced(app, db_dsn, by_outcome) == (SOL_DOWN, marks[SOL_DOWN])
        fresh = _insert(db_dsn, BTC_1H, outcome="Up")  # a market nothing had subscribed
        token, price = await priced(app, db_dsn, fresh)
        assert price == marks[token]


async def test_position_reopened_within_the_grace(
    db_dsn: str, quiet: tuple[App, ReplayServer], marks: dict[str, Decimal | None]
) -> None:
    app, _ = quiet
    with trio.fail_after(TIMEOUT):
        pid = _insert(db_dsn, SOL, token=SOL_UP)
        await priced(app, db_dsn, pid)
        # Closed, given a stale price by another service, opened again: still
        # subscribed (grace 60 s), the market quiet: priced from the book at once.
        _sql(db_dsn, "UPDATE positions SET status = 'closed' WHERE id = %s", pid)
        _sql(
            db_dsn,
            "UPDATE positions SET current_price = NULL, pnl_amount = NULL WHERE id = %s",
            pid,
        )
        _sql(db_dsn, "UPDATE positions SET status = 'active' WHERE id = %s", pid)
        assert SOL_UP in app.pool.asset_shard
        assert await priced(app, db_dsn, pid) == (SOL_UP, marks[SOL_UP])


async def test_position_inserted_while_listen_was_down(
    db_dsn: str, quiet: tuple[App, ReplayServer], marks: dict[str, Decimal | None]
) -> None:
    app, _ = quiet
    listening = (
        "SELECT pid FROM pg_stat_activity"
        " WHERE application_name = 'polystream-listen' AND datname = current_database()"
    )
    with trio.fail_after(TIMEOUT):
        pid = _insert(db_dsn, SOL, token=SOL_UP)
        await priced(app, db_dsn, pid)
        [(backend,)] = _sql(db_dsn, listening)
        _sql(db_dsn, "SELECT pg_terminate_backend(%s)", backend)
        while _sql(db_dsn, listening):
            await trio.sleep(0.01)
        # Nobody listens: no NOTIFY reaches the daemon; the reconcile after re-LISTEN
        # must subscribe and price it (the periodic one is 300 s away).
        late = _insert(db_dsn, SOL, token=SOL_DOWN)
        assert await priced(app, db_dsn, late) == (SOL_DOWN, marks[SOL_DOWN])
