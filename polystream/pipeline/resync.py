"""
REST copies of books the feed no longer keeps right.

Two things make a local book untrustworthy on the real venue
(docs/protocol.md, "What the venue really does"):

* a real ``tick_size_change`` (0.01 -> 0.001 near 0.96 / 0.04) is *not*
  followed by a fresh ``book``: the venue keeps sending ``price_change``
  frames, whose per-entry ``best_bid`` / ``best_ask`` keep the quote right
  but not the depth;
* a ``book`` whose hash does not match its levels (the hash may reproduce only
  with a later last trade price, so it is a reason to resync, never to drop).

The router marks such a book (:meth:`polystream.book.AssetBook.begin_resync`,
which buffers its level changes) and calls :meth:`BookResync.request`. One
task fetches the requested books with ``POST /books`` (at most 500 per
request), at most one request per ``min_interval`` seconds and each asset at
most once per ``asset_interval`` seconds, and hands each REST book to
``deliver`` (the router's ``apply_rest_book``: the REST levels, then the
buffered changes newer than them). This is the resync NautilusTrader issue
#4635 asks for: fetch the REST book, buffer the deltas meanwhile, apply those
newer than the REST book's timestamp.

Times are ``trio.current_time()`` seconds, so the pacing is tested under
``trio.testing.MockClock``.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import attrs
import structlog
import trio

from polystream.errors import PolystreamError
from polystream.feed.protocol import BookSnapshot
from polystream.timing import Backoff

__all__ = ["MAX_BOOKS_PER_REQUEST", "BookResync", "FetchBooks"]

logger = structlog.get_logger(__name__)

MAX_BOOKS_PER_REQUEST = 500
"""``POST /books`` takes at most 500 items (docs/protocol.md, "CLOB REST")."""

FetchBooks = Callable[[Sequence[str]], Awaitable[list[BookSnapshot]]]
"""``await fetch(asset_ids)``: the REST books of those assets; raises a PolystreamError."""


@attrs.define(eq=False)
class BookResync:
    """
    Fetches REST copies of the books :meth:`request` names, rate-bounded.

    Attributes:
        fetch: ``POST /books`` for a batch of asset ids (``ClobClient.books``);
            a :class:`~polystream.errors.PolystreamError` (``ClobError``) is
            counted, logged and retried with backoff; nothing is dropped.
        deliver: receives each REST book of a requested asset.
        min_interval: seconds between two requests.
        asset_interval: seconds before the same asset is fetched again.
        batch_size: assets per request (at most 500).
        retry_max: longest wait after failed requests, seconds.
        requested: requests by reason (``tick_size_change``, ``hash_mismatch``).
        fetched: REST books delivered.
        missing: assets asked for that the answer did not contain.
        failures: requests that failed after their retries.
    """

    fetch: FetchBooks
    deliver: Callable[[BookSnapshot], None]
    min_interval: float = 0.5
    asset_interval: float = 10.0
    batch_size: int = MAX_BOOKS_PER_REQUEST
    retry_max: float = 30.0
    requested: Counter[str] = attrs.field(factory=Counter)
    fetched: int = 0
    missing: int = 0
    failures: int = 0
    _pending: dict[str, str] = attrs.field(factory=dict)  # asset id -> reason, oldest first
    _last: dict[str, float] = attrs.field(factory=dict)  # asset id -> when it was fetched
    _wake: trio.Event = attrs.field(factory=trio.Event)

    def request(self, asset_id: str, reason: str) -> None:
        """Ask for a REST copy of ``asset_id``'s book (never blocks; repeated asks coalesce)."""
        self.requested[reason] += 1
        if asset_id not in self._pending:
            self._pending[asset_id] = reason
            self._wake.set()

    @property
    def pending(self) -> int:
        """Assets waiting for their REST copy."""
        return len(self._pending)

    def snapshot(self) -> dict[str, Any]:
        """The resync's part of ``/health``."""
        return {
            "pending": len(self._pending),
            "requested": dict(self.requested),
            "fetched": self.fetched,
            "missing": self.missing,
            "failures": self.failures,
        }

    def _due(self, now: float) -> tuple[list[str], float]:
        """Assets that may be fetched now (at most ``batch_size``), and when the next one may."""
        due: list[str] = []
        next_at = math.inf
        for asset_id in self._pending:
            at = self._last.get(asset_id, -math.inf) + self.asset_interval
            if at <= now:
                due.append(asset_id)
                if len(due) == min(self.batch_size, MAX_BOOKS_PER_REQUEST):
                    break
            else:
                next_at = min(next_at, at)
        return due, next_at

    def _forget_old(self, now: float) -> None:
        """Bound memory: fetch times older than ``asset_interval`` no longer matter."""
        if len(self._last) > 4 * MAX_BOOKS_PER_REQUEST:
            self._last = {a: t for a, t in self._last.items() if t + self.asset_interval > now}

    async def _fetch(self, due: list[str]) -> bool:
        """One request; False when it failed (the assets stay pending)."""
        try:
            books = await self.fetch(due)
        except PolystreamError as exc:
            self.failures += 1
            logger.warning("book_resync_failed", assets=len(due), error=str(exc)[:300])
            return False
        wanted = set(due)
        delivered = 0
        for book in books:
            if book.asset_id in wanted:
                wanted.discard(book.asset_id)
                self.deliver(book)
                delivered += 1
        self.fetched += delivered
        self.missing += len(wanted)
        for asset_id in due:
            self._pending.pop(asset_id, None)
        if wanted:
            logger.warning("book_resync_missing", assets=len(wanted), sample=sorted(wanted)[:3])
        logger.info("book_resynced", assets=delivered)
        return True

    async def run(
        self, *, task_status: trio.TaskStatus[BookResync] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Fetch requested books until cancelled; ``task_status.started`` receives ``self``."""
        backoff = Backoff(max(self.min_interval, 0.1), self.retry_max)
        next_request = -math.inf
        task_status.started(self)
        while True:
            self._wake = trio.Event()
            now = trio.current_time()
            due, next_at = self._due(now)
            if not due:
                with trio.move_on_at(next_at):
                    await self._wake.wait()
                continue
            await trio.sleep_until(next_request)
            now = trio.current_time()
            for asset_id in due:
                self._last[asset_id] = now
            ok = await self._fetch(due)
            next_request = trio.current_time() + self.min_interval
            if ok:
                backoff.reset()
                self._forget_old(now)
            else:
                for asset_id in due:
                    self._last.pop(asset_id, None)
                await trio.sleep(backoff.next_delay())
