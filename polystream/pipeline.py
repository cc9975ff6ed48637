"""
From feed events to rows: the router, the market writer and the position writer.

::

    shards --events--> Router (books per asset)
                         |-- touch(market) --> MarketWriter   (coalesced set, flush every
                         |                                      pipeline.market_flush_interval)
                         '-- touch(market) --> PositionWriter (debounce with max wait,
                                                               token bucket, P&L in SQL)

Writers keep *which* markets changed, never a queue of values: at flush time
they read the current top of book, so the latest state always wins, memory
is bounded by the number of markets, and a database outage only delays.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Sequence
from decimal import Decimal
from typing import Any

import attrs
import orjson
import psycopg
import structlog
import trio

from polystream.book import AssetBook, Books, mark_price
from polystream.errors import DatabaseError
from polystream.logs import RateLimitedLog
from polystream.protocol import BookSnapshot, FeedEvent
from polystream.stats import Stats
from polystream.timing import Backoff, Debouncer, TokenBucket

__all__ = [
    "Catalog",
    "MarketRow",
    "MarketWriter",
    "PositionWriter",
    "Router",
    "write_markets",
    "write_positions",
]

logger = structlog.get_logger(__name__)

FINAL_FLUSH_SECONDS = 5.0


@attrs.define
class Catalog:
    """
    What the database says about the subscribed markets; replaced whole by
    the reconciler, read by the router and the writers.

    Attributes:
        market_tokens: market id -> its ``clob_token_ids`` in outcome order.
        asset_market: asset (token) id -> market id.
        positions_per_market: market id (or bare token id) -> active positions.
    """

    market_tokens: dict[str, tuple[str, ...]] = attrs.field(factory=dict)
    asset_market: dict[str, str] = attrs.field(factory=dict)
    positions_per_market: dict[str, int] = attrs.field(factory=dict)

    def add_market(self, market_id: str, tokens: tuple[str, ...]) -> None:
        """Know ``market_id``'s token ids (``clob_token_ids``, outcome order)."""
        self.market_tokens[market_id] = tokens
        for token in tokens:
            self.asset_market[token] = market_id

    def market_of(self, asset_id: str) -> str:
        """The market id of ``asset_id``, or the asset id itself when unknown."""
        return self.asset_market.get(asset_id, asset_id)

    def tokens_of(self, key: str) -> tuple[str, ...]:
        """The token ids of market ``key`` (or ``(key,)`` for a bare token)."""
        return self.market_tokens.get(key, (key,))


# ------------------------------------------------------------------ SQL

_WRITE_MARKETS = """
UPDATE markets AS m SET
    outcome_prices = CASE WHEN v.prices IS NULL THEN m.outcome_prices ELSE (
        SELECT jsonb_agg(
            COALESCE(NULLIF(n.p, 'null'::jsonb), m.outcome_prices -> (n.i::int - 1), 'null'::jsonb)
            ORDER BY n.i)
        FROM jsonb_array_elements(v.prices::jsonb) WITH ORDINALITY AS n(p, i)) END,
    best_bid = CASE WHEN v.has_book THEN v.best_bid ELSE m.best_bid END,
    best_ask = CASE WHEN v.has_book THEN v.best_ask ELSE m.best_ask END,
    last_mid_price = CASE WHEN v.has_book THEN v.mid ELSE m.last_mid_price END,
    last_trade_price = COALESCE(v.last_trade, m.last_trade_price),
    tick_size = COALESCE(v.tick, m.tick_size),
    source = v.source,
    updated_at = now()
FROM unnest(%s::text[], %s::text[], %s::bool[], %s::numeric[], %s::numeric[],
            %s::numeric[], %s::numeric[], %s::numeric[], %s::text[])
     AS v(id, prices, has_book, best_bid, best_ask, mid, last_trade, tick, source)
WHERE m.id = v.id
"""

_WRITE_POSITIONS = """
UPDATE positions AS p SET
    current_price = t.price,
    pnl_amount = p.size * (t.price - p.entry_price),
    pnl_percentage = CASE WHEN p.entry_price > 0
        THEN round((t.price - p.entry_price) / p.entry_price * 100, 4) END,
    updated_at = now()
FROM (
    SELECT q.id, v.price
    FROM positions AS q JOIN unnest(%s::text[], %s::numeric[]) AS v(token_id, price)
        ON q.token_id = v.token_id
    WHERE q.status = 'active'
      AND (q.current_price IS DISTINCT FROM v.price OR q.pnl_amount IS NULL)
    ORDER BY q.id
    FOR NO KEY UPDATE OF q
) AS t
WHERE p.id = t.id
"""


@attrs.frozen
class MarketRow:
    """
    One ``markets`` update: ``prices`` is the JSON array of display prices in
    ``clob_token_ids`` order (``null`` where unknown, kept from the row);
    quotes are those of the first outcome's token, as Gamma reports them.
    """

    market_id: str
    prices: str | None
    has_book: bool
    best_bid: Decimal | None
    best_ask: Decimal | None
    mid: Decimal | None
    last_trade: Decimal | None
    tick: Decimal | None
    source: str = "ws"


def write_markets(conn: psycopg.Connection[Any], rows: Sequence[MarketRow]) -> int:
    """Update ``markets`` from ``rows`` in one statement; returns rows updated."""
    columns = list(zip(*(attrs.astuple(row) for row in rows), strict=True))
    with conn.cursor() as cur:
        cur.execute(_WRITE_MARKETS, [list(column) for column in columns])
        return cur.rowcount


def write_positions(conn: psycopg.Connection[Any], prices: Sequence[tuple[str, Decimal]]) -> int:
    """
    Set ``current_price``, ``pnl_amount`` (USDC: ``size * (price - entry)``)
    and ``pnl_percentage`` (percent of ``entry_price``, 4 decimals) of the
    ``active`` positions of each ``(token_id, price)``; returns rows updated.
    """
    with conn.cursor() as cur:
        cur.execute(_WRITE_POSITIONS, [[t for t, _ in prices], [p for _, p in prices]])
        return cur.rowcount


# ------------------------------------------------------------------ router


@attrs.define(eq=False)
class Router:
    """
    Applies events to the books and tells the writers which markets moved.

    Pure CPU, no waiting: the writers' ``touch`` only marks keys.
    ``resync(asset_id, reason)`` is told of books that need a REST copy
    (:class:`~polystream.resync.BookResync`.request); REST copies come back
    through :meth:`apply_rest_book`.
    """

    books: Books
    catalog: Catalog
    markets: MarketWriter
    positions: PositionWriter
    listeners: list[Callable[[str, AssetBook], None]] = attrs.field(factory=list)
    resync: Callable[[str, str], None] | None = None
    _log_limit: RateLimitedLog = attrs.field(factory=RateLimitedLog)
    frames_applied: int = 0

    def book(self, asset_id: str) -> AssetBook:
        """The book of ``asset_id``, created empty on first use."""
        return self.books.book(asset_id)

    def apply(self, events: list[FeedEvent]) -> None:
        """Apply one frame's events and touch the markets they moved."""
        self.frames_applied += 1
        applied = self.books.apply(events)
        for asset_id, problem, timestamp_ms in applied.problems:
            self._bad_input(problem, asset_id, timestamp_ms)
        if applied.resync and self.resync is not None:
            for asset_id, reason in applied.resync:
                self.resync(asset_id, reason)
        if applied.moved:
            self._moved(applied.moved)

    def apply_rest_book(self, book: BookSnapshot) -> None:
        """A REST copy of a book that was being resynced (see :meth:`AssetBook.apply_rest_book`)."""
        if self.books.book(book.asset_id).apply_rest_book(book) is None:
            self._moved((book.asset_id,))

    def _moved(self, asset_ids: Iterable[str]) -> None:
        """Tell the writers and the listeners (the monitor) that these books moved."""
        now = trio.current_time()
        for asset_id in asset_ids:
            market = self.catalog.market_of(asset_id)
            self.markets.touch(market)
            self.positions.touch(market, now)
            for listener in self.listeners:
                listener(asset_id, self.books[asset_id])

    def apply_quote(
        self,
        asset_id: str,
        best_bid: Decimal | None,
        best_ask: Decimal | None,
        midpoint: Decimal | None,
    ) -> None:
        """
        A quote polled over REST (HTTP fallback): replaces the asset's top of
        book, written with ``source = 'poll'`` and seen by the monitor.
        ``midpoint`` is implied by bid and ask and not used separately.
        """
        self.book(asset_id).apply_quote(best_bid, best_ask)
        self._moved((asset_id,))

    def _bad_input(self, kind: str, asset_id: str, timestamp_ms: int) -> None:
        """Count a refused or repaired event; log it once per kind per 10 s."""
        stats = self.markets.stats
        stats.parse_errors[kind] += 1
        suppressed = self._log_limit.allow(kind, trio.current_time())
        if suppressed is not None:
            logger.warning(
                "feed_bad_event",
                kind=kind,
                asset_id=asset_id,
                timestamp_ms=timestamp_ms,
                suppressed_since_last=suppressed,
            )

    async def run(self, receive: trio.MemoryReceiveChannel[list[FeedEvent]]) -> None:
        """Consume frames until the channel closes or the task is cancelled."""
        async with receive:
            async for events in receive:
                self.apply(events)
                for _ in range(16):  # drain what queued meanwhile, no checkpoint each
                    try:
                        more = receive.receive_nowait()
                    except trio.WouldBlock:
                        break
                    self.apply(more)


# ------------------------------------------------------------------ writers


def _announce(event: trio.Event) -> trio.Event:
    """Wake whoever waits on ``event`` (a batch was written); returns the next one."""
    event.set()
    return trio.Event()

Sink = Callable[[list[Any]], Awaitable[int]]


@attrs.define(eq=False)
class MarketWriter:
    """
    Coalesces touched markets and writes them every ``interval`` seconds.

    ``sink`` receives a list of :class:`MarketRow` and returns rows written;
    a :class:`DatabaseError` keeps the markets dirty for the next try (after
    backoff), so nothing but time is lost.
    """

    books: Books
    catalog: Catalog
    stats: Stats
    sink: Sink
    interval: float
    retry_max: float = 30.0
    dirty: set[str] = attrs.field(factory=set)
    _wake: trio.Event = attrs.field(factory=trio.Event)
    _written: trio.Event = attrs.field(factory=trio.Event)

    async def next_write(self) -> None:
        """Return once the next batch has been written (for tests and tools)."""
        await self._written.wait()

    def touch(self, market_id: str) -> None:
        """Mark ``market_id`` for the next flush."""
        self.dirty.add(market_id)
        self._wake.set()

    def _row(self, market_id: str) -> MarketRow | None:
        tokens = self.catalog.market_tokens.get(market_id)
        if not tokens:
            return None
        tops = [self.books[t].top() if t in self.books else None for t in tokens]
        prices = [None if top is None or top.display is None else str(top.display) for top in tops]
        first = tops[0]
        has_book = first is not None and first.has_book
        return MarketRow(
            market_id=market_id,
            prices=None if all(p is None for p in prices) else orjson.dumps(prices).decode(),
            has_book=has_book,
            best_bid=first.best_bid if first and has_book else None,
            best_ask=first.best_ask if first and has_book else None,
            mid=first.midpoint if first and has_book else None,
            last_trade=first.last_trade_price if first else None,
            tick=first.tick_size if first else None,
            source="poll"
            if any(self.books[t].source == "poll" for t in tokens if t in self.books)
            else "ws",
        )

    async def flush(self) -> bool:
        """Write every dirty market now; False when the database failed."""
        if not self.dirty:
            return True
        markets, self.dirty = self.dirty, set()
        rows = [row for row in map(self._row, sorted(markets)) if row is not None]
        self.stats.pending_markets = len(rows)
        if not rows:
            return True
        written = None
        try:
            written = await self.sink(rows)
        except DatabaseError:
            return False
        finally:
            if written is None:  # failed or cancelled mid-write: keep them for the next flush
                self.dirty |= markets
        self.stats.rows_written["markets"] += written
        self._written = _announce(self._written)
        self.stats.pending_markets = len(self.dirty)
        return True

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Flush every ``interval`` while markets change; final flush on cancel."""
        backoff = Backoff(self.interval, self.retry_max)
        try:
            task_status.started()
            while True:
                await self._wake.wait()
                await trio.sleep(self.interval)
                self._wake = trio.Event()
                if await self.flush():
                    backoff.reset()
                else:
                    self._wake.set()
                    await trio.sleep(backoff.next_delay())
        finally:
            with trio.move_on_after(FINAL_FLUSH_SECONDS, shield=True):
                await self.flush()


@attrs.define(eq=False)
class PositionWriter:
    """
    Updates the P&L of the active positions of touched markets.

    A market's positions are updated at most once per ``debounce`` window and
    at most one window after a change (:class:`~polystream.timing.Debouncer`);
    at most ``rate`` position rows per second (:class:`TokenBucket`): due
    markets that do not fit wait, coalesced, until tokens return.

    ``sink`` receives ``[(token_id, price), ...]`` and returns rows written.
    """

    books: Books
    catalog: Catalog
    stats: Stats
    sink: Sink
    mark: str
    debounce: float
    rate: float
    retry_max: float = 30.0
    _debouncer: Debouncer[str] = attrs.field(init=False)
    _bucket: TokenBucket = attrs.field(init=False)
    _ready: dict[str, None] = attrs.field(factory=dict)
    _wake: trio.Event = attrs.field(factory=trio.Event)
    _written: trio.Event = attrs.field(factory=trio.Event)

    async def next_write(self) -> None:
        """Return once the next batch has been written (for tests and tools)."""
        await self._written.wait()

    def __attrs_post_init__(self) -> None:
        self._debouncer = Debouncer(self.debounce)
        self._bucket = TokenBucket(self.rate, now=trio.current_time())

    def touch(self, market_id: str, now: float) -> None:
        """Record that ``market_id``'s prices changed at ``now`` (trio seconds)."""
        was_idle = self._debouncer.next_due() is None
        self._debouncer.touch(market_id, now)
        if was_idle:
            self._wake.set()

    def price_now(self, market_ids: Iterable[str]) -> None:
        """
        Price these markets' active positions from the current books now,
        whether or not the markets move: new, re-opened or unpriced positions
        (the reconciler calls it). Due at once, not one debounce window later
        (a market already due keeps its time); the token bucket still applies.
        """
        due_now = trio.current_time() - self.debounce
        for market_id in market_ids:
            self.touch(market_id, due_now)

    def _cost(self, market_id: str) -> int:
        return max(1, self.catalog.positions_per_market.get(market_id, 0))

    def _prices(self, markets: list[str]) -> list[tuple[str, Decimal]]:
        prices = []
        for market_id in markets:
            for token in self.catalog.tokens_of(market_id):
                book = self.books.get(token)
                price = None if book is None else mark_price(book.top(), self.mark)
                if price is not None:
                    prices.append((token, price))
        return prices

    def _next_wake(self, now: float) -> float | None:
        if self._ready:
            first = next(iter(self._ready))
            return self._bucket.ready_at(self._cost(first), now)
        return self._debouncer.next_due()

    async def _write(self, markets: list[str]) -> bool:
        prices = self._prices(markets)
        if not prices:
            return True
        written = None
        try:
            written = await self.sink(prices)
        except DatabaseError:
            return False
        finally:
            if written is None:  # failed or cancelled mid-write: keep them, first in line
                self._ready = dict.fromkeys(markets) | self._ready
        self.stats.rows_written["positions"] += written
        self._written = _announce(self._written)
        return True

    def _take_batch(self, now: float) -> list[str]:
        for market_id in self._debouncer.pop_due(now):
            self._ready[market_id] = None
        batch = []
        for market_id in list(self._ready):
            if not self._bucket.try_take(self._cost(market_id), now):
                break
            batch.append(market_id)
            del self._ready[market_id]
        self.stats.pending_positions = len(self._ready) + len(self._debouncer)
        return batch

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Write due markets as tokens allow; on cancel, write everything pending."""
        backoff = Backoff(max(self.debounce, 0.1), self.retry_max)
        try:
            task_status.started()
            while True:
                wake_at = self._next_wake(trio.current_time())
                self._wake = trio.Event()
                if wake_at is None:
                    await self._wake.wait()
                    continue
                await trio.sleep_until(wake_at)
                batch = self._take_batch(trio.current_time())
                if batch and not await self._write(batch):
                    await trio.sleep(backoff.next_delay())
                elif batch:
                    backoff.reset()
        finally:
            with trio.move_on_after(FINAL_FLUSH_SECONDS, shield=True):
                pending = list(self._ready) + self._debouncer.pop_all()
                self._ready.clear()
                if pending:
                    await self._write(pending)
