"""
Top of book per asset, from ``book`` snapshots and ``price_change`` entries.

Level order is not trusted (REST books list bids ascending and asks
descending, documentation examples differ: ../shared/protocol.md, section 6):
the best bid is the highest bid price with size > 0, the best ask the lowest
ask price. An empty side has no best price (the wire says ``"0"``/``"1"`` or
``""`` there).

The display price is Polymarket's: the midpoint when both sides exist and the
spread is at most 0.10, otherwise the last trade price; the midpoint when
nothing has traded yet (protocol.md, section 8, "Displayed-price rule";
../shared/data/replay/README.md).
"""

from __future__ import annotations

from decimal import Decimal

import attrs

from polystream.protocol import (
    BestBidAsk,
    BookSnapshot,
    FeedEvent,
    LastTradePrice,
    LevelChange,
    PriceChange,
    TickSizeChange,
)

__all__ = ["DISPLAY_SPREAD_LIMIT", "AssetBook", "TopOfBook", "display_price"]

DISPLAY_SPREAD_LIMIT = Decimal("0.10")
_TWO = Decimal(2)


def display_price(
    best_bid: Decimal | None, best_ask: Decimal | None, last_trade: Decimal | None
) -> Decimal | None:
    """
    Polymarket's displayed price, a probability in [0, 1], or None if unknown.

    Midpoint when both sides exist and ``ask - bid <= 0.10`` (or nothing has
    traded yet); otherwise the last trade price.
    """
    if (
        best_bid is not None
        and best_ask is not None
        and (best_ask - best_bid <= DISPLAY_SPREAD_LIMIT or last_trade is None)
    ):
        return (best_bid + best_ask) / _TWO
    return last_trade


@attrs.frozen(slots=True)
class TopOfBook:
    """
    What is known of one asset's market: prices are probabilities in [0, 1].

    ``best_bid``/``best_ask`` are None for an empty or unknown side;
    ``has_book`` says whether any book information (snapshot or level change)
    has been seen, so that a trades-only asset does not erase stored quotes.
    """

    asset_id: str
    best_bid: Decimal | None
    best_ask: Decimal | None
    last_trade_price: Decimal | None
    tick_size: Decimal | None
    has_book: bool
    timestamp_ms: int

    @property
    def midpoint(self) -> Decimal | None:
        """``(best_bid + best_ask) / 2``, or None when a side is empty."""
        if self.best_bid is None or self.best_ask is None:
            return None
        return (self.best_bid + self.best_ask) / _TWO

    @property
    def spread(self) -> Decimal | None:
        """``best_ask - best_bid``, or None when a side is empty."""
        if self.best_bid is None or self.best_ask is None:
            return None
        return self.best_ask - self.best_bid

    @property
    def display(self) -> Decimal | None:
        """The displayed price (see :func:`display_price`)."""
        return display_price(self.best_bid, self.best_ask, self.last_trade_price)


class _Side:
    """Aggregated levels of one side: price -> size (shares), best cached."""

    __slots__ = ("_best", "_higher_is_better", "levels")

    def __init__(self, higher_is_better: bool) -> None:
        self.levels: dict[Decimal, Decimal] = {}
        self._higher_is_better = higher_is_better
        self._best: Decimal | None = None

    def replace(self, levels: dict[Decimal, Decimal]) -> None:
        self.levels = levels
        self._recompute()

    def set(self, price: Decimal, size: Decimal) -> None:
        if size > 0:
            self.levels[price] = size
            best = self._best
            if best is None or (price > best if self._higher_is_better else price < best):
                self._best = price
        elif self.levels.pop(price, None) is not None and price == self._best:
            self._recompute()

    def drop_through(self, price: Decimal) -> None:
        """Remove every level at ``price`` or better (a crossed book's stale levels)."""
        if self._higher_is_better:
            gone = [p for p in self.levels if p >= price]
        else:
            gone = [p for p in self.levels if p <= price]
        for level in gone:
            del self.levels[level]
        self._recompute()

    def _recompute(self) -> None:
        if not self.levels:
            self._best = None
        elif self._higher_is_better:
            self._best = max(self.levels)
        else:
            self._best = min(self.levels)

    @property
    def best(self) -> Decimal | None:
        return self._best


class AssetBook:
    """
    The L2 book of one asset, kept from the feed.

    Not thread-safe; owned by the router task. Each ``apply*`` returns None,
    or the kind of bad input it refused or repaired (counted by the router):

    * ``stale_event``: older (``timestamp``) than what this book already holds;
    * ``crossed_book``: a change put a bid at or above the best ask (or the
      reverse): the newer change wins and the contradicted levels of the other
      side, which must have gone while we were not told, are removed;
    * ``book_invalid``: a level change arrived after a ``tick_size_change``
      and before the next snapshot: levels on the old tick are not trusted,
      so the book stays empty until a ``book`` snapshot replaces it.
    """

    __slots__ = (
        "asks",
        "asset_id",
        "bids",
        "book_ts",
        "has_book",
        "invalid",
        "last_trade_price",
        "source",
        "tick_size",
        "trade_ts",
        "ts",
    )

    def __init__(self, asset_id: str) -> None:
        self.asset_id = asset_id
        self.bids = _Side(higher_is_better=True)
        self.asks = _Side(higher_is_better=False)
        self.last_trade_price: Decimal | None = None
        self.tick_size: Decimal | None = None
        self.has_book = False
        self.invalid = False
        self.ts = 0
        self.book_ts = 0
        self.trade_ts = 0
        self.source = "ws"

    def apply_snapshot(self, book: BookSnapshot) -> str | None:
        """Replace both sides with the snapshot's levels (size 0 levels dropped)."""
        if book.timestamp_ms and book.timestamp_ms < self.book_ts:
            return "stale_event"
        self.bids.replace({level.price: level.size for level in book.bids if level.size > 0})
        self.asks.replace({level.price: level.size for level in book.asks if level.size > 0})
        if book.tick_size is not None:
            self.tick_size = book.tick_size
        if book.last_trade_price is not None:
            self.last_trade_price = book.last_trade_price
        self.has_book = True
        self.invalid = False
        self.source = "ws"
        self.book_ts = max(self.book_ts, book.timestamp_ms)
        self.ts = max(self.ts, book.timestamp_ms)
        return None

    def apply_change(self, change: LevelChange, timestamp_ms: int) -> str | None:
        """Set (or with size 0 remove) one level."""
        if timestamp_ms and timestamp_ms < self.book_ts:
            return "stale_event"
        if self.invalid:
            return "book_invalid"
        problem = None
        if change.side == "BUY":
            side, other = self.bids, self.asks
            if change.size > 0 and other.best is not None and change.price >= other.best:
                other.drop_through(change.price)
                problem = "crossed_book"
        else:
            side, other = self.asks, self.bids
            if change.size > 0 and other.best is not None and change.price <= other.best:
                other.drop_through(change.price)
                problem = "crossed_book"
        side.set(change.price, change.size)
        self.has_book = True
        self.source = "ws"
        self.book_ts = max(self.book_ts, timestamp_ms)
        self.ts = max(self.ts, timestamp_ms)
        return problem

    def apply(self, event: FeedEvent) -> str | None:
        """Apply an event of this asset (a ``PriceChange`` applies only its entries for it)."""
        if isinstance(event, BookSnapshot):
            return self.apply_snapshot(event)
        if isinstance(event, PriceChange):
            problem = None
            for change in event.changes:
                if change.asset_id == self.asset_id:
                    problem = self.apply_change(change, event.timestamp_ms) or problem
            return problem
        if isinstance(event, LastTradePrice):
            if event.timestamp_ms and event.timestamp_ms < self.trade_ts:
                return "stale_event"
            self.last_trade_price = event.price
            self.trade_ts = max(self.trade_ts, event.timestamp_ms)
            self.ts = max(self.ts, event.timestamp_ms)
        elif isinstance(event, TickSizeChange):
            self.tick_size = event.new_tick_size
            self.ts = max(self.ts, event.timestamp_ms)
            # Levels on the old tick are not trusted until the next snapshot.
            self.bids.replace({})
            self.asks.replace({})
            self.has_book = False
            self.invalid = True
        elif isinstance(event, BestBidAsk) and not self.has_book and not self.invalid:
            # Only when no book is kept: the book itself is the better source.
            self.bids.replace({} if event.best_bid is None else {event.best_bid: Decimal(1)})
            self.asks.replace({} if event.best_ask is None else {event.best_ask: Decimal(1)})
        return None

    def apply_quote(self, best_bid: Decimal | None, best_ask: Decimal | None) -> None:
        """
        A polled top of book (HTTP fallback) replaces both sides, one level
        each of unknown size; the next ``book`` snapshot replaces it in turn.
        """
        self.bids.replace({} if best_bid is None else {best_bid: Decimal(1)})
        self.asks.replace({} if best_ask is None else {best_ask: Decimal(1)})
        self.has_book = True
        self.invalid = False
        self.source = "poll"

    @property
    def best_bid(self) -> Decimal | None:
        """Highest bid price with size > 0, or None."""
        return self.bids.best

    @property
    def best_ask(self) -> Decimal | None:
        """Lowest ask price with size > 0, or None."""
        return self.asks.best

    def top(self) -> TopOfBook:
        """A frozen copy of the top of book."""
        return TopOfBook(
            asset_id=self.asset_id,
            best_bid=self.bids.best,
            best_ask=self.asks.best,
            last_trade_price=self.last_trade_price,
            tick_size=self.tick_size,
            has_book=self.has_book,
            timestamp_ms=self.ts,
        )
