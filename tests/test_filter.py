"""feed.filter_events: only the shard's own assets get through (docs/protocol.md, "Server messages")."""

from __future__ import annotations

from decimal import Decimal

from polystream.feed.pool import filter_events
from polystream.feed.protocol import (
    BestBidAsk,
    BookSnapshot,
    FeedEvent,
    LastTradePrice,
    LevelChange,
    MarketResolved,
    NewMarket,
    PriceChange,
    TickSizeChange,
    parse_frame,
)

MINE = {"111", "222"}


def _change(asset: str, price: str = "0.5") -> LevelChange:
    return LevelChange(asset, Decimal(price), Decimal("10"), "BUY", Decimal(price), None)


def _book(asset: str) -> BookSnapshot:
    return BookSnapshot(asset, "0xm", (), (), 1, "h")


def test_drops_foreign_asset_events() -> None:
    events: list[FeedEvent] = [
        _book("111"),
        _book("999"),
        LastTradePrice("222", "0xm", Decimal("0.5"), Decimal("1"), "SELL", 2),
        LastTradePrice("999", "0xm", Decimal("0.5"), Decimal("1"), "SELL", 2),
        TickSizeChange("999", "0xm", Decimal("0.01"), Decimal("0.001"), 3),
        BestBidAsk("999", "0xm", Decimal("0.4"), Decimal("0.6"), 4),
        BestBidAsk("111", "0xm", Decimal("0.4"), Decimal("0.6"), 4),
    ]
    kept, dropped = filter_events(events, MINE)
    assert kept == [events[0], events[2], events[6]]
    assert dropped == 4


def test_price_change_keeps_only_own_entries() -> None:
    event = PriceChange("0xm", 5, (_change("111"), _change("999", "0.4"), _change("222", "0.6")))
    kept, dropped = filter_events([event], MINE)
    assert dropped == 1
    assert kept == [PriceChange("0xm", 5, (_change("111"), _change("222", "0.6")))]


def test_price_change_all_own_is_kept_as_is() -> None:
    event = PriceChange("0xm", 5, (_change("111"), _change("222")))
    kept, dropped = filter_events([event], MINE)
    assert dropped == 0
    assert kept[0] is event


def test_price_change_all_foreign_is_dropped() -> None:
    event = PriceChange("0xm", 5, (_change("998"), _change("999")))
    kept, dropped = filter_events([event], MINE)
    assert kept == []
    assert dropped == 2


def test_venue_wide_events_are_kept() -> None:
    new = NewMarket("1", "0xnew", "Q?", "q", ("777", "778"), ("Yes", "No"), 6)
    resolved = MarketResolved("1", "0xnew", ("777", "778"), "777", "Yes", 7)
    kept, dropped = filter_events([new, resolved, _book("999")], MINE)
    assert kept == [new, resolved]
    assert dropped == 1


def test_empty_subscription_keeps_only_venue_wide() -> None:
    new = NewMarket("1", "0xnew", "Q?", "q", ("777",), ("Yes",), 6)
    kept, dropped = filter_events([_book("111"), new], set())
    assert kept == [new]
    assert dropped == 1


def test_on_a_parsed_real_shape_frame() -> None:
    frame = (
        b'[{"event_type":"price_change","market":"0xm","timestamp":"1757908892351",'
        b'"price_changes":[{"asset_id":"111","price":"0.5","size":"200","side":"BUY",'
        b'"hash":"a","best_bid":"0.5","best_ask":"1"},{"asset_id":"555","price":"0.5",'
        b'"size":"200","side":"SELL","hash":"b","best_bid":"0","best_ask":"0.5"}]},'
        b'{"event_type":"last_trade_price","asset_id":"555","market":"0xm","price":"0.5",'
        b'"size":"1","side":"BUY","timestamp":"1757908892352"}]'
    )
    kept, dropped = filter_events(parse_frame(frame).events, {"111"})
    assert dropped == 2
    (event,) = kept
    assert isinstance(event, PriceChange)
    assert event.timestamp_ms == 1757908892351
    # best_ask "1" spells an empty ask side (docs/protocol.md, "What the venue really does"): no ask, never a quote of 1.
    assert [(c.asset_id, c.side, c.best_ask, c.has_top) for c in event.changes] == [
        ("111", "BUY", None, True)
    ]
