"""
Time logic: Backoff, Debouncer, TokenBucket, and the writers' scheduling.

The writers run under ``MockClock(autojump_threshold=0)`` with a fake async
sink that records ``(trio.current_time(), items)``, so every write time is an
exact virtual time. Tasks are synchronised with ``wait_all_tasks_blocked``.
"""

from __future__ import annotations

import itertools
import random
from decimal import Decimal
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st
from trio.testing import wait_all_tasks_blocked

from polystream.book import AssetBook, Books
from polystream.catalog import Catalog
from polystream.errors import DatabaseError
from polystream.feed.protocol import BookSnapshot, Level
from polystream.pipeline.writers import MarketRow, MarketWriter, PositionWriter, Written
from polystream.stats import Stats
from polystream.timing import Backoff, Debouncer, Slices, TokenBucket


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


# ------------------------------------------------------------------ Backoff


def test_backoff_full_jitter_bounds_and_sequence() -> None:
    backoff = Backoff(0.5, 30.0, rng=random.Random(1234))
    reference = random.Random(1234)
    delays = [backoff.next_delay() for _ in range(12)]
    caps = [min(30.0, 0.5 * 2**n) for n in range(12)]
    assert caps[:7] == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0]
    for delay, cap in zip(delays, caps, strict=True):
        assert 0 <= delay <= cap
    # exactly uniform(0, cap) drawn from the given generator
    assert delays == [reference.uniform(0, cap) for cap in caps]


def test_backoff_reset_and_many_attempts() -> None:
    backoff = Backoff(1.0, 60.0, rng=random.Random(7))
    for _ in range(200):  # no overflow however long the outage
        assert 0 <= backoff.next_delay() <= 60.0
    assert backoff.attempt <= 62
    backoff.reset()
    assert backoff.attempt == 0
    assert all(0 <= Backoff(1.0, 60.0, rng=random.Random(s)).next_delay() <= 1.0 for s in range(50))
    assert backoff.next_delay() <= 1.0
    assert backoff.next_delay() <= 2.0


def test_backoff_jitter_spreads_over_the_range() -> None:
    backoff = Backoff(8.0, 8.0, rng=random.Random(99))
    delays = [backoff.next_delay() for _ in range(2000)]
    assert min(delays) < 0.5 and max(delays) > 7.5
    assert 3.6 < sum(delays) / len(delays) < 4.4  # mean of uniform(0, 8)


# ------------------------------------------------------------------ Debouncer


def test_debouncer_touched_every_100ms_fires_once_per_window() -> None:
    debouncer: Debouncer[str] = Debouncer(1.0)
    fired: list[float] = []
    for k in range(0, 61):
        now = k / 10
        if debouncer.pop_due(now):
            fired.append(now)
        if k < 50:  # touched every 0.1 s for 5 s
            debouncer.touch("m", now)
    assert fired == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert len(debouncer) == 0 and debouncer.next_due() is None


def test_debouncer_basics() -> None:
    debouncer: Debouncer[str] = Debouncer(1.0)
    assert debouncer.next_due() is None
    debouncer.touch("a", 0.0)
    debouncer.touch("b", 0.5)
    debouncer.touch("a", 0.9)  # no postponement
    assert len(debouncer) == 2
    assert debouncer.next_due() == 1.0
    assert debouncer.pop_due(0.99) == []
    assert debouncer.pop_due(1.0) == ["a"]
    assert debouncer.next_due() == 1.5
    debouncer.touch("c", 1.2)
    assert debouncer.pop_all() == ["b", "c"]
    assert len(debouncer) == 0 and debouncer.pop_due(100) == []


def test_debouncer_pop_due_earliest_first() -> None:
    debouncer: Debouncer[str] = Debouncer(2.0)
    for key, at in [("x", 0.3), ("y", 0.1), ("z", 0.2)]:
        debouncer.touch(key, at)
    assert debouncer.pop_due(10) == ["y", "z", "x"]


@given(
    st.lists(st.integers(0, 2000), min_size=1, max_size=60).map(
        lambda xs: sorted(x / 100 for x in xs)
    ),
    st.integers(1, 300).map(lambda w: w / 100),
)
def test_debouncer_at_most_once_per_window_and_at_most_one_window_late(
    touches: list[float], window: float
) -> None:
    debouncer: Debouncer[str] = Debouncer(window)
    fired: list[float] = []
    pending = list(touches)
    while pending or debouncer.next_due() is not None:
        due = debouncer.next_due()
        if due is not None and (not pending or due <= pending[0]):
            assert debouncer.pop_due(due) == ["k"]
            fired.append(due)
        else:
            debouncer.touch("k", pending.pop(0))
    for earlier, later in itertools.pairwise(fired):
        assert later - earlier >= window - 1e-9
    for touched in touches:
        assert any(touched <= f <= touched + window + 1e-9 for f in fired)


# ------------------------------------------------------------------ TokenBucket


def test_token_bucket_refill_math() -> None:
    bucket = TokenBucket(rate=2.0, capacity=4.0, now=0.0)
    assert bucket.try_take(3, 0.0)
    assert not bucket.try_take(2, 0.0)  # 1 left
    assert bucket.ready_at(2, 0.0) == pytest.approx(0.5)
    assert not bucket.try_take(2, 0.25)  # 1.5
    assert bucket.try_take(2, 0.5)  # 2.0
    assert bucket.ready_at(1, 0.5) == pytest.approx(1.0)
    # a long idle period banks at most `capacity`
    assert bucket.try_take(4, 100.0)
    assert not bucket.try_take(1, 100.0)
    assert bucket.ready_at(1, 100.0) == pytest.approx(100.5)


def test_token_bucket_cost_capped_and_clock_going_backwards() -> None:
    bucket = TokenBucket(rate=1.0, capacity=2.0, now=10.0)
    assert bucket.try_take(50, 10.0)  # a cost above capacity takes the whole bucket
    assert bucket.ready_at(50, 10.0) == pytest.approx(12.0)
    assert not bucket.try_take(1, 5.0)  # time going backwards adds nothing
    assert bucket.try_take(1, 11.0)


def test_token_bucket_defaults() -> None:
    assert TokenBucket(rate=500.0).capacity == 500.0
    slow = TokenBucket(rate=0.5, now=0.0)
    assert slow.capacity == 1.0
    assert slow.try_take(1, 0.0)
    assert slow.ready_at(1, 0.0) == pytest.approx(2.0)
    assert slow.ready_at(0, 0.0) == 0.0


def test_token_bucket_sustained_rate() -> None:
    bucket = TokenBucket(rate=10.0, capacity=10.0, now=0.0)
    taken = sum(bucket.try_take(1, k / 1000) for k in range(10_001))  # every ms for 10 s
    assert taken == pytest.approx(10 + 100, abs=1)


# ------------------------------------------------------------------ writers

MARKETS = [f"m{i}" for i in range(1, 7)]


def _snapshot(asset: str, bid: str, ask: str) -> AssetBook:
    book = AssetBook(asset)
    book.apply_snapshot(
        BookSnapshot(
            asset_id=asset,
            condition_id="",
            bids=(Level(Decimal(bid), Decimal(10)),),
            asks=(Level(Decimal(ask), Decimal(10)),),
            timestamp_ms=1,
            hash="",
        )
    )
    return book


def _world() -> tuple[Books, Catalog]:
    """Markets m1..m6, each with a YES (0.40/0.42) and a NO (0.58/0.60) book."""
    books = Books()
    catalog = Catalog()
    for market in MARKETS:
        yes, no = f"{market}-yes", f"{market}-no"
        books[yes] = _snapshot(yes, "0.40", "0.42")
        books[no] = _snapshot(no, "0.58", "0.60")
        catalog.tokens[market] = (yes, no)
        catalog.keys[yes] = catalog.keys[no] = market
    return books, catalog


def _prices(*markets: str) -> list[tuple[str, Decimal]]:
    out = []
    for market in markets:
        out += [(f"{market}-yes", Decimal("0.41")), (f"{market}-no", Decimal("0.59"))]
    return out


class Sink:
    """A fake database call: records (virtual time, items); fails ``fail`` times first."""

    def __init__(self, fail: int = 0) -> None:
        self.calls: list[tuple[float, list[Any]]] = []
        self.failures: list[float] = []
        self.fail = fail

    async def __call__(self, items: list[Any]) -> Written:
        await trio.lowlevel.checkpoint()
        now = trio.current_time()
        if self.fail:
            self.fail -= 1
            self.failures.append(now)
            raise DatabaseError("connection refused")
        self.calls.append((now, list(items)))
        return Written(len(items))

    @property
    def times(self) -> list[float]:
        return [at for at, _ in self.calls]


def _position_writer(
    sink: Sink, *, debounce: float = 1.0, rate: float = 1000.0
) -> tuple[PositionWriter, Catalog]:
    books, catalog = _world()
    writer = PositionWriter(
        books=books,
        catalog=catalog,
        stats=Stats(),
        sink=sink,
        price_choice="display",
        debounce=debounce,
        rate=rate,
    )
    return writer, catalog


async def _touch_at(writer: PositionWriter, at: float, *markets: str) -> None:
    """Touch ``markets`` at virtual time ``at``, after the writer is done with ``at``."""
    await trio.sleep_until(at)
    await wait_all_tasks_blocked()
    for market in markets:
        writer.touch(market, trio.current_time())


async def test_position_writer_debounce_max_wait(autojump_clock: trio.testing.MockClock) -> None:
    sink = Sink()
    writer, _ = _position_writer(sink)
    touches = [k / 10 for k in range(50)]  # every 0.1 s for 5 s
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        for at in touches:
            await _touch_at(writer, at, "m1")
        await trio.sleep_until(20)
        nursery.cancel_scope.cancel()
    assert sink.times == pytest.approx([1.0, 2.0, 3.0, 4.0, 5.0])
    assert all(items == _prices("m1") for _, items in sink.calls)
    for touched in touches:  # never later than one window after a change
        assert any(touched <= at <= touched + 1.0 + 1e-9 for at in sink.times)
    assert writer.stats.rows_written["positions"] == 10
    assert writer.stats.pending_positions == 0


async def test_position_writer_quiet_market_waits_one_window(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sink = Sink()
    writer, _ = _position_writer(sink, debounce=2.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        await _touch_at(writer, 0.3, "m1")
        await _touch_at(writer, 7.0, "m2", "m3")
        await trio.sleep_until(30)
        nursery.cancel_scope.cancel()
    assert sink.times == pytest.approx([2.3, 9.0])
    assert [items for _, items in sink.calls] == [_prices("m1"), _prices("m2", "m3")]


async def test_position_writer_rate_limit_defers_without_dropping(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sink = Sink()
    writer, _ = _position_writer(sink, rate=2.0)  # 2 position rows/s, burst 2
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        await _touch_at(writer, 0.0, "m1", "m2", "m3", "m4", "m5")
        await trio.sleep_until(1.0)
        await wait_all_tasks_blocked()
        assert writer.stats.pending_positions == 3
        await trio.sleep_until(30)
        nursery.cancel_scope.cancel()
    assert sink.times == pytest.approx([1.0, 1.5, 2.0, 2.5])
    assert [items for _, items in sink.calls] == [
        _prices("m1", "m2"),
        _prices("m3"),
        _prices("m4"),
        _prices("m5"),
    ]
    assert writer.stats.pending_positions == 0


async def test_position_writer_rate_counts_positions_per_market(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sink = Sink()
    writer, catalog = _position_writer(sink, rate=2.0)
    for market in MARKETS:
        catalog.positions[market] = 2  # each market costs 2 rows
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        await _touch_at(writer, 0.0, "m1", "m2", "m3", "m4", "m5")
        await trio.sleep_until(30)
        nursery.cancel_scope.cancel()
    assert sink.times == pytest.approx([1.0, 2.0, 3.0, 4.0, 5.0])
    assert [items for _, items in sink.calls] == [_prices(m) for m in MARKETS[:5]]


async def test_position_writer_final_flush_on_cancel(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sink = Sink()
    writer, _ = _position_writer(sink, rate=2.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        await _touch_at(writer, 0.0, "m1", "m2", "m3", "m4", "m5")
        await _touch_at(writer, 1.1, "m6")  # still in its debounce window
        await trio.sleep_until(1.2)
        await wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    # m1, m2 at 1.0 (the bucket's burst); everything else, deferred or
    # debounced, in one final write at the moment of cancellation.
    assert sink.times == pytest.approx([1.0, 1.2])
    assert [items for _, items in sink.calls] == [
        _prices("m1", "m2"),
        _prices("m3", "m4", "m5", "m6"),
    ]


async def test_position_writer_idle_cancel_writes_nothing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sink = Sink()
    writer, _ = _position_writer(sink)
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        await _touch_at(writer, 0.0, "m1")
        await trio.sleep_until(5)
        nursery.cancel_scope.cancel()
    assert sink.times == pytest.approx([1.0])


async def test_position_writer_database_error_keeps_markets(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sink = Sink(fail=2)
    writer, _ = _position_writer(sink)
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        await _touch_at(writer, 0.0, "m1", "m2")
        await trio.sleep_until(60)
        nursery.cancel_scope.cancel()
    # first try at 1.0; retries after backoff uniform(0, 1) then uniform(0, 2)
    assert sink.failures[0] == pytest.approx(1.0)
    assert len(sink.failures) == 2
    assert 1.0 <= sink.failures[1] <= 2.0 + 1e-9
    assert len(sink.calls) == 1
    at, items = sink.calls[0]
    assert sink.failures[1] <= at <= sink.failures[1] + 2.0 + 1e-9
    assert items == _prices("m1", "m2")  # none lost
    assert writer.stats.rows_written["positions"] == 4


async def test_position_writer_touches_during_outage_are_kept(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sink = Sink(fail=1)
    writer, _ = _position_writer(sink)
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        await _touch_at(writer, 0.0, "m1")
        await _touch_at(writer, 1.0, "m2")  # right after the failed write
        await trio.sleep_until(60)
        nursery.cancel_scope.cancel()
    written = [token for _, items in sink.calls for token, _ in items]
    assert set(written) == {"m1-yes", "m1-no", "m2-yes", "m2-no"}
    assert sink.failures == pytest.approx([1.0])
    assert all(at <= 2.0 + 1e-9 for at in sink.times)


async def test_position_writer_skips_markets_without_prices(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sink = Sink()
    writer, catalog = _position_writer(sink)
    catalog.tokens["empty"] = ("nobook-1", "nobook-2")
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        await _touch_at(writer, 0.0, "empty")
        await _touch_at(writer, 3.0, "m1")
        await trio.sleep_until(10)
        nursery.cancel_scope.cancel()
    assert sink.times == pytest.approx([4.0])
    assert sink.calls[0][1] == _prices("m1")


def _market_writer(sink: Sink, interval: float = 0.25) -> MarketWriter:
    books, catalog = _world()
    return MarketWriter(books=books, catalog=catalog, stats=Stats(), sink=sink, interval=interval)


def _row(market: str) -> MarketRow:
    return MarketRow(
        market_id=market,
        prices='["0.41","0.59"]',
        has_book=True,
        best_bid=Decimal("0.40"),
        best_ask=Decimal("0.42"),
        mid=Decimal("0.41"),
        last_trade=None,
        tick=None,
    )


async def _mtouch_at(writer: MarketWriter, at: float, *markets: str) -> None:
    await trio.sleep_until(at)
    await wait_all_tasks_blocked()
    for market in markets:
        writer.touch(market)


async def test_market_writer_coalesces(autojump_clock: trio.testing.MockClock) -> None:
    sink = Sink()
    writer = _market_writer(sink)
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        await _mtouch_at(writer, 0.0, "m2", "m1")
        for k in range(1, 20):
            await _mtouch_at(writer, k / 100, "m1", "m2", "m1")
        await _mtouch_at(writer, 0.2, "m3")
        await trio.sleep_until(5)
        nursery.cancel_scope.cancel()
    assert sink.times == pytest.approx([0.25])
    assert sink.calls[0][1] == [_row("m1"), _row("m2"), _row("m3")]
    assert writer.stats.rows_written["markets"] == 3
    assert writer.stats.pending_markets == 0


async def test_market_writer_interval(autojump_clock: trio.testing.MockClock) -> None:
    sink = Sink()
    writer = _market_writer(sink)
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        for k in range(10):  # every 0.1 s for 1 s
            await _mtouch_at(writer, k / 10, "m1")
        await trio.sleep_until(5)
        nursery.cancel_scope.cancel()
    # first change after a flush + one interval
    assert sink.times == pytest.approx([0.25, 0.55, 0.85, 1.15])
    assert all(items == [_row("m1")] for _, items in sink.calls)
    gaps = [b - a for a, b in itertools.pairwise(sink.times)]
    assert all(gap >= 0.25 - 1e-9 for gap in gaps)


async def test_market_writer_retries_after_database_error(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sink = Sink(fail=1)
    writer = _market_writer(sink)
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        await _mtouch_at(writer, 0.0, "m1")
        await _mtouch_at(writer, 0.3, "m2")  # during the outage
        await trio.sleep_until(10)
        nursery.cancel_scope.cancel()
    assert sink.failures == pytest.approx([0.25])
    # backoff uniform(0, 0.25), then one interval
    assert len(sink.calls) >= 1
    first_ok = sink.calls[0][0]
    assert 0.5 - 1e-9 <= first_ok <= 0.75 + 1e-9
    written = [row.market_id for _, rows in sink.calls for row in rows]
    assert sorted(set(written)) == ["m1", "m2"]
    assert written.count("m1") == 1


async def test_market_writer_final_flush_on_cancel(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sink = Sink()
    writer = _market_writer(sink, interval=1.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        await _mtouch_at(writer, 0.0, "m1", "m4")
        await trio.sleep_until(0.4)
        await wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    assert sink.times == pytest.approx([0.4])
    assert sink.calls[0][1] == [_row("m1"), _row("m4")]


async def test_market_writer_unknown_market_writes_nothing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sink = Sink()
    writer = _market_writer(sink)
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        await _mtouch_at(writer, 0.0, "not-in-catalog")
        await trio.sleep_until(3)
        nursery.cancel_scope.cancel()
    assert sink.calls == []
    assert writer.dirty == set()


class CancellingSink(Sink):
    """
    Shutdown requested just as a write starts: the first call cancels ``scope``
    before its first checkpoint (as ``DbLink.call``'s lock acquire would see it).
    """

    def __init__(self) -> None:
        super().__init__()
        self.scope: trio.CancelScope | None = None

    async def __call__(self, items: list[Any]) -> Written:
        if self.scope is not None:
            scope, self.scope = self.scope, None
            scope.cancel()
        return await super().__call__(items)


async def test_market_writer_cancel_during_write_still_flushes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sink = CancellingSink()
    writer = _market_writer(sink)
    async with trio.open_nursery() as nursery:
        sink.scope = nursery.cancel_scope
        await nursery.start(writer.run)
        await _mtouch_at(writer, 0.0, "m1")
        await trio.sleep_until(10)
    assert sink.times == pytest.approx([0.25])
    assert sink.calls[0][1] == [_row("m1")]


async def test_position_writer_cancel_during_write_still_flushes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sink = CancellingSink()
    writer, _ = _position_writer(sink)
    async with trio.open_nursery() as nursery:
        sink.scope = nursery.cancel_scope
        await nursery.start(writer.run)
        await _touch_at(writer, 0.0, "m1")
        await trio.sleep_until(10)
    assert sink.times == pytest.approx([1.0])
    assert sink.calls[0][1] == _prices("m1")


async def test_slices_yield_only_once_their_budget_is_used_up() -> None:
    spent, fresh = Slices(0.0), Slices(3600.0)
    assert await spent.tick() and await spent.tick()  # a budget of 0: every tick yields
    assert not await fresh.tick()  # an hour of budget: none does
