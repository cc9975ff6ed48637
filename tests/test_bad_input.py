"""
The bad-input catalogue (README, "Bad input"): each case is refused or
repaired, counted by kind, and logged once per kind per 10 s with context.
Frame-level cases (truncated JSON, unknown types, missing or mistyped fields,
prices outside [0, 1], NaN or negative sizes, non-UTF-8) are in
test_protocol.py; the ones that need state or a socket are here.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import attrs
import orjson
import pytest
import structlog
import trio
from test_feed import RecordingServer, _pool
from trio_websocket import WebSocketRequest, serve_websocket

from polystream.book import Books
from polystream.catalog import Catalog
from polystream.feed.protocol import parse_frame
from polystream.feed.transport import TRANSPORTS
from polystream.pipeline.router import Router
from polystream.pipeline.writers import MarketWriter, PositionWriter, Written
from polystream.stats import Stats

D = Decimal


async def _sink(rows: list[Any]) -> Written:
    return Written(len(rows))


def _router() -> Router:
    books = Books()
    catalog = Catalog()
    stats = Stats()
    markets = MarketWriter(books, catalog, stats, sink=_sink, interval=1.0)
    positions = PositionWriter(
        books, catalog, stats, sink=_sink, price_choice="display", debounce=1.0, rate=100.0
    )
    return Router(books, catalog, markets, positions)


def _frame(**event: Any) -> list[Any]:
    return parse_frame(orjson.dumps(event)).events


def _change(ts: int, price: str, size: str, side: str) -> list[Any]:
    return _frame(
        event_type="price_change",
        market="m",
        timestamp=str(ts),
        price_changes=[{"asset_id": "a", "price": price, "size": size, "side": side, "hash": "h"}],
    )


BOOK = {
    "event_type": "book",
    "asset_id": "a",
    "market": "m",
    "bids": [{"price": "0.40", "size": "10"}, {"price": "0.45", "size": "5"}],
    "asks": [{"price": "0.50", "size": "7"}, {"price": "0.55", "size": "3"}],
    "timestamp": "1000",
    "hash": "x",
}


async def test_crossed_book_is_repaired_and_counted() -> None:
    router = _router()
    router.apply(_frame(**BOOK))
    with structlog.testing.capture_logs() as logs:
        router.apply(_change(1001, "0.52", "4", "BUY"))  # a bid above the best ask
        book = router.books["a"]
        assert (book.best_bid, book.best_ask) == (D("0.52"), D("0.55"))
        assert D("0.50") not in book.asks.levels  # the contradicted ask is gone
        router.apply(_change(1002, "0.44", "4", "SELL"))  # again: counted, not logged
    assert (book.best_bid, book.best_ask) == (D("0.40"), D("0.44"))
    assert router.markets.stats.parse_errors["crossed_book"] == 2
    assert [entry["kind"] for entry in logs if entry["event"] == "feed_bad_event"] == [
        "crossed_book"
    ]


async def test_router_drains_and_ends_when_the_feed_closes_with_frames_queued() -> None:
    """Frames queued behind the one being applied when the sender closes: all
    applied, and the router ends cleanly (it once raised EndOfChannel at shutdown)."""
    router = _router()
    send, receive = trio.open_memory_channel[list[Any]](8)
    send.send_nowait(_frame(**BOOK))
    send.send_nowait(_change(1001, "0.46", "4", "BUY"))
    send.send_nowait(_change(1002, "0.49", "2", "SELL"))
    send.close()
    await router.run(receive)
    book = router.books["a"]
    assert (book.best_bid, book.best_ask) == (D("0.46"), D("0.49"))


async def test_events_older_than_the_book_are_skipped() -> None:
    router = _router()
    router.apply(_frame(**BOOK))
    router.apply(_change(999, "0.46", "9", "BUY"))  # older than the snapshot
    router.apply(
        _frame(
            event_type="last_trade_price",
            asset_id="a",
            market="m",
            price="0.47",
            size="1",
            side="BUY",
            timestamp="2000",
        )
    )
    router.apply(
        _frame(
            event_type="last_trade_price",
            asset_id="a",
            market="m",
            price="0.41",
            size="1",
            side="SELL",
            timestamp="1500",
        )  # older than the last trade
    )
    book = router.books["a"]
    assert book.best_bid == D("0.45")
    assert book.last_trade_price == D("0.47")
    assert router.markets.stats.parse_errors["stale_event"] == 2


def _tick(old: str, new: str, ts: int = 1100) -> list[Any]:
    return _frame(
        event_type="tick_size_change",
        asset_id="a",
        market="m",
        old_tick_size=old,
        new_tick_size=new,
        timestamp=str(ts),
    )


async def test_noop_tick_size_change_keeps_book_and_quote() -> None:
    # NautilusTrader test tick_size_change_noop_preserves_book_and_quote.
    requests: list[tuple[str, str]] = []
    router = _router()
    router.resync = lambda asset, reason: requests.append((asset, reason))
    router.apply(_frame(**BOOK))
    before = router.books["a"].top()
    router.apply(_tick("0.01", "0.01"))
    book = router.books["a"]
    assert book.top() == attrs.evolve(before, tick_size=D("0.01"))  # learnt, nothing else
    assert (len(book.bids.levels), len(book.asks.levels)) == (2, 2)
    assert not book.resyncing and requests == []


async def test_real_tick_size_change_keeps_quoting_and_asks_for_a_rest_book() -> None:
    requests: list[tuple[str, str]] = []
    router = _router()
    router.resync = lambda asset, reason: requests.append((asset, reason))
    router.apply(_frame(**BOOK))
    router.apply(_tick("0.01", "0.001"))
    book = router.books["a"]
    assert requests == [("a", "tick_size_change")]
    assert book.resyncing and book.tick_size == D("0.001")
    assert (book.best_bid, book.best_ask) == (D("0.45"), D("0.50"))  # not wiped
    # The venue keeps sending price changes with its own top: they are the quote.
    router.apply(
        _frame(
            event_type="price_change",
            market="m",
            timestamp="1101",
            price_changes=[
                {
                    "asset_id": "a",
                    "price": "0.451",
                    "size": "2",
                    "side": "BUY",
                    "hash": "h",
                    "best_bid": "0.451",
                    "best_ask": "0.5",
                }
            ],
        )
    )
    assert (book.best_bid, book.best_ask) == (D("0.451"), D("0.5"))
    assert router.markets.stats.parse_errors == {}
    # The REST copy (older than that change) replaces the levels; the buffered
    # change newer than it is applied again on top.
    rest = _frame(**dict(BOOK, timestamp="1100", bids=[{"price": "0.44", "size": "1"}]))[0]
    router.apply_rest_book(rest)
    assert not book.resyncing
    assert sorted(book.bids.levels) == [D("0.44"), D("0.451")]
    assert (book.best_bid, book.best_ask) == (D("0.451"), D("0.5"))


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_binary_and_oversized_frames(nursery: trio.Nursery, transport: str) -> None:
    recorder = RecordingServer(transport=transport)

    async def handler(request: WebSocketRequest) -> None:
        await recorder.handler(request)

    listener = await nursery.start(serve_websocket, handler, "127.0.0.1", 0, None)
    recorder.port = listener.port
    pool, _events, stats = _pool(recorder, max_message_size=2**20)
    await nursery.start(pool.run)
    with trio.fail_after(10):
        pool.set_assets({"1"})
        await recorder.wait_for(lambda: bool(recorder.peers) and recorder.peers[0].received)
        peer = recorder.peers[0]
        assert peer.outbox is not None
        await peer.outbox.send(b"\x00\x01binary")  # type: ignore[arg-type]
        await peer.outbox.send("x" * (2**20 + 10))  # over max_message_size: closed with 1009
        await recorder.wait_for(lambda: len(recorder.peers) == 2 and recorder.peers[1].received)
    assert stats.parse_errors["binary_frame"] == 1
    assert stats.parse_errors["frame_too_large"] == 1
    assert stats.shards[0].reconnects == 1
