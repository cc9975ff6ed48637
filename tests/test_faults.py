"""
Faults of the venue against the real daemon: ``polystream.app.run`` in
process, real PostgreSQL, the replay server's fault modes
(``polystream.replay``, "Faults") on ``examples/updown-2025-12-11``.

Every test plays the same story: markets imported, a position on each of the
12 tokens and four TP/SL rules whose first crossings (frames 3,427 to 4,800)
are known from the recording. The tape pauses after frame 5,000; once every
rule fired, the fault is applied and the tape resumes at full speed (a
connection the fault took off the tape costs nothing, so the frames the
daemon misses go by at once). The daemon must then recover by itself, and
at the end:

* ``markets`` and ``positions`` equal the undisturbed final state
  (``expected.mismatches``; after a reconnect the snapshot carries
  ``last_trade_price``, which the display price needs);
* every rule fired exactly once, at its first crossing (a reconnect's
  snapshot of ``900003 Up`` at 0.99 re-crosses its 0.60 take-profit);
* the counters show the fault was seen.

Timeouts are small (PING every 0.2 s, PONG within 1 s, stale after 1 s,
backoff 0.05 to 0.5 s), so each test takes a few seconds.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from decimal import Decimal
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import psycopg
import pytest
import trio
from expected import UPDOWN, best_bid_path, expected_assets, first_crossing, mismatches
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve
from test_poller import FakeClob

from polystream.app import App, run
from polystream.config import (
    Config,
    FeedConfig,
    HealthConfig,
    PipelineConfig,
    PollConfig,
)
from polystream.feed.transport import TRANSPORTS
from polystream.replay import (
    GARBAGE_KINDS,
    Capture,
    ReplayServer,
    ScheduledFault,
    Tape,
)
from polystream.store.markets import import_markets_file
from polystream.venue.clob import Quote

CAPTURE = Path(f"{UPDOWN}.jsonl.gz")
PAUSE_AT = 5000  # frames; every rule below crossed by frame 4,800
TIMEOUT = 120  # a guard against a hang, not a timing assertion (a loaded 2-core machine)
RULES = [
    ("900003", "Up", "take_profit", "0.60"),  # the final snapshot (0.99) crosses again
    ("900003", "Down", "stop_loss", "0.40"),
    ("900005", "Down", "stop_loss", "0.40"),
    ("900006", "Up", "take_profit", "0.60"),
]
GARBAGE_MARKETS = [("900005", "Up"), ("900006", "Down")]  # two-sided books, no rules


def _tokens() -> dict[tuple[str, str], str]:
    tokens = {}
    for market in json.loads(Path(f"{UPDOWN}.markets.json").read_text()):
        ids, outcomes = json.loads(market["clobTokenIds"]), json.loads(market["outcomes"])
        for token, outcome in zip(ids, outcomes, strict=True):
            tokens[market["id"], outcome] = token
    return tokens


TOKENS = _tokens()
NOT_ERRORS = ("foreign_asset", "unknown_event_type")  # counted apart: foreign, ignored
GARBAGE_ASSETS = frozenset(TOKENS[m] for m in GARBAGE_MARKETS)


@pytest.fixture(scope="module")
def capture() -> Capture:
    return Capture.load([CAPTURE])


@pytest.fixture(scope="module")
def bid_path() -> dict[str, list[Decimal | None]]:
    return best_bid_path()


def tape_quotes(tape: Tape) -> dict[str, Quote]:
    """What the CLOB says now: the top of each of the tape's books."""
    quotes = {}
    for asset_id in tape.capture.markets:
        book = tape.snapshot(asset_id)
        assert book is not None
        bids = [Decimal(level["price"]) for level in book["bids"]]
        asks = [Decimal(level["price"]) for level in book["asks"]]
        if bids or asks:
            bid, ask = max(bids, default=None), min(asks, default=None)
            mid = None if bid is None or ask is None else (bid + ask) / 2
            quotes[asset_id] = Quote(bid, ask, mid)
    return quotes


def _insert(conn: psycopg.Connection[Any], token: str, tp: str | None, sl: str | None) -> int:
    row = conn.execute(
        "INSERT INTO positions (user_id, market_id, outcome, token_id, size, entry_price,"
        " take_profit_price, stop_loss_price)"
        " SELECT 'test', m.id, o.name, %s, 10, 0.5, %s, %s"
        " FROM markets m, jsonb_array_elements_text(m.outcomes) WITH ORDINALITY o(name, ord)"
        " WHERE m.clob_token_ids ->> (o.ord::int - 1) = %s RETURNING id",
        (token, tp, sl, token),
    ).fetchone()
    assert row is not None
    return int(row[0])


def seed(dsn: str, bid_path: dict[str, list[Decimal | None]]) -> dict[int, Decimal]:
    """Markets, a position per token, the rules; returns position id -> first crossing."""
    expected: dict[int, Decimal] = {}
    with psycopg.connect(dsn) as conn:
        import_markets_file(conn, Path(f"{UPDOWN}.markets.json"))
        for token in TOKENS.values():
            _insert(conn, token, None, None)
        for market, outcome, kind, level in RULES:
            token = TOKENS[market, outcome]
            tp = level if kind == "take_profit" else None
            sl = level if kind == "stop_loss" else None
            crossing = first_crossing(bid_path[token], kind, Decimal(level))
            assert crossing is not None
            expected[_insert(conn, token, tp, sl)] = crossing
    return expected


def fired(dsn: str) -> list[tuple[int, Decimal]]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT position_id, price FROM triggers ORDER BY id").fetchall()
    return [(int(pid), Decimal(price)) for pid, price in rows]


@attrs.define
class Rig:
    """A replay server, a fake CLOB and the daemon, wired; the test drives the faults."""

    dsn: str
    server: ReplayServer
    clob: FakeClob
    app: App
    rules: dict[int, Decimal]

    @property
    def shard(self) -> Any:
        return self.app.stats.shards[0]

    async def until(self, condition: Callable[[], bool], poll: float = 0.02) -> None:
        while not condition():
            await trio.sleep(poll)

    async def rules_fired(self) -> None:
        """Wait until the tape paused and every rule fired (the daemon is past the crossings)."""
        await self.until(lambda: self.server.paused)
        await self.until(lambda: self.app.stats.triggers_written >= len(self.rules))

    async def converged(self) -> None:
        """Wait for the end of the tape and the final state; check the triggers."""
        await self.server.finished.wait()
        expected = expected_assets(UPDOWN)
        while await trio.to_thread.run_sync(mismatches, self.dsn, expected):
            await trio.sleep(0.05)
        await self.until(lambda: not self.app.executor.pending)
        rows = await trio.to_thread.run_sync(fired, self.dsn)
        assert len(rows) == len(self.rules), rows  # once each, never twice
        assert dict(rows) == self.rules


@asynccontextmanager
async def open_rig(
    dsn: str,
    capture: Capture,
    bid_path: dict[str, list[Decimal | None]],
    *,
    faults: tuple[ScheduledFault, ...] = (ScheduledFault("pause", after=PAUSE_AT),),
    server_options: dict[str, Any] | None = None,
    feed_options: dict[str, Any] | None = None,
    poll_options: dict[str, Any] | None = None,
    transport: str = "sansio",
) -> AsyncIterator[Rig]:
    rules = seed(dsn, bid_path)
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            options = {"max_speed": True, **(server_options or {})}
            server = ReplayServer(tape=Tape(capture), faults=faults, **options)
            await nursery.start(server.serve)
            clob = FakeClob(tape_quotes(server.tape))
            hyper = HypercornConfig()
            hyper.bind = ["127.0.0.1:0"]
            hyper.accesslog = hyper.errorlog = None
            hyper.graceful_timeout = 0.1
            urls = await nursery.start(partial(serve, clob.app, hyper, mode="asgi"))  # type: ignore[arg-type]
            clob.url = urls[0]
            feed = {
                "url": server.url,
                "transport": transport,
                "ping_interval": 0.2,
                "pong_timeout": 1.0,
                "stale_after": 1.0,
                "backoff_initial": 0.05,
                "backoff_max": 0.5,
                "connect_stagger": 0.0,
                **(feed_options or {}),
            }
            poll = {
                "url": clob.url,
                "grace": 5.0,
                "interval": 0.2,
                "check_interval": 0.05,
                "attempts": 1,
                "request_timeout": 2.0,
                **(poll_options or {}),
            }
            config = Config(
                feed=FeedConfig(**feed),
                poll=PollConfig(**poll),
                pipeline=PipelineConfig(market_flush_interval=0.05, debounce=0.1),
                health=HealthConfig(listen="127.0.0.1:0"),
            )
            app: App = await nursery.start(run, config, dsn)
            yield Rig(dsn, server, clob, app, rules)
            app.stop()
            nursery.cancel_scope.cancel()


Rigged = Callable[..., Any]


@pytest.fixture(params=TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> str:
    """Every fault test runs on each transport (``feed.transport``)."""
    kind: str = request.param
    return kind


@pytest.fixture
def rig(
    db_dsn: str, capture: Capture, bid_path: dict[str, list[Decimal | None]], transport: str
) -> Iterator[Rigged]:
    yield partial(open_rig, db_dsn, capture, bid_path, transport=transport)


# ------------------------------------------------------------------ dropped connections


@pytest.mark.parametrize("how", ["tcp", "reset", "close"])
async def test_dropped_connection(rig: Rigged, how: str) -> None:
    async with rig() as r:
        await r.rules_fired()
        r.server.refusing = 503  # until the tape is over: the frames missed go by at once
        assert await r.server.drop(how) == 1
        r.server.resume()
        await r.server.finished.wait()
        r.server.refusing = 0
        await r.converged()
        assert r.server.stats.rejected >= 1
        assert r.shard.reconnects == 1 + r.server.stats.rejected
        assert r.shard.state == "connected"
        assert r.server.stats.connections == 2
    assert r.app.stats.parse_errors == {}


@pytest.mark.slow
async def test_scheduled_drops_every_2000_frames(rig: Rigged) -> None:
    """Drops during the crossings themselves: a snapshot after each reconnect."""
    faults = (ScheduledFault("drop-tcp", every=2000),)
    async with rig(faults=faults, server_options={"max_speed": False, "speed": 400.0}) as r:
        await r.server.finished.wait()
        expected = expected_assets(UPDOWN)
        while await trio.to_thread.run_sync(mismatches, r.dsn, expected):
            await trio.sleep(0.05)
        assert r.server.stats.faults["drop-tcp"] == 7
        # A drop that comes while the client is still reconnecting hits nobody
        # (on a loaded machine a reconnect can outlast 2,000 frames at 400x):
        # every drop that hit the connection made the daemon reconnect.
        hit = [f for f in r.server.fault_log if f.action == "drop-tcp" and f.clients]
        assert len(hit) >= 1
        assert r.shard.reconnects >= len(hit)
        rows = await trio.to_thread.run_sync(fired, r.dsn)
    # Crossings missed while reconnecting may fire later at another price: never twice.
    assert len(rows) == len({pid for pid, _ in rows}) <= len(r.rules)


# ------------------------------------------------------------------ dead links


async def test_half_open_link_is_closed_after_pong_timeout(rig: Rigged) -> None:
    async with rig() as r:
        await r.rules_fired()
        assert r.server.half_open() == 1
        r.server.resume()
        await r.converged()
        assert r.shard.reconnects == 1
        assert "no PONG" in (r.shard.last_error or "")


async def test_stall_mid_frame(rig: Rigged) -> None:
    async with rig() as r:
        await r.rules_fired()
        assert r.server.stall() == 1
        r.server.resume()
        await r.converged()
        assert r.shard.reconnects == 1
        assert "no PONG" in (r.shard.last_error or "")


async def test_silent_feed_is_recycled_when_rest_prices_moved(rig: Rigged) -> None:
    async with rig() as r:
        await r.rules_fired()
        assert r.server.silence() == 1  # PONG keeps coming, data does not
        r.server.resume()
        await r.server.finished.wait()  # the market moved; the daemon saw none of it
        r.clob.quotes = tape_quotes(r.server.tape)
        with trio.fail_after(TIMEOUT):  # stale_after 1 s, then one REST check
            await r.until(lambda: r.shard.reconnects > 0)
        await r.converged()
        assert r.shard.reconnects == 1
        assert r.shard.stale_checks >= 1
        assert "while prices moved" in (r.shard.last_error or "")
        assert {path for path, _ in r.clob.requests} == {"/prices"}


async def test_quiet_market_is_not_recycled(rig: Rigged) -> None:
    async with rig() as r:
        r.clob.quotes = {}  # no evidence until the daemon has caught up
        await r.rules_fired()
        # The tape holds (a quiet market). The first stale check comes after
        # stale_after (1 s) of silence: the daemon has applied all it was sent.
        await r.until(lambda: r.shard.stale_checks >= 1)
        # REST now agrees with the daemon's books. (Not the tape's levels: the
        # recording's reported tops and levels disagree at places, and which one
        # a consumer holds depends on when it subscribed, since events older
        # than its snapshot are skipped.)
        r.clob.quotes = {
            asset_id: Quote(top[0], top[1], None)
            for asset_id in r.server.tape.capture.markets
            if (top := r.app.top_pair(asset_id)) is not None
        }
        assert r.clob.quotes
        # Two more stale checks with nothing to say.
        await r.until(lambda: r.shard.stale_checks >= 3)
        assert r.shard.reconnects == 0
        assert r.shard.state == "connected"
        checks = r.shard.stale_checks
        # The tape moves on, and past its end the feed is silent again: this fake
        # CLOB only knows the paused state, so it has no evidence to give any more.
        r.clob.quotes = {}
        r.server.resume()
        await r.converged()
        assert r.shard.reconnects == 0
    assert checks >= 1  # checked over REST, found unchanged, left alone
    assert {path for path, _ in r.clob.requests} == {"/prices"}


# ------------------------------------------------------------------ venue limits


async def test_subscribe_frames_under_the_venue_limit(rig: Rigged) -> None:
    """The daemon chunks its subscription under ``feed.max_subscribe_bytes``: never closed."""
    async with rig(
        server_options={"max_subscribe_bytes": 600},
        feed_options={"max_subscribe_bytes": 500},
    ) as r:
        await r.rules_fired()
        r.server.resume()
        await r.converged()
        assert r.server.stats.oversized_subscribes == 0
        assert r.server.stats.max_message_bytes <= 500
        assert r.shard.reconnects == 0


async def test_close_on_oversized_subscribe_converges(rig: Rigged) -> None:
    """The venue's cap is below ``feed.max_subscribe_bytes``: it closes each connection."""
    async with rig(server_options={"max_subscribe_ids": 8}) as r:
        with trio.fail_after(TIMEOUT):
            await r.rules_fired()
            r.server.resume()
            await r.converged()


@pytest.mark.slow
async def test_http_429_on_a_connection_storm(rig: Rigged) -> None:
    """Six shards at once against a venue that accepts two connections a second."""
    async with rig(
        faults=(ScheduledFault("pause", after=1), ScheduledFault("pause", after=PAUSE_AT)),
        server_options={"storm_limit": 2, "storm_window": 1.0},
        feed_options={"max_assets_per_connection": 2},
    ) as r:
        shards = r.app.stats.shards
        await r.until(
            lambda: len(shards) == 6 and all(s.state == "connected" for s in shards.values())
        )
        assert r.server.stats.rejected >= 1
        assert sum(s.reconnects for s in shards.values()) == r.server.stats.rejected
        assert "429" in "".join(s.last_error or "" for s in shards.values())
        r.server.resume()  # from frame 1, every shard subscribed
        await r.rules_fired()
        r.server.resume()
        await r.converged()


# ------------------------------------------------------------------ HTTP fallback


async def test_fallback_polls_while_the_venue_refuses(rig: Rigged) -> None:
    async with rig(poll_options={"grace": 0.3}) as r:
        await r.rules_fired()
        token = TOKENS["900005", "Up"]
        r.clob.quotes = {token: Quote(Decimal("0.31"), Decimal("0.33"), Decimal("0.32"))}
        r.server.refusing = 503
        await r.server.drop("tcp")
        expected_row = ("poll", Decimal("0.31"))
        while await trio.to_thread.run_sync(_market_900005, r.dsn) != expected_row:
            await trio.sleep(0.05)
        assert r.server.stats.rejected >= 1
        assert r.shard.state != "connected"
        r.server.refusing = 0
        r.server.resume()
        await r.converged()
        poll = r.app.stats.health()["poll"]
        assert poll["polls"] >= 1 and poll["assets_polled"] >= 1


def _market_900005(dsn: str) -> tuple[str, Decimal] | None:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT source, best_bid FROM markets WHERE id = '900005'").fetchone()
    return None if row is None else (row[0], row[1])


# ------------------------------------------------------------------ bad input


async def test_garbage_between_frames_is_refused_and_counted(rig: Rigged) -> None:
    kinds = [k for k in GARBAGE_KINDS if k != "not_utf8_text"]
    async with rig() as r:
        await r.rules_fired()
        before = dict(r.app.stats.parse_errors)
        sent = r.server.inject_garbage(kinds, asset_ids=GARBAGE_ASSETS)
        assert [g.kind for g in sent[1]] == kinds
        r.server.resume()
        await r.converged()
        assert before == {}
        assert r.shard.reconnects == 0
        stats = r.app.stats
        want = {GARBAGE_KINDS[k]: 1 for k in kinds if k not in NOT_ERRORS}
        assert dict(stats.parse_errors) == want
        assert stats.foreign_events == 1
        assert stats.ignored_events == {"price_surprise": 1}  # an undefined type is no error
        assert stats.events["price_surprise"] == 1


@pytest.mark.slow
async def test_scheduled_garbage_every_500_frames(rig: Rigged) -> None:
    """The whole catalogue 28 times through the tape, the crossings included."""
    async with rig(
        faults=(ScheduledFault("garbage", every=500),),
        server_options={"garbage_assets": GARBAGE_ASSETS},
    ) as r:
        await r.converged()
        sent = r.server.stats.garbage_sent
        assert sum(sent.values()) >= 12 * 20
        stats = r.app.stats
        want = {GARBAGE_KINDS[k]: n for k, n in sent.items() if k not in NOT_ERRORS}
        assert dict(stats.parse_errors) == want
        assert stats.foreign_events == sent["foreign_asset"]
        assert stats.ignored_events == {"price_surprise": sent["unknown_event_type"]}
        assert r.shard.reconnects == 0


async def test_text_frame_that_is_not_utf8(rig: Rigged, transport: str) -> None:
    """
    ``sansio`` hands the frame to the parser, which counts it (``not_utf8``) and
    skips it: no reconnect. ``trio-websocket`` (wsproto) fails the connection
    with 1007 before the parser sees it: a reconnect, counted from the close.
    """
    async with rig() as r:
        await r.rules_fired()
        skipped = transport == "sansio"  # the tape goes on only for a client that skips it
        r.server.inject_garbage(["not_utf8_text"], asset_ids=GARBAGE_ASSETS, poison=not skipped)
        r.server.resume()
        await r.converged()
        assert r.app.stats.parse_errors["not_utf8"] == 1
        if transport == "sansio":
            assert r.shard.reconnects == 0
        else:
            assert r.shard.reconnects == 1
            assert "1007" in (r.shard.last_error or "")


@pytest.mark.slow
@pytest.mark.parametrize("transport", ["trio-websocket"])  # sansio skips the frame (above)
async def test_socket_failed_with_1007_is_closed(rig: Rigged, transport: str) -> None:
    async with rig() as r:
        await r.rules_fired()
        r.server.inject_garbage(["not_utf8_text"], asset_ids=GARBAGE_ASSETS)
        await r.until(lambda: r.shard.reconnects == 1)
        with trio.fail_after(TIMEOUT):
            await r.until(lambda: 1 not in r.server.subscriptions())
