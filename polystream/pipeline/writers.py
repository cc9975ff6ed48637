"""
From books to rows: the market writer and the position writer.

::

    Router --touch(market key)--> MarketWriter   (coalesced set, flush every
                                                   pipeline.market_flush_interval)
           --touch(market key)--> PositionWriter (debounce with max wait, token
                                                   bucket, P&L computed in SQL)

Writers keep *which* markets changed, never a queue of values: at flush time
they read the current top of book, so the latest state always wins, memory is
bounded by the number of markets, and a database outage only delays. Each
batch is one ``UPDATE ... FROM unnest(...)`` (docs/architecture.md, "Write in
sets").
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from decimal import Decimal
from typing import Any

import attrs
import orjson
import psycopg
import trio

from polystream.book import Books, choose_price
from polystream.catalog import Catalog, MarketKey
from polystream.cluster import Fence
from polystream.config import PriceChoice
from polystream.errors import DatabaseError
from polystream.stats import Stats
from polystream.timing import Backoff, Debouncer, TokenBucket, run_flushes

__all__ = [
    "FINAL_FLUSH_SECONDS",
    "MARKETS_CHANNEL",
    "NOTIFY_PAYLOAD_BYTES",
    "POSITIONS_PRICED_CHANNEL",
    "POSITION_ROWS_PER_TRANSACTION",
    "AfterWrite",
    "Batches",
    "MarketRow",
    "MarketWriter",
    "PositionWriter",
    "Sink",
    "Written",
    "notify_ids",
    "write_markets",
    "write_positions",
    "write_positions_in_chunks",
]

FINAL_FLUSH_SECONDS = 5.0


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

POSITION_ROWS_PER_TRANSACTION = 500
"""
Most ``positions`` rows one price write updates in one transaction. Its row
locks are held until it commits, and a TP/SL decision on one of those rows
waits for that (the compare-and-set on ``status``): 16,000 rows in one
transaction made a trigger wait 43 ms; 500 rows take about 1-2 ms.
"""

_POSITIONS_SET = """
    UPDATE positions AS p SET
        current_price = t.price,
        pnl_amount = p.size * (t.price - p.entry_price),
        pnl_percentage = CASE WHEN p.entry_price > 0
            THEN round((t.price - p.entry_price) / p.entry_price * 100, 4) END,
        updated_at = now()
    FROM locked AS t
    WHERE p.id = t.id
    RETURNING p.id, p.user_id
"""

_LOCKED = """
    SELECT q.id, v.price FROM positions AS q JOIN v ON q.token_id = v.token_id
    WHERE q.id IN (SELECT id FROM first) AND q.status = 'active'
    ORDER BY q.id
    FOR NO KEY UPDATE OF q
"""

# The first transaction: one scan finds every position to reprice, the lowest
# ``limit`` ids are written, and the first id of each later ``limit`` of them is
# returned: the later transactions write an id span each, without scanning again
# and without sending (or reading back) every id.
_WRITE_POSITIONS = f"""
WITH v AS (
    SELECT * FROM unnest(%(token)s::text[], %(price)s::numeric[]) AS v(token_id, price)
), due AS MATERIALIZED (
    SELECT q.id FROM positions AS q JOIN v ON q.token_id = v.token_id
    WHERE q.status = 'active'
      AND (q.current_price IS DISTINCT FROM v.price OR q.pnl_amount IS NULL)
), first AS (
    SELECT id FROM due ORDER BY id LIMIT %(limit)s
), locked AS ({_LOCKED}), updated AS ({_POSITIONS_SET}), rest AS (
    SELECT id, row_number() OVER (ORDER BY id) - 1 AS n
    FROM due WHERE id > (SELECT max(id) FROM first)
)
SELECT (SELECT count(*) FROM updated),
       (SELECT array_agg(id ORDER BY id) FROM rest WHERE n %% %(limit)s = 0),
       (SELECT array_agg(DISTINCT user_id) FROM updated WHERE user_id IS NOT NULL)
"""

# A later transaction: the positions to reprice in one id span (the primary key's range).
_WRITE_POSITIONS_IN_SPAN = f"""
WITH v AS (
    SELECT * FROM unnest(%(token)s::text[], %(price)s::numeric[]) AS v(token_id, price)
), first AS (
    SELECT q.id FROM positions AS q JOIN v ON q.token_id = v.token_id
    WHERE q.id >= %(low)s AND q.id < %(high)s AND q.status = 'active'
      AND (q.current_price IS DISTINCT FROM v.price OR q.pnl_amount IS NULL)
), locked AS ({_LOCKED}), updated AS ({_POSITIONS_SET})
SELECT count(*), NULL::bigint[],
       array_agg(DISTINCT user_id) FILTER (WHERE user_id IS NOT NULL)
FROM updated
"""

MARKETS_CHANNEL = "polystream_markets"
"""
NOTIFY channel of the markets rows written: after each committed flush, payload
``{"ids": ["<markets.id>", ...], "sent_ms": <unix ms>}`` (docs/architecture.md, "The database contract").
"""

POSITIONS_PRICED_CHANNEL = "polystream_positions_priced"
"""
NOTIFY channel of the positions repriced: after each committed flush, payload
``{"users": ["<positions.user_id>", ...], "sent_ms": <unix ms>}``, each user whose positions changed once.
"""

NOTIFY_PAYLOAD_BYTES = 7_900
"""A payload's most bytes: PostgreSQL refuses 8,000 or more (``pg_notify``)."""

_NO_ID_ABOVE = 2**63 - 1
"""The end of the last span: ``bigint``'s maximum."""


@attrs.frozen
class Written:
    """
    What one flush committed: ``rows`` updated, and ``ids``, each once:
    the ``markets.id`` written (:func:`write_markets`) or the
    ``positions.user_id`` whose positions were repriced
    (:func:`write_positions_in_chunks`). The writers hand ``ids`` to their
    ``after_write`` (the Redis invalidation: polystream.cache).
    """

    rows: int
    ids: tuple[str, ...] = ()


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


def notify_ids(conn: psycopg.Connection[Any], channel: str, key: str, ids: Sequence[str]) -> int:
    """
    ``NOTIFY channel`` with ``{"<key>": [ids...], "sent_ms": <unix ms>}``,
    split into as many payloads of at most :data:`NOTIFY_PAYLOAD_BYTES` as
    needed, each id in one of them once; delivered when the caller's
    transaction commits (none if it rolls back). ``sent_ms`` is this
    process's wall clock when the payloads were queued, just before the
    commit (a listener's lag is its receive time minus ``sent_ms``). Returns
    how many notifications were queued.

    Raises:
        ValueError: one id alone does not fit in a payload.
    """
    sent_ms = int(time.time() * 1000)
    prefix = len(orjson.dumps({key: [], "sent_ms": sent_ms}))
    batches: list[list[str]] = []
    size = NOTIFY_PAYLOAD_BYTES
    for value in ids:
        cost = len(orjson.dumps(value)) + 1  # the value and its comma
        if prefix + cost > NOTIFY_PAYLOAD_BYTES:
            raise ValueError(f"{key} {value[:40]!r}... does not fit in a NOTIFY payload")
        if size + cost > NOTIFY_PAYLOAD_BYTES:
            batches.append([])
            size = prefix
        batches[-1].append(value)
        size += cost
    for batch in batches:
        payload = orjson.dumps({key: batch, "sent_ms": sent_ms}).decode()
        conn.execute("SELECT pg_notify(%s, %s)", [channel, payload])
    return len(batches)


def write_markets(
    conn: psycopg.Connection[Any],
    rows: Sequence[MarketRow],
    fence: Fence | None = None,
    notify: bool = True,
) -> Written:
    """
    Update ``markets`` from ``rows`` in one statement; returns the rows and
    ids updated, and, with ``notify``, tells :data:`MARKETS_CHANNEL` which
    (at commit: :func:`notify_ids`). With a cluster ``fence``, only the rows
    of the partitions this daemon holds (checked and share-locked in this
    transaction: polystream.cluster).
    """
    if fence is not None:
        held = fence.held(conn)
        rows = [row for row in rows if fence.owns_market(held, row.market_id)]
        if not rows:
            return Written(0)
    columns = list(zip(*(attrs.astuple(row) for row in rows), strict=True))
    with conn.cursor() as cur:
        cur.execute(_WRITE_MARKETS + " RETURNING m.id", [list(column) for column in columns])
        written = tuple(str(market_id) for (market_id,) in cur.fetchall())
    if notify:
        notify_ids(conn, MARKETS_CHANNEL, "ids", written)
    return Written(len(written), written)


def write_positions(
    conn: psycopg.Connection[Any],
    prices: Sequence[tuple[str, Decimal]],
    span: tuple[int, int] | None = None,
    limit: int = POSITION_ROWS_PER_TRANSACTION,
) -> tuple[int, list[int], list[str]]:
    """
    Set ``current_price``, ``pnl_amount`` (USDC: ``size * (price - entry)``)
    and ``pnl_percentage`` (percent of ``entry_price``, 4 decimals) of the
    ``active`` positions of the ``(token_id, price)`` pairs whose price
    changed: the ``limit`` lowest ids of them, or, with ``span`` ``(low,
    high)``, those with ``low <= id < high`` (one transaction's worth).

    Returns:
        ``(rows updated, starts, users)``: ``starts``, without ``span``, where
        each later ``limit`` of the positions found to reprice begins
        (ascending ids; empty when all fit), with ``span`` always empty;
        ``users``, the distinct ``user_id`` of the rows updated.
    """
    params: dict[str, Any] = {"token": [t for t, _ in prices], "price": [p for _, p in prices]}
    if span is None:
        row = conn.execute(_WRITE_POSITIONS, params | {"limit": limit}).fetchone()
    else:
        low, high = span
        row = conn.execute(_WRITE_POSITIONS_IN_SPAN, params | {"low": low, "high": high}).fetchone()
    assert row is not None
    return int(row[0]), list(row[1] or ()), sorted(row[2] or ())


def write_positions_in_chunks(
    conn: psycopg.Connection[Any],
    prices: Sequence[tuple[str, Decimal]],
    limit: int = POSITION_ROWS_PER_TRANSACTION,
    fence: Fence | None = None,
    notify: bool = True,
) -> Written:
    """
    :func:`write_positions` of every position, about ``limit`` rows per
    transaction, so a TP/SL decision never waits long for the rows' locks;
    returns the rows updated and the users whose positions they are. One scan finds them all (the first transaction);
    the next ones each write an id span (a position that became due
    meanwhile inside a span is written with it). ``conn`` must be outside a
    transaction (``DbLink.call_in_transactions``): all of them in one call,
    one thread hop. With a cluster ``fence``, each transaction writes only
    the tokens of the partitions held then (checked and share-locked in it).
    Then, with ``notify``, :data:`POSITIONS_PRICED_CHANNEL` is told which
    users' positions changed, once for the whole flush (:func:`notify_ids`).

    Raises:
        psycopg.Error: the rows written before stay written and the caller
            writes all again later (a row whose price is already right is not
            written twice).
    """

    def fenced() -> Sequence[tuple[str, Decimal]]:
        if fence is None:
            return prices
        held = fence.held(conn)
        return [(token, price) for token, price in prices if fence.owns_token(held, token)]

    with conn.transaction():
        mine = fenced()
        if not mine:
            return Written(0)
        total, starts, users = write_positions(conn, mine, None, limit)
    priced = set(users)
    ends = [*starts[1:], _NO_ID_ABOVE] if starts else []
    for low, high in zip(starts, ends, strict=True):
        with conn.transaction():
            mine = fenced()
            if mine:
                written, _, users = write_positions(conn, mine, (low, high))
                total += written
                priced.update(users)
    told = tuple(sorted(priced))
    if told and notify:  # once per flush, after its last transaction committed
        with conn.transaction():
            notify_ids(conn, POSITIONS_PRICED_CHANNEL, "users", told)
    return Written(total, told)


# ------------------------------------------------------------------ writers


@attrs.define
class Batches:
    """
    How many batches a writer has written, and a way to wait for the next
    ones (tests and tools: ``seen = w.batches.count``, look, then
    ``await w.batches.after(seen)``, so no write between the two is missed).
    """

    count: int = 0
    _written: trio.Event = attrs.field(factory=trio.Event)

    def wrote(self) -> None:
        """One more batch is written."""
        self.count += 1
        self._written.set()
        self._written = trio.Event()

    async def after(self, seen: int) -> None:
        """Return once more than ``seen`` batches have been written."""
        while self.count <= seen:
            await self._written.wait()


Sink = Callable[[list[Any]], Awaitable[Written]]
AfterWrite = Callable[[tuple[str, ...]], None]


@attrs.define(eq=False)
class MarketWriter:
    """
    Coalesces touched markets and writes them every ``interval`` seconds.

    ``sink`` receives a list of :class:`MarketRow` and returns what it
    committed (:class:`Written`, ``ids`` the ``markets.id``), which goes to
    ``after_write`` when set; a :class:`DatabaseError` keeps the markets
    dirty for the next try (after backoff), so nothing but time is lost.
    """

    books: Books
    catalog: Catalog
    stats: Stats
    sink: Sink
    interval: float
    retry_max: float = 30.0
    after_write: AfterWrite | None = None
    dirty: set[str] = attrs.field(factory=set)
    wake: trio.Event = attrs.field(factory=trio.Event)
    batches: Batches = attrs.field(factory=Batches)

    async def next_write(self) -> None:
        """Return once the next batch has been written (for tests and tools)."""
        await self.batches.after(self.batches.count)

    def touch(self, key: MarketKey) -> None:
        """Mark market key ``key`` for the next flush."""
        self.dirty.add(key)
        self.wake.set()

    def _row(self, key: str) -> MarketRow | None:
        tokens = self.catalog.tokens.get(key)
        if not tokens:
            return None
        tops = [self.books[t].top() if t in self.books else None for t in tokens]
        prices = [None if top is None or top.display is None else str(top.display) for top in tops]
        first = tops[0]
        has_book = first is not None and first.has_book
        return MarketRow(
            market_id=key,
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
        self.stats.rows_written["markets"] += written.rows
        if self.after_write is not None and written.ids:
            self.after_write(written.ids)
        self.batches.wrote()
        self.stats.pending_markets = len(self.dirty)
        return True

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Flush every ``interval`` while markets change; final flush on cancel."""
        backoff = Backoff(self.interval, self.retry_max)
        await run_flushes(
            self,
            backoff,
            delay=self.interval,
            final_seconds=FINAL_FLUSH_SECONDS,
            task_status=task_status,
        )


@attrs.define(eq=False)
class PositionWriter:
    """
    Updates the P&L of the active positions of touched markets.

    A market's positions are updated at most once per ``debounce`` window and
    at most one window after a change (:class:`~polystream.timing.Debouncer`);
    at most ``rate`` position rows per second (:class:`TokenBucket`): due
    markets that do not fit wait, coalesced, until tokens return.

    ``sink`` receives ``[(token_id, price), ...]`` and returns what it
    committed (:class:`Written`, ``ids`` the users whose positions were
    repriced), which goes to ``after_write`` when set.
    """

    books: Books
    catalog: Catalog
    stats: Stats
    sink: Sink
    price_choice: PriceChoice
    debounce: float
    rate: float
    retry_max: float = 30.0
    after_write: AfterWrite | None = None
    _debouncer: Debouncer[str] = attrs.field(init=False)
    _bucket: TokenBucket = attrs.field(init=False)
    _ready: dict[str, None] = attrs.field(factory=dict)
    _wake: trio.Event = attrs.field(factory=trio.Event)
    batches: Batches = attrs.field(factory=Batches)

    async def next_write(self) -> None:
        """Return once the next batch has been written (for tests and tools)."""
        await self.batches.after(self.batches.count)

    def __attrs_post_init__(self) -> None:
        self._debouncer = Debouncer(self.debounce)
        self._bucket = TokenBucket(self.rate, now=trio.current_time())

    def touch(self, key: MarketKey, now: float) -> None:
        """Record that market key ``key``'s prices changed at ``now`` (trio seconds)."""
        was_idle = self._debouncer.next_due() is None
        self._debouncer.touch(key, now)
        if was_idle:
            self._wake.set()

    def price_now(self, keys: Iterable[MarketKey]) -> None:
        """
        Price these markets' active positions from the current books now,
        whether or not the markets move: new, re-opened or unpriced positions
        (the reconciler calls it). Due at once, not one debounce window later
        (a market already due keeps its time); the token bucket still applies.
        """
        due_now = trio.current_time() - self.debounce
        for key in keys:
            self.touch(key, due_now)

    def _cost(self, key: str) -> int:
        return max(1, self.catalog.positions.get(key, 0))

    def _prices(self, markets: list[str]) -> list[tuple[str, Decimal]]:
        prices = []
        for key in markets:
            for token in self.catalog.tokens_of(key):
                book = self.books.get(token)
                price = None if book is None else choose_price(book.top(), self.price_choice)
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
        self.stats.rows_written["positions"] += written.rows
        if self.after_write is not None and written.ids:
            self.after_write(written.ids)
        self.batches.wrote()
        return True

    def _take_batch(self, now: float) -> list[str]:
        for key in self._debouncer.pop_due(now):
            self._ready[key] = None
        batch = []
        for key in list(self._ready):
            if not self._bucket.try_take(self._cost(key), now):
                break
            batch.append(key)
            del self._ready[key]
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
