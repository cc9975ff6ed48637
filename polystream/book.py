"""
Top of book per asset, from ``book`` snapshots and ``price_change`` entries.

Level order is not trusted (REST books list bids ascending and asks
descending, documentation examples differ: docs/protocol.md, "Server messages"):
the best bid is the highest bid price with size > 0, the best ask the lowest
ask price. An empty side has no best price (the wire says ``"0"``/``"1"`` or
``""`` there).

The display price is Polymarket's: the midpoint when both sides exist and the
spread is at most 0.10, otherwise the last trade price; the midpoint when
nothing has traded yet (docs/protocol.md, "Displayed price"; the replay
captures' ``expected.json`` use the same rule).
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections import deque
from collections.abc import Iterable, Sequence
from decimal import Decimal
from typing import Literal

import attrs

from polystream.config import PriceChoice
from polystream.feed.protocol import (
    BestBidAsk,
    BookSnapshot,
    FeedEvent,
    LastTradePrice,
    LevelChange,
    Levels,
    PriceChange,
    TickSizeChange,
)
from polystream.numbers import ask_or_none, bid_or_none

__all__ = [
    "DISPLAY_SPREAD_LIMIT",
    "RESYNC_BUFFER",
    "Applied",
    "AssetBook",
    "BookProblem",
    "Books",
    "TopOfBook",
    "choose_price",
    "display_price",
]

DISPLAY_SPREAD_LIMIT = Decimal("0.10")
_ZERO = Decimal(0)
_ONE = Decimal(1)
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
    """
    Aggregated levels of one side: prices ascending and their sizes (shares),
    in two parallel tuples; the best is the last price (bids) or the first (asks).

    Two tuples of pointers, not a dict: 16 bytes a level instead of 37 (a
    dict's hash, key and value slots and its spare room) and no spare room.
    Tuples, not lists: a tuple of ``Decimal`` (which holds no references) is
    untracked by the cyclic collector after its first pass, so a full pass
    does not visit every level of every book (10,000 books of 100 levels a
    side were 4 million visits, 50 to 110 ms of loop stall each pass). A
    change replaces a tuple (about 1 µs at 100 levels, beside 0.3 µs for a
    list in place). The price and size objects are the parser's, shared
    (:class:`polystream.feed.protocol.FrameParser` memoizes them).
    """

    __slots__ = ("_higher_is_better", "_prices", "_sizes")

    def __init__(self, higher_is_better: bool) -> None:
        self._higher_is_better = higher_is_better
        self._prices: tuple[Decimal, ...] = ()
        self._sizes: tuple[Decimal, ...] = ()

    @property
    def levels(self) -> dict[Decimal, Decimal]:
        """The levels, ``{price: size}`` (a copy, prices ascending)."""
        return dict(zip(self._prices, self._sizes, strict=True))

    def replace(self, levels: dict[Decimal, Decimal]) -> None:
        """Hold exactly ``levels``, ``{price: size}`` (sizes > 0)."""
        prices = sorted(levels)
        self._prices = tuple(prices)
        self._sizes = tuple(map(levels.__getitem__, prices))

    def assign(self, prices: Sequence[Decimal], sizes: Sequence[Decimal]) -> None:
        """
        Hold the levels of a snapshot, ``prices[i]`` and ``sizes[i]`` in the
        order received (a repeated price: the last wins); levels of size 0,
        and bids at 0 or asks at 1 (never quotes), are dropped.

        C-level passes only (a dict, a sort that is linear on the venue's
        sorted sides, a ``min``): no Python step per level on the common path.
        """
        levels = dict(zip(prices, sizes, strict=True))
        if levels and min(levels.values()) <= _ZERO:
            levels = {p: s for p, s in levels.items() if s > _ZERO}
        ordered = sorted(levels)
        if ordered:
            if self._higher_is_better and ordered[0] <= _ZERO:
                ordered = [p for p in ordered if p > _ZERO]
            elif not self._higher_is_better and ordered[-1] >= _ONE:
                ordered = [p for p in ordered if p < _ONE]
        self._prices = tuple(ordered)
        self._sizes = tuple(map(levels.__getitem__, ordered))

    def set(self, price: Decimal, size: Decimal) -> None:
        """Set the level at ``price`` to ``size`` shares; size 0 removes it."""
        prices, sizes = self._prices, self._sizes
        index = bisect_left(prices, price)
        found = index < len(prices) and prices[index] == price
        if size > 0:
            if found:
                self._sizes = (*sizes[:index], size, *sizes[index + 1 :])
            else:
                self._prices = (*prices[:index], price, *prices[index:])
                self._sizes = (*sizes[:index], size, *sizes[index:])
        elif found:
            self._prices = prices[:index] + prices[index + 1 :]
            self._sizes = sizes[:index] + sizes[index + 1 :]

    def drop_through(self, price: Decimal) -> None:
        """Remove every level at ``price`` or better (a crossed book's stale levels)."""
        if self._higher_is_better:
            index = bisect_left(self._prices, price)
            self._prices, self._sizes = self._prices[:index], self._sizes[:index]
        else:
            index = bisect_right(self._prices, price)
            self._prices, self._sizes = self._prices[index:], self._sizes[index:]

    @property
    def best(self) -> Decimal | None:
        """The best price (highest bid, lowest ask), or None for an empty side."""
        prices = self._prices
        if not prices:
            return None
        return prices[-1] if self._higher_is_better else prices[0]


BookProblem = Literal["stale_event", "crossed_book", "superseded"]
"""
What an ``AssetBook.apply*`` refused (``stale_event``) or repaired
(``crossed_book``), both bad input; or skipped as already held by a REST copy
of the book (``superseded``: a change still in flight when the REST book was
taken; normal, not counted).
"""

RESYNC_BUFFER = 10_000
"""Level changes kept per asset while its book waits for a REST copy."""


class AssetBook:
    """
    The L2 book of one asset, kept from the feed.

    Not thread-safe; owned by the router task. Timestamps are the venue's,
    Unix milliseconds. Each ``apply*`` returns None, or the kind of bad input
    it refused or repaired (counted by the router):

    * ``stale_event``: older than what this book already holds;
    * ``crossed_book``: a change without the venue's top put a bid at or above
      the best ask (or the reverse): the newer change wins and the contradicted
      levels of the other side, which must have gone while we were not told,
      are removed. The same repair after a change that carries the venue's top
      is a trade-through burst (section 11) and is not counted.

    **Top of book.** A ``price_change`` entry carries the venue's own best
    bid and ask after it (``LevelChange.has_top``): those are the truth
    (they stay right through a trade-through burst, when the venue removes
    the traded levels only in later frames, and through a tick size change),
    until a snapshot or a REST book replaces the levels. Without them, the
    top is computed from the levels. A price of 0 (bid) or 1 (ask) is never a
    quote: such levels are not kept (docs/protocol.md, "Empty sides").

    **Resync.** A real ``tick_size_change`` (old != new) is not followed by
    a fresh ``book`` (section 11), and a snapshot whose hash does not match
    its levels is not trusted: :meth:`begin_resync` marks the book as
    waiting for a REST copy (``GET /book`` / ``POST /books``). Meanwhile level
    changes are applied and buffered (at most :data:`RESYNC_BUFFER`), and
    :meth:`apply_rest_book` replaces the levels with the REST book and
    re-applies the buffered changes not older than it. A verified snapshot
    ends the wait too.
    """

    __slots__ = (
        "asks",
        "asset_id",
        "bids",
        "book_timestamp_ms",
        "has_book",
        "last_trade_price",
        "rest_timestamp_ms",
        "resync_buffer",
        "source",
        "tick_size",
        "timestamp_ms",
        "trade_timestamp_ms",
        "venue_ask",
        "venue_bid",
        "venue_top",
    )

    def __init__(self, asset_id: str) -> None:
        self.asset_id = asset_id
        self.bids = _Side(higher_is_better=True)
        self.asks = _Side(higher_is_better=False)
        self.last_trade_price: Decimal | None = None
        self.tick_size: Decimal | None = None
        self.has_book = False
        self.venue_top = False
        self.venue_bid: Decimal | None = None
        self.venue_ask: Decimal | None = None
        self.resync_buffer: deque[tuple[int, LevelChange]] | None = None
        self.timestamp_ms = 0
        self.book_timestamp_ms = 0
        self.trade_timestamp_ms = 0
        self.rest_timestamp_ms = 0
        self.source = "ws"

    @property
    def resyncing(self) -> bool:
        """True while the book waits for a REST copy (see :meth:`begin_resync`)."""
        return self.resync_buffer is not None

    def begin_resync(self) -> None:
        """Start buffering level changes until :meth:`apply_rest_book` (no-op if already)."""
        if self.resync_buffer is None:
            self.resync_buffer = deque(maxlen=RESYNC_BUFFER)

    def _replace_levels(self, bids: Levels, asks: Levels) -> None:
        self.bids.assign(bids.prices, bids.sizes)
        self.asks.assign(asks.prices, asks.sizes)
        self.venue_top = False
        self.has_book = True
        self.source = "ws"

    def apply_snapshot(self, book: BookSnapshot) -> BookProblem | None:
        """Replace both sides with the snapshot's levels (size 0 levels dropped)."""
        if book.timestamp_ms and book.timestamp_ms < self.book_timestamp_ms:
            return "stale_event"
        self._replace_levels(book.bids, book.asks)
        if book.tick_size is not None:
            self.tick_size = book.tick_size
        if book.last_trade_price is not None:
            self.last_trade_price = book.last_trade_price
        if book.integrity == "verified":
            self.resync_buffer = None
        self.book_timestamp_ms = max(self.book_timestamp_ms, book.timestamp_ms)
        self.timestamp_ms = max(self.timestamp_ms, book.timestamp_ms)
        return None

    def apply_rest_book(self, book: BookSnapshot) -> BookProblem | None:
        """
        A REST copy of the book (``GET /book``): replaces the levels, then the
        buffered changes not older than it (``timestamp_ms`` at or after the
        REST book's) are applied again, in order. Ends the resync. Ignored
        (``stale_event``) when no resync is under way any more.

        Re-applying a change the REST book already holds is harmless: a change
        sets a level's total size, and the buffer replays in order, so every
        level it touches ends at its latest value. Changes sharing the REST
        book's millisecond (the venue stamps bursts alike) must be re-applied.
        """
        buffered = self.resync_buffer
        if buffered is None:
            return "stale_event"
        self.resync_buffer = None
        newest_ms = self.book_timestamp_ms
        self._replace_levels(book.bids, book.asks)
        if book.tick_size is not None:
            self.tick_size = book.tick_size
        if book.last_trade_price is not None:
            self.last_trade_price = book.last_trade_price
        self.book_timestamp_ms = self.rest_timestamp_ms = book.timestamp_ms
        for timestamp_ms, change in buffered:
            if timestamp_ms >= book.timestamp_ms:
                self.apply_change(change, timestamp_ms)
        self.book_timestamp_ms = max(newest_ms, self.book_timestamp_ms)
        self.timestamp_ms = max(self.timestamp_ms, book.timestamp_ms)
        return None

    def apply_change(self, change: LevelChange, timestamp_ms: int) -> BookProblem | None:
        """Set (or with size 0 remove) one level; take the venue's top when the entry has it."""
        if timestamp_ms and timestamp_ms < self.book_timestamp_ms:
            return "superseded" if timestamp_ms <= self.rest_timestamp_ms else "stale_event"
        if self.resync_buffer is not None:
            self.resync_buffer.append((timestamp_ms, change))
        crossed = False
        price, size = change.price, change.size
        if change.side == "BUY":
            side, other, quotable = self.bids, self.asks, price > 0
            if size > 0 and quotable:
                best = other.best
                if best is not None and price >= best:
                    other.drop_through(price)
                    crossed = True
        else:
            side, other, quotable = self.asks, self.bids, price < 1
            if size > 0 and quotable:
                best = other.best
                if best is not None and price <= best:
                    other.drop_through(price)
                    crossed = True
        # A cross the venue annotates with its own top is a trade-through burst
        # (the traded levels' removals come in later frames): normal, not bad input.
        problem: BookProblem | None = "crossed_book" if crossed and not change.has_top else None
        if quotable:
            side.set(price, size)
        # The venue's top after this entry, when it says; else the levels (an
        # entry without it makes an earlier entry's top stale).
        self.venue_top, self.venue_bid, self.venue_ask = (
            change.has_top,
            change.best_bid,
            change.best_ask,
        )
        self.has_book = True
        self.source = "ws"
        if timestamp_ms > self.book_timestamp_ms:
            self.book_timestamp_ms = timestamp_ms
        if timestamp_ms > self.timestamp_ms:
            self.timestamp_ms = timestamp_ms
        return problem

    def apply_trade(self, trade: LastTradePrice) -> BookProblem | None:
        """Record a ``last_trade_price``."""
        if trade.timestamp_ms and trade.timestamp_ms < self.trade_timestamp_ms:
            return "stale_event"
        self.last_trade_price = trade.price
        self.trade_timestamp_ms = max(self.trade_timestamp_ms, trade.timestamp_ms)
        self.timestamp_ms = max(self.timestamp_ms, trade.timestamp_ms)
        return None

    def apply_tick_size(self, change: TickSizeChange) -> bool:
        """
        A ``tick_size_change``. Returns True when the tick really changed
        (old != new): the book then needs a REST copy (:meth:`begin_resync`
        is called), while the venue's per-entry tops keep the quote right. A
        no-op change keeps book and quote (NautilusTrader test
        ``tick_size_change_noop_preserves_book_and_quote``).
        """
        old = change.old_tick_size if change.old_tick_size is not None else self.tick_size
        self.tick_size = change.new_tick_size
        if old is not None and old == change.new_tick_size:
            return False
        self.timestamp_ms = max(self.timestamp_ms, change.timestamp_ms)
        self.begin_resync()
        return True

    def apply_best_bid_ask(self, event: BestBidAsk) -> BookProblem | None:
        """A ``best_bid_ask`` (custom feature): the venue's top, kept until the next levels."""
        if event.timestamp_ms and event.timestamp_ms < self.book_timestamp_ms:
            return "stale_event"
        self.venue_top, self.venue_bid, self.venue_ask = True, event.best_bid, event.best_ask
        self.has_book = True
        self.timestamp_ms = max(self.timestamp_ms, event.timestamp_ms)
        return None

    def apply_quote(self, best_bid: Decimal | None, best_ask: Decimal | None) -> None:
        """
        A polled top of book (HTTP fallback) replaces both sides, one level
        each of unknown size; the next ``book`` snapshot replaces it in turn.
        A bid <= 0 or an ask >= 1 is an empty side.
        """
        best_bid, best_ask = bid_or_none(best_bid), ask_or_none(best_ask)
        self.bids.replace({} if best_bid is None else {best_bid: _ONE})
        self.asks.replace({} if best_ask is None else {best_ask: _ONE})
        self.venue_top = False
        self.has_book = True
        self.source = "poll"

    @property
    def best_bid(self) -> Decimal | None:
        """The venue's best bid when the last change carried it, else the highest bid level."""
        return self.venue_bid if self.venue_top else self.bids.best

    @property
    def best_ask(self) -> Decimal | None:
        """The venue's best ask when the last change carried it, else the lowest ask level."""
        return self.venue_ask if self.venue_top else self.asks.best

    def top(self) -> TopOfBook:
        """A frozen copy of the top of book."""
        return TopOfBook(
            asset_id=self.asset_id,
            best_bid=self.best_bid,
            best_ask=self.best_ask,
            last_trade_price=self.last_trade_price,
            tick_size=self.tick_size,
            has_book=self.has_book,
            timestamp_ms=self.timestamp_ms,
        )


@attrs.define
class Applied:
    """
    What applying one frame to :class:`Books` did.

    Attributes:
        moved: asset ids whose book or last trade changed.
        problems: ``(asset_id, kind, timestamp_ms)`` of each refused or
            repaired update (see :class:`AssetBook`).
        resync: ``(asset_id, reason)`` of books that now need a REST copy:
            ``tick_size_change`` or ``hash_mismatch``.
    """

    moved: set[str] = attrs.Factory(set)
    problems: list[tuple[str, BookProblem, int]] = attrs.Factory(list)
    resync: list[tuple[str, str]] = attrs.Factory(list)

    def record(self, asset_id: str, problem: BookProblem | None, timestamp_ms: int) -> None:
        """One update of ``asset_id``: moved unless refused or skipped; bad input is kept."""
        if problem == "superseded":
            return
        if problem != "stale_event":  # a repaired (crossed) book moved too
            self.moved.add(asset_id)
        if problem is not None:
            self.problems.append((asset_id, problem, timestamp_ms))


class Books(dict[str, AssetBook]):
    """
    Every asset's :class:`AssetBook`, by asset id, and the one way a frame's
    events are applied to them (the router, the tests' reference model and
    the benchmarks use it).
    """

    def book(self, asset_id: str) -> AssetBook:
        """The book of ``asset_id``, created empty on first use."""
        book = self.get(asset_id)
        if book is None:
            book = self[asset_id] = AssetBook(asset_id)
        return book

    def apply(self, events: Iterable[FeedEvent], applied: Applied | None = None) -> Applied:
        """
        Apply one frame's events in order; returns (or adds to ``applied``)
        what moved, what was refused and which books need a REST copy.
        Events that name no asset (``new_market``, ``market_resolved``) are
        not book events and are skipped.
        """
        applied = Applied() if applied is None else applied
        moved = applied.moved
        for event in events:
            if type(event) is PriceChange:  # the common event: exact type, no record() call
                timestamp_ms = event.timestamp_ms
                for change in event.changes:
                    asset_id = change.asset_id
                    book = self.get(asset_id)
                    if book is None:
                        book = self.book(asset_id)
                    problem = book.apply_change(change, timestamp_ms)
                    if problem is None:
                        moved.add(asset_id)
                    else:
                        applied.record(asset_id, problem, timestamp_ms)
            elif isinstance(event, BookSnapshot):
                book = self.book(event.asset_id)
                applied.record(event.asset_id, book.apply_snapshot(event), event.timestamp_ms)
                if event.integrity == "mismatched":
                    book.begin_resync()
                    applied.resync.append((event.asset_id, "hash_mismatch"))
            elif isinstance(event, LastTradePrice):
                problem = self.book(event.asset_id).apply_trade(event)
                if problem is None:
                    moved.add(event.asset_id)
                else:
                    applied.record(event.asset_id, problem, event.timestamp_ms)
            elif isinstance(event, TickSizeChange):
                if self.book(event.asset_id).apply_tick_size(event):
                    applied.resync.append((event.asset_id, "tick_size_change"))
            elif isinstance(event, BestBidAsk):
                problem = self.book(event.asset_id).apply_best_bid_ask(event)
                applied.record(event.asset_id, problem, event.timestamp_ms)
        return applied


def choose_price(top: TopOfBook, choice: PriceChoice) -> Decimal | None:
    """
    One of a top of book's prices, by name: ``best_bid`` (what a sale would
    get now), ``midpoint``, or ``display`` (Polymarket's displayed price).
    None when not known. Used for ``positions.mark`` and ``monitor.trigger_price``.
    """
    if choice == "best_bid":
        return top.best_bid
    if choice == "midpoint":
        return top.midpoint
    return top.display
