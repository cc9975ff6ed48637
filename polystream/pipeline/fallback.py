"""
The HTTP polling fallback: CLOB REST prices for assets whose shard is down.

While a shard is down (or was recycled as stale), nothing updates its assets.
:class:`Poller` asks ``assets_to_poll()`` (the app derives it from shard
states with :class:`ShardWatch`) every ``check_interval`` seconds and on
:meth:`Poller.wake`; while that set is non-empty it fetches best bid and best
ask of every asset in it every ``interval`` seconds (at once when polling
starts, and at once for assets that join the set mid-interval) and hands each
result to ``on_quotes(asset_id, best_bid, best_ask)``. When the set empties,
polling stops; nothing is requested while it is empty.

One task, no queue: each round asks for the current set in batches and
delivers as batches arrive; memory is bounded by the asset set. Times are
trio seconds.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterable, Sequence
from decimal import Decimal

import attrs
import structlog
import trio

from polystream.feed.pool import Shard
from polystream.venue.clob import DEFAULT_BATCH_SIZE, ClobClient, ClobError, Fetch, Quote
from polystream.venue.http import chunks

__all__ = ["OnQuotes", "Poller", "ShardWatch", "run_poller"]

logger = structlog.get_logger(__name__)

OnQuotes = Callable[[str, Decimal | None, Decimal | None], None]
"""``on_quotes(asset_id, best_bid, best_ask)``; None = unknown or empty side."""


# ---------------------------------------------------------------- shard health


@attrs.define
class ShardWatch:
    """
    Which assets need polling: those of every shard whose state has not been
    ``"connected"`` for at least ``grace`` seconds (connecting, in backoff,
    or never connected).  A stale shard counts once the feed recycles it
    (``feed.stale_after``): it is then reconnecting.

    ``now`` is ``trio.current_time()`` seconds (control time).  The time a shard went down is
    the first call that saw it down, so call this often (the poller does, at
    least every ``check_interval``).  Memory: one entry per down shard.
    """

    grace: float = 10.0
    _down_since: dict[int, float] = attrs.field(factory=dict)

    def assets(self, shards: Iterable[Shard], now: float) -> set[str]:
        """The asset ids of the shards down for ``grace`` seconds or more."""
        needed: set[str] = set()
        seen: set[int] = set()
        for shard in shards:
            seen.add(shard.index)
            if shard.stats.state == "connected":
                self._down_since.pop(shard.index, None)
                continue
            since = self._down_since.setdefault(shard.index, now)
            if now - since >= self.grace:
                needed.update(shard.assets)
        for index in [i for i in self._down_since if i not in seen]:
            del self._down_since[index]
        return needed


# ---------------------------------------------------------------- the poller


@attrs.define(eq=False)
class Poller:
    """
    Polls the assets ``assets_to_poll()`` names, while it names any.

    ``fetch(token_ids)`` returns token id -> :class:`Quote` for at most
    ``batch_size`` tokens (``ClobClient.quotes``) and raises
    :class:`ClobError` on failure.  A failed batch is counted and logged
    (``poll_failed``); the other batches still go out.  Quotes are handed to
    ``on_quotes`` only for assets still in ``assets_to_poll()`` when the
    batch arrives, so a shard that came back is not overwritten by older
    REST prices.

    Timing (``trio.current_time()`` seconds): the set is read every
    ``check_interval`` seconds and on :meth:`wake`.  When it becomes
    non-empty a full round runs at once, then every ``interval`` seconds
    (on a fixed schedule; back to back if a round overruns); assets that
    join mid-interval are polled at the next check, alone.

    Attributes:
        active: polling now (the set was non-empty at the last check).
        polls: rounds run (full rounds and rounds for joining assets).
        poll_errors: batches that failed after their retries.
        assets_polled: quotes delivered to ``on_quotes``, in total.
        assets_polling: size of the set at the last check.
        last_poll_at: ``time.monotonic()`` at the end of the last round, or None.
    """

    fetch: Fetch
    assets_to_poll: Callable[[], Collection[str]]
    on_quotes: OnQuotes
    interval: float = 60.0
    check_interval: float = 1.0
    batch_size: int = DEFAULT_BATCH_SIZE
    active: bool = False
    polls: int = 0
    poll_errors: int = 0
    assets_polled: int = 0
    assets_polling: int = 0
    last_poll_at: float | None = None
    _wake: trio.Event = attrs.field(factory=trio.Event)

    def wake(self) -> None:
        """Read the set now (e.g. when a shard disconnects) instead of at the next check."""
        self._wake.set()

    def snapshot(self, now: float) -> dict[str, object]:
        """The poller's part of ``/health``; ``now`` is ``time.monotonic()``, ages in seconds."""
        return {
            "active": self.active,
            "assets": self.assets_polling,
            "polls": self.polls,
            "errors": self.poll_errors,
            "assets_polled": self.assets_polled,
            "last_poll_age_s": None if self.last_poll_at is None else now - self.last_poll_at,
        }

    def _current(self) -> set[str]:
        assets = set(self.assets_to_poll())
        self.assets_polling = len(assets)
        return assets

    async def _wait_until(self, deadline: float) -> None:
        """Sleep until ``deadline`` or a :meth:`wake`, whichever is first."""
        with trio.move_on_at(deadline):
            await self._wake.wait()
        self._wake = trio.Event()

    async def poll(self, assets: Collection[str]) -> int:
        """
        One round: fetch ``assets`` in batches, deliver the quotes of those
        still needing polling; returns the number delivered.  Never raises
        :class:`ClobError` (counted in ``poll_errors``).
        """
        delivered = 0
        for chunk in chunks(sorted(assets), self.batch_size):
            try:
                quotes = await self.fetch(chunk)
            except ClobError as exc:
                self.poll_errors += 1
                logger.warning("poll_failed", assets=len(chunk), error=str(exc)[:300])
                continue
            still = self._current()
            for asset_id in chunk:
                quote = quotes.get(asset_id)
                if quote is not None and asset_id in still:
                    self.on_quotes(asset_id, quote.best_bid, quote.best_ask)
                    delivered += 1
        self.polls += 1
        self.assets_polled += delivered
        self.last_poll_at = time.monotonic()
        return delivered

    async def _idle(self) -> set[str]:
        """Wait until the set is non-empty; returns it."""
        while True:
            assets = self._current()
            if assets:
                return assets
            await self._wait_until(trio.current_time() + self.check_interval)

    async def _polling(self, assets: set[str]) -> None:
        """Poll until the set is empty."""
        next_round = trio.current_time()
        covered: set[str] = set()
        while assets:
            if trio.current_time() >= next_round:
                await self.poll(assets)
                covered = assets
                next_round = max(next_round + self.interval, trio.current_time())
            else:
                covered &= assets  # one that left and came back is new again
                joined = assets - covered
                if joined:
                    await self.poll(joined)
                    covered |= joined
            await self._wait_until(min(next_round, trio.current_time() + self.check_interval))
            assets = self._current()

    async def run(self, *, task_status: trio.TaskStatus[Poller] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until cancelled; ``task_status.started`` receives the poller (no I/O before)."""
        task_status.started(self)
        while True:
            assets = await self._idle()
            self.active = True
            logger.info("poll_started", assets=len(assets), interval_s=self.interval)
            try:
                await self._polling(assets)
            finally:
                self.active = False
            logger.info("poll_stopped", polls=self.polls, poll_errors=self.poll_errors)


async def run_poller(
    client: ClobClient,
    assets_to_poll: Callable[[], Collection[str]],
    on_quotes: OnQuotes,
    *,
    interval: float = 60.0,
    check_interval: float = 1.0,
    task_status: trio.TaskStatus[Poller] = trio.TASK_STATUS_IGNORED,
) -> None:
    """
    Run a :class:`Poller` over ``client`` until cancelled.

    ``task_status.started`` receives the poller (its ``wake()`` asks for a
    check now; its counters are for ``/health``).  ``interval``: seconds
    between rounds while polling; ``check_interval``: seconds between reads
    of ``assets_to_poll()``. Only ``/prices`` is asked: the midpoint follows
    from the best bid and ask.
    """

    async def fetch(token_ids: Sequence[str]) -> dict[str, Quote]:
        return await client.quotes(token_ids, midpoints=False)

    poller = Poller(
        fetch, assets_to_poll, on_quotes, interval, check_interval, batch_size=client.batch_size
    )
    await poller.run(task_status=task_status)
