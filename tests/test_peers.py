"""
The venue's real behaviour (docs/protocol.md, "What the venue really does",
"Book hash", "Empty sides") on other clients' published test material: the
same inputs as NautilusTrader, rs-clob-client and py-clob-client-v2 use in
their own tests, and the same expected values, unless said otherwise. The
fixtures and the peers' assertions are listed in tests/data/peers/README.md.
"""

from __future__ import annotations

import copy
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest

from polystream.book import Books
from polystream.feed.pool import FeedPool, Shard
from polystream.feed.protocol import (
    BookSnapshot,
    FrameParser,
    LastTradePrice,
    PriceChange,
    TickSizeChange,
    book_hash,
    parse_frame,
)
from polystream.stats import ShardStats

D = Decimal
DATA = Path(__file__).parent / "data"
NAUTILUS = DATA / "peers" / "nautechsystems__nautilus_trader"
NAUTILUS_REAL = DATA / "real" / "nautilus_trader" / "rust_test_data"
RS_CLOB = DATA / "peers" / "Polymarket__rs-clob-client"
PY_CLOB_V2 = DATA / "peers" / "Polymarket__py-clob-client-v2"


def _load(path: Path) -> Any:
    return orjson.loads(path.read_bytes())


# ------------------------------------------------------------------ book hash


def test_captured_snapshot_hash_verifies() -> None:
    # nautilus test_book_snapshot_hash_matches_captured_snapshot
    raw = _load(NAUTILUS / "ws_book_snapshot_captured.json")
    assert "min_order_size" not in raw and "neg_risk" not in raw
    assert book_hash(raw) == "ed47eb91f3c7985fac1cb18cb7c19535eddd3c0a"
    (book,) = parse_frame(orjson.dumps(raw)).events
    assert isinstance(book, BookSnapshot) and book.integrity == "verified"


def test_changed_level_is_a_mismatch() -> None:
    # nautilus test_book_snapshot_hash_rejects_mismatch
    raw = _load(NAUTILUS / "ws_book_snapshot_captured.json")
    raw["bids"][0]["size"] = "3149725.71"
    assert book_hash(raw) == "6402b534c270a1ce46a75c62f1d7e3651182cc75"
    (book,) = parse_frame(orjson.dumps(raw)).events
    assert isinstance(book, BookSnapshot) and book.integrity == "mismatched"
    assert book.bids[0].size == D("3149725.71")  # a mismatch drops nothing


def test_incomplete_preimage_is_unverifiable() -> None:
    # nautilus test_book_snapshot_hash_allows_incomplete_preimage
    raw = _load(NAUTILUS / "ws_book_snapshot_captured.json")
    del raw["tick_size"], raw["last_trade_price"]
    assert book_hash(raw) is None
    (book,) = parse_frame(orjson.dumps(raw)).events
    assert isinstance(book, BookSnapshot) and book.integrity == "unverifiable"


def test_missing_hash_is_unverifiable() -> None:
    # nautilus test_book_snapshot_hash_allows_missing_hash (a book shape without event_type)
    (book,) = parse_frame((NAUTILUS / "ws_book_snapshot_missing_hash.json").read_bytes()).events
    assert isinstance(book, BookSnapshot)
    assert (book.integrity, len(book.bids), len(book.asks)) == ("unverifiable", 0, 0)


def test_py_clob_client_v2_hash() -> None:
    # py-clob-client-v2 test of generate_orderbook_summary_hash: its own min_order_size "100"
    raw = _load(PY_CLOB_V2 / "test_generate_orderbook_summary_hash.json")
    assert book_hash(raw) == "0458ea5755c9f73d64a14636fa5c36ed460ec394"


def test_rest_book_with_an_empty_ask_side() -> None:
    # nautilus clob_book_response_empty_ask.json: a REST book (own min_order_size, neg_risk
    # true) whose hash reproduces; a resync from it gives a best bid and no best ask.
    book = FrameParser().book(_load(NAUTILUS / "clob_book_response_empty_ask.json"))
    assert book.integrity == "verified"
    assert (book.tick_size, book.last_trade_price, len(book.asks)) == (D("0.001"), None, 0)
    books = Books()
    books.book(book.asset_id).begin_resync()
    assert books[book.asset_id].apply_rest_book(book) is None
    top = books[book.asset_id].top()
    assert (top.best_bid, top.best_ask, top.midpoint) == (D("0.002"), None, None)


# ------------------------------------------------------------------ frames


def test_mixed_known_and_unknown_event_types() -> None:
    # nautilus ws_market_mixed_known_unknown.json: 2 of 3 events survive
    parsed = parse_frame((NAUTILUS / "ws_market_mixed_known_unknown.json").read_bytes())
    assert parsed.problems == [] and parsed.ignored == ["settlement_preview"]
    change, trade = parsed.events
    assert isinstance(change, PriceChange) and change.timestamp_ms == 1700000000001
    (entry,) = change.changes
    assert (entry.asset_id, entry.price, entry.side, entry.size) == (
        "101",
        D("0.37"),
        "BUY",
        D("12.5"),
    )
    assert (entry.best_bid, entry.best_ask) == (D("0.36"), D("0.38"))
    assert isinstance(trade, LastTradePrice)
    assert (trade.asset_id, trade.price, trade.side, trade.size) == (
        "202",
        D("0.63"),
        "SELL",
        D("4.25"),
    )
    assert trade.timestamp_ms == 1700000000003
    # The frame confirms the subscription of 202 (a trade), not of 101 (a price change).
    shard = Shard(0, ShardStats(0), assets={"101", "202"})
    FeedPool._covered(parsed.events, shard)
    assert shard.stats.seen_assets == {"202"}


def test_batch_price_change_entry_without_size() -> None:
    # rs-clob-client parses_batch_price_changes: entry 1 has no size, hash or tops. It is
    # counted and skipped (a level change without a size cannot be applied); entry 0 is kept.
    parsed = parse_frame((RS_CLOB / "parses_batch_price_changes.json").read_bytes())
    (event,) = parsed.events
    assert isinstance(event, PriceChange)
    (entry,) = event.changes
    assert (entry.asset_id[:3], entry.price, entry.size, entry.side) == (
        "713",
        D("0.5"),
        D("200"),
        "BUY",
    )
    assert (entry.best_bid, entry.best_ask) == (D("0.5"), None)  # best_ask "1": no ask
    assert [(p.kind, "price_changes[1]" in p.detail) for p in parsed.problems] == [
        ("missing_field", True)
    ]


def test_objects_without_event_type() -> None:
    # nautilus ws_tick_size_change.json: unambiguous, parsed (its test's values)
    (tick,) = parse_frame((NAUTILUS_REAL / "ws_tick_size_change.json").read_bytes()).events
    assert isinstance(tick, TickSizeChange)
    assert (tick.new_tick_size, tick.old_tick_size, tick.timestamp_ms) == (
        D("0.01"),
        D("0.1"),
        1703875210000,
    )
    # nautilus ws_last_trade.json: a last trade or a legacy one-level price change; counted
    parsed = parse_frame((NAUTILUS / "ws_last_trade.json").read_bytes())
    assert parsed.events == [] and [p.kind for p in parsed.problems] == ["ambiguous_event"]


@pytest.mark.parametrize(
    ("entry", "bid", "ask"),
    [
        # nautilus parse.rs tests on ws_quotes.json entry 0 (BUY 0.51 size 150)
        ({"best_bid": "0.51", "best_ask": "1"}, D("0.51"), None),
        # SELL 0.52 size 75 with best_bid "0": no bid
        (
            {"side": "SELL", "price": "0.52", "size": "75", "best_bid": "0", "best_ask": "0.52"},
            None,
            D("0.52"),
        ),
        # test_parse_to_quote_ticks_skips_invalid_tops: SELL 0.50 with best_bid "0"
        (
            {"side": "SELL", "price": "0.50", "size": "10", "best_bid": "0", "best_ask": "0.60"},
            None,
            D("0.60"),
        ),
    ],
)
def test_invalid_tops_are_empty_sides(
    entry: dict[str, str], bid: Decimal | None, ask: Decimal | None
) -> None:
    quotes = _load(NAUTILUS_REAL / "ws_quotes.json")
    quotes["price_changes"] = [{**quotes["price_changes"][0], **entry}]
    quotes["event_type"] = "price_change"
    books = Books()
    books.apply(parse_frame(orjson.dumps(quotes)).events)
    top = books[quotes["price_changes"][0]["asset_id"]].top()
    assert (top.best_bid, top.best_ask) == (bid, ask)
    assert top.midpoint is None  # a price of 0 or 1 is never a quote


def test_noop_tick_size_change_preserves_book_and_quote() -> None:
    # nautilus tick_size_change_noop_preserves_book_and_quote: tick 0.01, the same snapshot
    # levels, a change from 0.01 to 0.01: the book and the quote stay, nothing pending.
    snapshot = {
        "event_type": "book",
        "asset_id": "0xASSET",
        "market": "0xMARKET",
        "bids": [{"price": "0.50", "size": "10"}, {"price": "0.54", "size": "5"}],
        "asks": [{"price": "0.56", "size": "8"}, {"price": "0.59", "size": "12"}],
        "timestamp": "1700000000000",
        "tick_size": "0.01",
    }
    change = {
        "event_type": "tick_size_change",
        "asset_id": "0xASSET",
        "market": "0xMARKET",
        "old_tick_size": "0.01",
        "new_tick_size": "0.01",
        "timestamp": "1700000001000",
    }
    books = Books()
    books.apply(parse_frame(orjson.dumps(snapshot)).events)
    book = books["0xASSET"]
    before = (book.top(), dict(book.bids.levels), dict(book.asks.levels), book.timestamp_ms)
    applied = books.apply(parse_frame(orjson.dumps(change)).events)
    assert applied.resync == [] and not applied.moved and not book.resyncing
    assert (book.top(), dict(book.bids.levels), dict(book.asks.levels), book.timestamp_ms) == before


def test_trade_through_burst_quotes_the_venue() -> None:
    """
    nautilus ws_market_price_change_crossing_burst.json (a real recording): no nautilus
    assertion on it was found, so the expectation is the data's own: after every entry
    of the book's token, the top of book is the venue's best bid/ask of that entry
    (even where the local levels are briefly crossed, entries 47 and 48), nothing
    counts as bad input, and the levels end equal to the recording's final book.
    """
    events = _load(NAUTILUS / "ws_market_price_change_crossing_burst.json")
    token = events[0]["asset_id"]
    books = Books()
    for event in events[:-1]:
        for parsed in parse_frame(orjson.dumps(event)).events:
            applied = books.apply([parsed])
            assert applied.problems == []
            if isinstance(parsed, PriceChange):
                for entry in parsed.changes:
                    if entry.asset_id == token:
                        top = books[token].top()
                        assert (top.best_bid, top.best_ask) == (entry.best_bid, entry.best_ask)
    (final,) = parse_frame(orjson.dumps(events[-1])).events
    assert isinstance(final, BookSnapshot)
    book = books[token]
    assert book.bids.levels == {lv.price: lv.size for lv in final.bids}
    assert book.asks.levels == {lv.price: lv.size for lv in final.asks}
    # ... and that final book hashes right with the tick and the price just traded at.
    raw = copy.deepcopy(events[-1])
    raw.update(tick_size="0.001", last_trade_price="0.301")
    assert book_hash(raw) == raw["hash"] == "78b396c8a7f4989f638fe6cf9b2e8ced15680ba7"
