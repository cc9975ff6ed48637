"""
Redis cache invalidation: after each committed flush, the keys of what
changed are deleted (or published) in the services' Redis (``[cache]``,
off by default; docs/architecture.md, "The database contract").

The writers hand over what they committed (``after_write``: market ids,
user ids) and go on at once: :meth:`CacheInvalidator.changed` only adds keys
to a pending set. One task sends that set to Redis, all of it in one
pipelined round trip, through a worker thread (redis-py is blocking; the
``redis`` package, https://redis.readthedocs.io/). A busy market therefore
costs one key per round trip, not one per event, and keys that change while
a round trip is out go in the next.

Redis being down (or slow) never slows a price write: the pending set keeps
growing only by distinct keys (bounded by the markets, tokens and users
known), the round trip is retried with backoff, the outage is reported
(``/health`` ``cache``, ``polystream status``, ``polystream_cache_*``), and
every key still pending is sent once Redis answers again.

Key templates (``cache.market_keys``, ``cache.price_keys``,
``cache.position_keys``) are Python format strings: ``market:{id}`` with
``{id}`` the ``markets.id``, ``price:{token_id}`` for each CLOB token id of
a market written (``{id}`` also allowed), ``positions:{user_id}`` with
``positions.user_id``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import attrs
import orjson
import structlog
import trio

from polystream.catalog import Catalog
from polystream.config import CacheConfig
from polystream.errors import CacheError
from polystream.logs import RateLimitedLog, masked_dsn
from polystream.stats import CacheStats, Stats
from polystream.timing import Backoff, run_flushes

__all__ = ["KEYS_PER_COMMAND", "CacheInvalidator", "RedisSender", "invalidator_of"]

logger = structlog.get_logger("polystream.cache")

KEYS_PER_COMMAND = 1_000
"""Keys per ``UNLINK`` / ``PUBLISH`` of a round trip (several commands, one pipeline)."""

RETRY_MAX_SECONDS = 5.0
"""Longest wait between two tries while Redis is down, seconds."""

FINAL_SECONDS = 2.0
"""At shutdown, how long the last round trip may take, seconds."""


@attrs.define(eq=False)
class RedisSender:
    """
    The blocking half: one redis-py client (its own connection pool) that
    sends a batch of keys in one pipelined round trip. Called from a worker
    thread only (:class:`CacheInvalidator`), one call at a time.

    ``mode`` ``"delete"``: ``UNLINK`` (Redis frees the values off its main
    thread; a missing key is no error). ``"publish"``: ``PUBLISH channel
    {"keys": [...]}``, for services that keep their own in-process caches.
    """

    url: str
    mode: str
    channel: str
    timeout: float
    _client: Any = None

    def send(self, keys: Sequence[str]) -> None:
        """
        Invalidate ``keys`` (Redis key names) in one round trip.

        Raises:
            CacheError: Redis refused, timed out (``timeout`` seconds) or
                cannot be reached (redis-py's error, one line, no password);
                nothing is retried here.
        """
        import redis  # here: the daemon without [cache] never loads the client (10 MiB)
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        try:
            if self._client is None:
                self._client = redis.Redis.from_url(
                    self.url,
                    socket_timeout=self.timeout,
                    socket_connect_timeout=self.timeout,
                    retry=Retry(NoBackoff(), 0),  # our own backoff retries, with the latest keys
                )
            pipe = self._client.pipeline(transaction=False)
            for start in range(0, len(keys), KEYS_PER_COMMAND):
                chunk = keys[start : start + KEYS_PER_COMMAND]
                if self.mode == "publish":
                    pipe.publish(self.channel, orjson.dumps({"keys": chunk}))
                else:
                    pipe.unlink(*chunk)
            pipe.execute()
        except (redis.RedisError, OSError) as exc:
            message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise CacheError(masked_dsn(message)) from None

    def close(self) -> None:
        """Close the client's connections (idempotent)."""
        if self._client is not None:
            self._client.close()
            self._client = None


@attrs.define(eq=False)
class CacheInvalidator:
    """
    Coalesces the keys of committed changes and sends them to Redis from one
    task (:meth:`run`), retrying with backoff while Redis is down.

    ``send`` invalidates a batch of keys (blocking; run in a worker thread);
    it raises :class:`~polystream.errors.CacheError` when Redis fails.
    """

    config: CacheConfig
    catalog: Catalog
    stats: CacheStats
    send: Callable[[Sequence[str]], None]
    close: Callable[[], None] = lambda: None
    _pending: dict[str, float] = attrs.field(factory=dict)  # key -> commit time (trio s)
    wake: trio.Event = attrs.field(factory=trio.Event)
    _limiter: trio.CapacityLimiter = attrs.field(factory=lambda: trio.CapacityLimiter(1))
    _log: RateLimitedLog = attrs.field(factory=RateLimitedLog)

    def markets_written(self, market_ids: tuple[str, ...]) -> None:
        """A flush committed ``markets`` rows ``market_ids``: their market and price keys."""
        markets, prices = self.config.market_keys, self.config.price_keys
        keys = [t.format(id=m) for m in market_ids for t in markets]
        keys += [
            t.format(id=m, token_id=token)
            for m in market_ids
            for token in self.catalog.tokens_of(m)
            for t in prices
        ]
        self.changed(keys)

    def positions_priced(self, user_ids: tuple[str, ...]) -> None:
        """A flush committed new prices of ``user_ids``' positions: their position keys."""
        self.changed([t.format(user_id=u) for u in user_ids for t in self.config.position_keys])

    def changed(self, keys: Iterable[str]) -> None:
        """Queue ``keys`` (their change is committed now); returns at once."""
        now = trio.current_time()
        pending = self._pending
        for key in keys:
            pending.setdefault(key, now)
        self.stats.pending = len(pending)
        self.wake.set()

    async def flush(self) -> bool:
        """Send every pending key now; False (keys kept, outage counted) when Redis failed."""
        if not self._pending:
            return True
        batch, self._pending = self._pending, {}
        sent = False
        try:
            await trio.to_thread.run_sync(
                self.send, list(batch), limiter=self._limiter, abandon_on_cancel=True
            )
            sent = True
        except CacheError as exc:
            self._failed(exc, len(batch))
            return False
        finally:
            if not sent:  # failed or cancelled: they go again, with their first commit time
                self._pending = batch | self._pending
            self.stats.pending = len(self._pending)
        self._sent(batch)
        return True

    def _sent(self, batch: dict[str, float]) -> None:
        stats, now = self.stats, trio.current_time()
        for committed in set(batch.values()):
            stats.delay.observe(now - committed)
        if stats.up is False:
            assert stats.down_since is not None
            logger.info(
                "cache_up",
                target=stats.target,
                down_for_s=round(time.monotonic() - stats.down_since, 3),
                keys=len(batch),
            )
        stats.up, stats.down_since = True, None
        stats.keys += len(batch)
        stats.batches += 1

    def _failed(self, exc: BaseException, keys: int) -> None:
        stats = self.stats
        stats.errors += 1
        stats.last_error = masked_dsn(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        if stats.up is not False:
            stats.down_since = time.monotonic()
        stats.up = False
        suppressed = self._log.allow("down", time.monotonic())
        if suppressed is not None:
            logger.warning(
                "cache_down",
                target=stats.target,
                error=stats.last_error,
                keys_pending=keys + len(self._pending),
                failures_suppressed=suppressed,
            )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Send pending keys as they come, retrying with backoff; a last try on cancel."""
        try:
            await run_flushes(
                self,
                Backoff(0.1, RETRY_MAX_SECONDS),
                delay=0.0,
                final_seconds=FINAL_SECONDS,
                task_status=task_status,
            )
        finally:
            self.close()


def invalidator_of(config: CacheConfig, catalog: Catalog, stats: Stats) -> CacheInvalidator | None:
    """
    The daemon's cache invalidation for ``config`` (its stats in
    ``stats.cache``), or None when ``cache.redis_url`` is empty. Connects
    nothing: the first round trip does.
    """
    if not config.redis_url:
        return None
    stats.cache = CacheStats(target=masked_dsn(config.redis_url))
    sender = RedisSender(
        url=config.redis_url, mode=config.mode, channel=config.channel, timeout=config.timeout
    )
    return CacheInvalidator(
        config=config, catalog=catalog, stats=stats.cache, send=sender.send, close=sender.close
    )
