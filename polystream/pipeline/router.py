"""
The router: applies each frame's events to the books (:class:`~polystream.book.Books`)
and tells the writers and the listeners (the monitor) which markets moved.

Pure CPU, no waiting: the writers' ``touch`` only marks keys, the monitor
checks the crossed rules inline. Bad input the books refused or repaired is
counted and logged once per kind per 10 s; books that need a REST copy are
handed to the resync (:mod:`polystream.pipeline.resync`).

The router checkpoints every :data:`~polystream.feed.pool.SLICE_SECONDS` of
work: inside a big frame (an initial dump: hundreds of books, applied a few
books at a time) and between the frames it drains without waiting.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection
from decimal import Decimal

import attrs
import structlog
import trio

from polystream.book import Applied, AssetBook, Books
from polystream.catalog import Catalog
from polystream.feed.pool import SLICE_SECONDS, FrameEvents
from polystream.feed.protocol import BookSnapshot, FeedEvent
from polystream.logs import RateLimitedLog
from polystream.pipeline.writers import MarketWriter, PositionWriter
from polystream.timing import Slices

__all__ = ["Router"]

logger = structlog.get_logger(__name__)

_SLICE_EVENTS = 8
"""Events of a big frame applied between two looks at the clock."""


# ------------------------------------------------------------------ router


@attrs.define(eq=False)
class Router:
    """
    Applies events to the books and tells the writers which markets moved.

    Pure CPU, no waiting: the writers' ``touch`` only marks keys.
    ``resync(asset_id, reason)`` is told of books that need a REST copy
    (:class:`~polystream.pipeline.resync.BookResync`.request); REST copies come back
    through :meth:`apply_rest_book`. ``after_frame()`` is called after each
    frame :meth:`run` applies, in the router's task (the executor's
    :meth:`~polystream.monitor.executor.Executor.pump`: what the frame decided
    goes out before the next frame, with no scheduling round).
    """

    books: Books
    catalog: Catalog
    markets: MarketWriter
    positions: PositionWriter
    listeners: list[Callable[[str, AssetBook], None]] = attrs.field(factory=list)
    resync: Callable[[str, str], None] | None = None
    after_frame: Callable[[], None] | None = None
    _log_limit: RateLimitedLog = attrs.field(factory=RateLimitedLog)
    frames_applied: int = 0

    def book(self, asset_id: str) -> AssetBook:
        """The book of ``asset_id``, created empty on first use."""
        return self.books.book(asset_id)

    def apply(self, events: list[FeedEvent]) -> None:
        """Apply one frame's events and touch the markets they moved."""
        self.frames_applied += 1
        self._settle(self.books.apply(events))

    async def apply_in_slices(self, events: list[FeedEvent]) -> None:
        """
        :meth:`apply`, checkpointing after each :data:`SLICE_SECONDS` of
        work (a few books of a dump at a time). Each slice's moved markets are
        touched before the checkpoint: other tasks see whole events, in order.
        """
        self.frames_applied += 1
        slices = Slices(SLICE_SECONDS)
        for first in range(0, len(events), _SLICE_EVENTS):
            self._settle(self.books.apply(events[first : first + _SLICE_EVENTS]))
            await slices.tick()

    def _settle(self, applied: Applied) -> None:
        """Count what the books refused, hand on resyncs, touch what moved."""
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

    def _moved(self, asset_ids: Collection[str]) -> None:
        """
        Tell the writers (once per market: a price change often moves both
        of a market's outcomes) and the listeners (the monitor, once per
        asset) that these books moved.
        """
        now = trio.current_time()
        key_of = self.catalog.key_of
        for market in {key_of(asset_id) for asset_id in asset_ids}:
            self.markets.touch(market)
            self.positions.touch(market, now)
        books = self.books
        for listener in self.listeners:
            for asset_id in asset_ids:
                listener(asset_id, books[asset_id])

    def apply_quote(
        self, asset_id: str, best_bid: Decimal | None, best_ask: Decimal | None
    ) -> None:
        """
        A quote polled over REST (HTTP fallback; probabilities, None = empty
        side): replaces the asset's top of book, written with
        ``source = 'poll'`` and seen by the monitor.
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
        """
        Consume frames until the channel closes or the task is cancelled.

        What queued meanwhile is drained without a checkpoint for up to
        :data:`SLICE_SECONDS`; a big frame (:class:`FrameEvents`) is applied
        in slices and its ``applied`` event set after (even on failure or
        cancellation: its sender waits for it).
        """
        async with receive:
            async for events in receive:
                started = time.perf_counter()
                while True:
                    if isinstance(events, FrameEvents):
                        try:
                            await self.apply_in_slices(events)
                        finally:
                            events.applied.set()
                        started = time.perf_counter()
                    else:
                        self.apply(events)
                    if self.after_frame is not None:
                        self.after_frame()
                    if time.perf_counter() - started > SLICE_SECONDS:
                        break  # the loop's receive checkpoints
                    try:
                        events = receive.receive_nowait()
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break  # the loop's next receive ends on a closed channel
