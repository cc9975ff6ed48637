"""
Polymarket's CLOB REST API, public and without authentication: best bid and
ask (``POST /prices``), midpoints (``POST /midpoints``) and books
(``POST /books``) of many tokens at once (docs/protocol.md, "CLOB REST").

* ``POST /prices`` body ``[{"token_id": ..., "side": "BUY" | "SELL"}, ...]``
  answers ``{"<token_id>": {"BUY": 0.45, "SELL": 0.52}, ...}`` (numbers in the
  docs example, strings elsewhere: both are accepted); side ``BUY`` gives the
  best **bid**, ``SELL`` the best **ask**;
* ``POST /midpoints`` body ``[{"token_id": ...}, ...]`` answers
  ``{"<token_id>": "0.45", ...}``;
* ``POST /books`` takes at most 500 items and answers a JSON array of books
  whose hash the venue computes like a WebSocket ``book``'s;
* rate limits: 500 requests / 10 s on each (docs/protocol.md, "Rate limits");
  overshoot is throttled, then 429, which is retried after its ``Retry-After``.

Prices are probabilities in [0, 1]; a value that is not a finite number in
that range is skipped and counted (``ClobClient.bad_values``). A best bid
<= 0 or a best ask >= 1 is an empty side (docs/protocol.md, "Empty sides").
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from decimal import Decimal
from typing import Protocol

import attrs
import httpx
import orjson
import structlog

from polystream.errors import ClobError, MalformedFrame
from polystream.feed.protocol import BookSnapshot, FrameParser
from polystream.numbers import ask_or_none, bid_or_none, probability
from polystream.venue.http import chunks, open_http, send_with_retries

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_CLOB_URL",
    "ClobClient",
    "ClobError",
    "Fetch",
    "Quote",
    "open_clob_client",
    "prices_moved",
]

logger = structlog.get_logger(__name__)

DEFAULT_CLOB_URL = "https://clob.polymarket.com"
"""The CLOB's public REST base URL (docs/protocol.md, "CLOB REST")."""

DEFAULT_BATCH_SIZE = 500
"""Most items in one request body (``POST /books`` is capped at 500; docs/protocol.md, "CLOB REST")."""

_ZERO = Decimal(0)
_ONE = Decimal(1)
_TWO = Decimal(2)


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
    try:
        return probability(value)
    except ValueError:
        return None


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
    return bid_or_none(price) if side == "BUY" else ask_or_none(price)


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
    async with open_http(url, request_timeout) as http:
        yield ClobClient(http, batch_size, attempts, wait_initial, wait_max)


# ---------------------------------------------------------------- stale check


async def prices_moved(
    client: ClobClient,
    tops: Callable[[str], tuple[Decimal | None, Decimal | None] | None],
    asset_ids: Sequence[str],
) -> str | None:
    """
    How the CLOB's best bid or ask of some asset differs from ours (``"asset
    <id>: ours 0.51/0.52, venue 0.5/0.52"``, the first found), or None when
    none does: a feed that delivered nothing meanwhile is then silently dead.
    Fits ``FeedPool.stale_check`` (``partial(prices_moved, client, tops)``).

    ``tops(asset_id)`` gives our ``(best_bid, best_ask)``, or None when we
    know no book for it (such assets are not compared).  A CLOB failure is
    logged (``stale_check_failed``) and answers None: without evidence the
    link is left alone.
    """
    try:
        quotes = await client.prices(asset_ids)
    except ClobError as exc:
        logger.warning("stale_check_failed", assets=len(asset_ids), error=str(exc)[:300])
        return None
    for asset_id, remote in quotes.items():
        ours = tops(asset_id)
        if ours is not None and ours != remote:
            return f"asset {asset_id}: ours {_pair(ours)}, venue {_pair(remote)}"
    return None


def _pair(top: tuple[Decimal | None, Decimal | None]) -> str:
    return "/".join("-" if side is None else str(side) for side in top)
