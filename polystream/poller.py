"""
The HTTP polling fallback: CLOB REST prices for assets whose shard is down.

While a shard is down (or was recycled as stale), nothing updates its assets.
:class:`Poller` asks ``assets_to_poll()`` (the app derives it from shard
states with :class:`ShardWatch`) every ``check_interval`` seconds and on
:meth:`Poller.wake`; while that set is non-empty it fetches best bid, best ask
and midpoint of every asset in it every ``interval`` seconds (at once when
polling starts, and at once for assets that join the set mid-interval) and
hands each result to ``on_quotes(asset_id, best_bid, best_ask, midpoint)``.
When the set empties, polling stops; nothing is requested while it is empty.

One task, no queue: each round asks for the current set in batches and
delivers as batches arrive; memory is bounded by the asset set.

CLOB REST facts (../shared/protocol.md, sections 8 and 9; https://docs.polymarket.com
pages market-data/get-midpoint-prices-request-body and
market-data/get-market-prices-request-body), all public, no auth:

* ``POST /midpoints`` body ``[{"token_id": ...}, ...]`` answers
  ``{"<token_id>": "0.45", ...}``;
* ``POST /prices`` body ``[{"token_id": ..., "side": "BUY" | "SELL"}, ...]``
  answers ``{"<token_id>": {"BUY": 0.45, "SELL": 0.52}, ...}`` (numbers in the
  docs example, strings elsewhere: both are accepted); side ``BUY`` gives the
  best **bid**, ``SELL`` the best **ask** (live-verified: Vex-Foundation/Vex
  PR #72, py-clob-client PR #78);
* no per-request cap is documented for either (``POST /books`` takes at most
  500 items), so a request body carries at most ``batch_size`` (default 500)
  items; ``/prices`` takes two items per token;
* rate limits: 500 requests / 10 s on each of ``/prices`` and ``/midpoints``;
  overshoot is throttled, then 429;
* ``/book`` can return a stale "ghost" book while ``/price`` is right
  (py-clob-client issue #180), so ``/book`` is not used.

Prices are probabilities in [0, 1]; a value that is not a finite number in
that range is skipped and counted (``ClobClient.bad_values``).  A best bid
<= 0 or a best ask >= 1 is how the venue marks an empty side (docs/protocol.md,
"Empty sides"), and is read the same way here.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Collection, Iterable, Sequence
from contextlib import asynccontextmanager
from decimal import Decimal, InvalidOperation
from typing import Protocol

import attrs
import httpx
import orjson
import structlog
import trio

from polystream.errors import MalformedFrame, PolystreamError
from polystream.feed import Shard
from polystream.protocol import BookSnapshot, FrameParser
from polystream.rest import chunks, send_with_retries

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_CLOB_URL",
    "ClobClient",
    "ClobError",
    "Fetch",
    "OnQuotes",
    "Poller",
    "Quote",
    "ShardWatch",
    "open_clob_client",
    "prices_moved",
    "run_poller",
]

logger = structlog.get_logger(__name__)

DEFAULT_CLOB_URL = "https://clob.polymarket.com"
"""The CLOB's public REST base URL (../shared/protocol.md, section 8)."""

DEFAULT_BATCH_SIZE = 500
"""Most items in one request body (``POST /books`` is capped at 500; protocol.md, section 8)."""

_ZERO = Decimal(0)
_ONE = Decimal(1)
_TWO = Decimal(2)

OnQuotes = Callable[[str, Decimal | None, Decimal | None, Decimal | None], None]
"""``on_quotes(asset_id, best_bid, best_ask, midpoint)``; None = unknown or empty side."""


class ClobError(PolystreamError):
    """
    The CLOB could not be asked: transport errors, 429 or 5xx after every
    attempt, another 4xx, or an answer that is not a JSON object.
    """


@attrs.frozen(slots=True)
class Quote:
    """
    One asset's polled prices, probabilities in [0, 1]; None when unknown or
    the side is empty.  ``midpoint`` is the CLOB's (``/midpoints``) when it
    gave one, else ``(best_bid + best_ask) / 2`` when both sides are known.
    """

    best_bid: Decimal | None
    best_ask: Decimal | None
    midpoint: Decimal | None


class Fetch(Protocol):
    """``await fetch(token_ids)``: token id -> :class:`Quote`; raises :class:`ClobError`."""

    async def __call__(self, token_ids: Sequence[str]) -> dict[str, Quote]:
        """Quotes of ``token_ids`` (probabilities in [0, 1]); absent ids are unknown."""
        ...


def _probability(value: object) -> Decimal | None:
    """``value`` as a Decimal in [0, 1] (a JSON number or a decimal string), else None."""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        return None
    try:
        number = Decimal(value) if isinstance(value, str) else Decimal(str(value))
    except InvalidOperation:
        return None
    if not number.is_finite() or not _ZERO <= number <= _ONE:
        return None
    return number


def _side(
    token_id: str, sides: dict[str, object], side: str, bad: list[tuple[str, object]]
) -> Decimal | None:
    """
    One side of a ``/prices`` entry; None if absent, empty (a bid <= 0 or an
    ask >= 1: docs/protocol.md, "Empty sides") or bad (noted in ``bad``).
    """
    if side not in sides:
        return None
    price = _probability(sides[side])
    if price is None:
        bad.append((token_id, sides[side]))
        return None
    empty = price <= _ZERO if side == "BUY" else price >= _ONE
    return None if empty else price


@attrs.define(eq=False)
class ClobClient:
    """
    CLOB REST prices over an :class:`httpx.AsyncClient` whose ``base_url`` is
    the CLOB's (httpx runs under trio through anyio).  Build one with
    :func:`open_clob_client`.

    A request body carries at most ``batch_size`` items.  Each request is
    tried at most ``attempts`` times; waits between tries grow from
    ``wait_initial`` seconds, doubling, plus up to ``wait_initial`` of jitter,
    capped at ``wait_max`` (a 429's ``Retry-After`` seconds replace the wait).

    Attributes:
        requests: HTTP requests sent, retries included.
        bad_values: prices skipped because they were not a number in [0, 1].
    """

    http: httpx.AsyncClient
    batch_size: int = DEFAULT_BATCH_SIZE
    attempts: int = 5
    wait_initial: float = 0.5
    wait_max: float = 10.0
    requests: int = 0
    bad_values: int = 0

    async def _post(self, path: str, body: list[dict[str, str]]) -> dict[str, object]:
        """POST ``body`` as JSON with retries; the decoded JSON object. Raises ClobError."""
        answer = await self._post_json(path, body)
        if not isinstance(answer, dict):
            raise ClobError(f"POST {path}: expected a JSON object, got {type(answer).__name__}")
        return answer

    async def _post_json(self, path: str, body: list[dict[str, str]]) -> object:
        """POST ``body`` as JSON with retries; the decoded JSON answer. Raises ClobError."""
        content = orjson.dumps(body)
        headers = {"content-type": "application/json"}
        async def send() -> httpx.Response:
            self.requests += 1
            return await self.http.post(path, content=content, headers=headers)

        try:
            response = await send_with_retries(
                send,
                attempts=self.attempts,
                wait_initial=self.wait_initial,
                wait_max=self.wait_max,
            )
        except httpx.HTTPStatusError as exc:
            raise ClobError(f"POST {path}: HTTP {exc.response.status_code} from CLOB") from exc
        except httpx.HTTPError as exc:
            raise ClobError(f"POST {path}: {type(exc).__name__}: {exc}") from exc
        try:
            return orjson.loads(response.content)
        except orjson.JSONDecodeError as exc:
            raise ClobError(f"POST {path}: answer is not JSON") from exc

    async def books(self, token_ids: Sequence[str], parser: FrameParser) -> list[BookSnapshot]:
        """
        ``POST /books`` (body ``[{"token_id": ...}, ...]``, at most
        ``batch_size`` and never more than 500 items a request; protocol.md
        section 8): the books the CLOB knows of ``token_ids``, parsed like
        WebSocket ``book`` events (hash checked: a REST book carries
        ``min_order_size`` and ``neg_risk``). A book that cannot be parsed is
        counted in ``bad_values`` and skipped.

        Raises:
            ClobError: a request failed after its retries, or the answer is
                not a JSON array.
        """
        books: list[BookSnapshot] = []
        for chunk in chunks(token_ids, min(self.batch_size, DEFAULT_BATCH_SIZE)):
            answer = await self._post_json("/books", [{"token_id": t} for t in chunk])
            if not isinstance(answer, list):
                raise ClobError(f"POST /books: expected a JSON array, got {type(answer).__name__}")
            bad: list[tuple[str, object]] = []
            for item in answer:
                try:
                    books.append(parser.book(item))
                except MalformedFrame as exc:
                    bad.append((str(item.get("asset_id")) if isinstance(item, dict) else "?", exc))
            self._report_bad("/books", bad)
        return books

    def _report_bad(self, path: str, bad: list[tuple[str, object]]) -> None:
        """Count the bad values of one answer; one log line per answer, with a sample."""
        if bad:
            self.bad_values += len(bad)
            token_id, value = bad[0]
            logger.warning(
                "clob_bad_values",
                path=path,
                count=len(bad),
                token_id=token_id,
                value=repr(value)[:100],
            )

    async def midpoints(self, token_ids: Sequence[str]) -> dict[str, Decimal]:
        """
        ``POST /midpoints`` in requests of at most ``batch_size`` tokens:
        token id -> midpoint.  Tokens the CLOB omits, ids not asked for and
        bad values are absent (bad ones are counted in ``bad_values``).

        Raises:
            ClobError: a request failed after its retries.
        """
        result: dict[str, Decimal] = {}
        for chunk in chunks(token_ids, self.batch_size):
            answer = await self._post("/midpoints", [{"token_id": t} for t in chunk])
            bad: list[tuple[str, object]] = []
            for token_id in chunk:
                if token_id not in answer:
                    continue
                mid = _probability(answer[token_id])
                if mid is None:
                    bad.append((token_id, answer[token_id]))
                else:
                    result[token_id] = mid
            self._report_bad("/midpoints", bad)
        return result

    async def prices(
        self, token_ids: Sequence[str]
    ) -> dict[str, tuple[Decimal | None, Decimal | None]]:
        """
        ``POST /prices`` (sides ``BUY`` and ``SELL`` of each token, so at
        most ``batch_size // 2`` tokens per request): token id ->
        ``(best_bid, best_ask)``.  A missing side, a bid of 0 or an ask of 1
        is None (empty side); a bid <= 0 or an ask >= 1 too; a bad value is None and counted in
        ``bad_values``; tokens with neither side known are absent.

        Raises:
            ClobError: a request failed after its retries.
        """
        result: dict[str, tuple[Decimal | None, Decimal | None]] = {}
        size = max(1, self.batch_size // 2)
        for chunk in chunks(token_ids, size):
            body = [{"token_id": t, "side": side} for t in chunk for side in ("BUY", "SELL")]
            answer = await self._post("/prices", body)
            bad: list[tuple[str, object]] = []
            for token_id in chunk:
                sides = answer.get(token_id)
                if sides is None:
                    continue
                if not isinstance(sides, dict):
                    bad.append((token_id, sides))
                    continue
                bid = _side(token_id, sides, "BUY", bad)
                ask = _side(token_id, sides, "SELL", bad)
                if bid is not None or ask is not None:
                    result[token_id] = (bid, ask)
            self._report_bad("/prices", bad)
        return result

    async def quotes(self, token_ids: Sequence[str], *, midpoints: bool = True) -> dict[str, Quote]:
        """
        Best bid and ask (``/prices``) and, with ``midpoints``, the CLOB's
        midpoint (``/midpoints``) of ``token_ids``: token id -> :class:`Quote`,
        for the tokens the CLOB knew something of.

        Raises:
            ClobError: a request failed after its retries; nothing is returned.
        """
        sides = await self.prices(token_ids)
        mids = await self.midpoints(token_ids) if midpoints else {}
        quotes: dict[str, Quote] = {}
        for token_id in token_ids:
            bid, ask = sides.get(token_id, (None, None))
            mid = mids.get(token_id)
            if mid is None and bid is not None and ask is not None:
                mid = (bid + ask) / _TWO
            if bid is not None or ask is not None or mid is not None:
                quotes[token_id] = Quote(bid, ask, mid)
        return quotes


@asynccontextmanager
async def open_clob_client(
    url: str = DEFAULT_CLOB_URL,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    request_timeout: float = 10.0,
    attempts: int = 5,
    wait_initial: float = 0.5,
    wait_max: float = 10.0,
) -> AsyncIterator[ClobClient]:
    """
    Open an HTTP client for the CLOB at ``url`` and close it on exit.

    ``request_timeout`` bounds each HTTP attempt (connect, read, write, pool),
    in seconds; see :class:`ClobClient` for the other arguments.
    """
    async with httpx.AsyncClient(
        base_url=url.rstrip("/"),
        timeout=request_timeout,
        headers={"accept": "application/json", "user-agent": "polystream"},
    ) as http:
        yield ClobClient(http, batch_size, attempts, wait_initial, wait_max)


# ---------------------------------------------------------------- shard health


@attrs.define
class ShardWatch:
    """
    Which assets need polling: those of every shard whose state has not been
    ``"connected"`` for at least ``grace`` seconds (connecting, in backoff,
    or never connected).  A stale shard counts once the feed recycles it
    (``feed.stale_after``): it is then reconnecting.

    ``now`` is ``time.monotonic()`` seconds (the clock of
    :class:`~polystream.stats.ShardStats`).  The time a shard went down is
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
                    self.on_quotes(asset_id, quote.best_bid, quote.best_ask, quote.midpoint)
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
    midpoints: bool = True,
    task_status: trio.TaskStatus[Poller] = trio.TASK_STATUS_IGNORED,
) -> None:
    """
    Run a :class:`Poller` over ``client`` until cancelled.

    ``task_status.started`` receives the poller (its ``wake()`` asks for a
    check now; its counters are for ``/health``).  ``interval``: seconds
    between rounds while polling; ``check_interval``: seconds between reads
    of ``assets_to_poll()``; ``midpoints``: also ask ``/midpoints`` (else
    the midpoint is computed from best bid and ask).
    """

    async def fetch(token_ids: Sequence[str]) -> dict[str, Quote]:
        return await client.quotes(token_ids, midpoints=midpoints)

    poller = Poller(
        fetch, assets_to_poll, on_quotes, interval, check_interval, batch_size=client.batch_size
    )
    await poller.run(task_status=task_status)


# ---------------------------------------------------------------- stale check


async def prices_moved(
    client: ClobClient,
    tops: Callable[[str], tuple[Decimal | None, Decimal | None] | None],
    asset_ids: Sequence[str],
) -> bool:
    """
    True when the CLOB's best bid or ask of some asset differs from ours:
    a feed that delivered nothing meanwhile is then silently dead.  Fits
    ``FeedPool.stale_check`` (``partial(prices_moved, client, tops)``).

    ``tops(asset_id)`` gives our ``(best_bid, best_ask)``, or None when we
    know no book for it (such assets are not compared).  A CLOB failure is
    logged (``stale_check_failed``) and answers False: without evidence the
    link is left alone.
    """
    try:
        quotes = await client.prices(asset_ids)
    except ClobError as exc:
        logger.warning("stale_check_failed", assets=len(asset_ids), error=str(exc)[:300])
        return False
    for asset_id, remote in quotes.items():
        ours = tops(asset_id)
        if ours is not None and ours != remote:
            return True
    return False
