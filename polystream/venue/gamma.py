"""
Polymarket's Gamma API: market metadata (docs/protocol.md, "Gamma").

``GET /markets?id=..&id=..`` and ``GET /markets?condition_ids=..`` take
repeatable parameters and answer a JSON array (unknown ids are simply absent);
pages are capped at 100 items, and at most 100 condition ids go in one request;
``GET /markets/slug/{slug}`` answers one object or 404. A new market may come
back with empty ``clobTokenIds`` for a few minutes ("hydration window"). Rate
limit: 300 requests / 10 s on ``/markets``; overshoot is 429.

Requests are retried with exponential backoff and jitter (stamina) on
transport errors, 429 and 5xx, a bounded number of times; any other 4xx is
not retried.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from typing import Literal
from urllib.parse import quote

import attrs
import httpx
import orjson
import structlog

from polystream.errors import GammaError, ImportDataError
from polystream.store.markets import GammaMarket
from polystream.venue.http import chunks, open_http, send_with_retries

__all__ = [
    "DEFAULT_GAMMA_URL",
    "MAX_PER_REQUEST",
    "GammaClient",
    "GammaError",
    "Lookup",
    "RefKind",
    "classify_ref",
    "open_gamma_client",
]

logger = structlog.get_logger(__name__)

DEFAULT_GAMMA_URL = "https://gamma-api.polymarket.com"
"""Gamma's public base URL (docs/protocol.md, "Gamma")."""

MAX_PER_REQUEST = 100

RefKind = Literal["id", "condition_id", "slug"]

_GAMMA_ID = re.compile(r"^[0-9]+$")
_CONDITION_ID = re.compile(r"^0x[0-9a-fA-F]{64}$")


def classify_ref(ref: str) -> RefKind:
    """
    Say what a market reference is: ``"id"`` (decimal digits, a Gamma market
    id such as ``"1557558"``), ``"condition_id"`` (``0x`` + 64 hex digits) or
    else ``"slug"`` (``"btc-updown-5m-1773307200"``).
    """
    if _GAMMA_ID.match(ref):
        return "id"
    if _CONDITION_ID.match(ref):
        return "condition_id"
    return "slug"


def _parse_items(items: Iterable[object]) -> list[GammaMarket]:
    """Decode market objects; a malformed one is logged and skipped."""
    markets: list[GammaMarket] = []
    for item in items:
        try:
            markets.append(GammaMarket.from_gamma(item))
        except ImportDataError as exc:
            logger.warning("gamma_market_malformed", error=str(exc)[:300])
    return markets


@attrs.frozen
class Lookup:
    """
    What Gamma answered for a list of references.

    Attributes:
        found: reference -> market.  An id matches ``GammaMarket.id``, a
            condition id ``condition_id`` (exactly), a slug the market
            ``/markets/slug/{slug}`` returned.  A found market may still have
            no ``clob_token_ids`` (Gamma's hydration window).
        unknown: references Gamma has no (well-formed) market for, in the
            order asked.
    """

    found: dict[str, GammaMarket]
    unknown: tuple[str, ...]


@attrs.define(eq=False)
class GammaClient:
    """
    Gamma market lookups over an :class:`httpx.AsyncClient` whose
    ``base_url`` is Gamma's (httpx runs under trio through anyio).

    Each request is tried at most ``attempts`` times; the waits between
    tries grow from ``wait_initial`` seconds, doubling, plus up to
    ``wait_initial`` of jitter, capped at ``wait_max`` seconds (a 429's
    ``Retry-After`` seconds, when given, replace the computed wait).
    Build one with :func:`open_gamma_client`.
    """

    http: httpx.AsyncClient
    attempts: int = 5
    wait_initial: float = 0.5
    wait_max: float = 10.0

    async def _get(self, path: str, params: httpx.QueryParams | None = None) -> httpx.Response:
        """GET with retries; returns a 2xx or 404 response. Raises GammaError."""
        try:
            return await send_with_retries(
                lambda: self.http.get(path, params=params),
                attempts=self.attempts,
                wait_initial=self.wait_initial,
                wait_max=self.wait_max,
                accept=(404,),
            )
        except httpx.HTTPStatusError as exc:
            status = exc.response.status_code
            raise GammaError(f"GET {path}: HTTP {status} from Gamma") from exc
        except httpx.HTTPError as exc:
            raise GammaError(f"GET {path}: {type(exc).__name__}: {exc}") from exc

    @staticmethod
    def _decode(path: str, response: httpx.Response) -> object:
        try:
            return orjson.loads(response.content)
        except orjson.JSONDecodeError as exc:
            raise GammaError(f"GET {path}: answer is not JSON") from exc

    async def _list(self, param: str, values: Sequence[str]) -> list[GammaMarket]:
        markets: list[GammaMarket] = []
        for chunk in chunks(values, MAX_PER_REQUEST):
            params = httpx.QueryParams([(param, value) for value in chunk])
            params = params.add("limit", str(len(chunk)))
            response = await self._get("/markets", params)
            if response.status_code == 404:
                continue
            body = self._decode("/markets", response)
            if not isinstance(body, list):
                raise GammaError(f"GET /markets: expected a JSON array, got {type(body).__name__}")
            markets.extend(_parse_items(body))
        return markets

    async def markets_by_ids(self, ids: Sequence[str]) -> list[GammaMarket]:
        """
        ``GET /markets?id=..`` in requests of at most 100 ids; unknown ids are
        absent from the result.  Raises GammaError.
        """
        return await self._list("id", ids)

    async def markets_by_condition_ids(self, condition_ids: Sequence[str]) -> list[GammaMarket]:
        """
        ``GET /markets?condition_ids=..`` in requests of at most 100; unknown
        condition ids are absent from the result.  Raises GammaError.
        """
        return await self._list("condition_ids", condition_ids)

    async def market_by_slug(self, slug: str) -> GammaMarket | None:
        """``GET /markets/slug/{slug}``; None on 404.  Raises GammaError."""
        path = f"/markets/slug/{quote(slug, safe='')}"
        response = await self._get(path)
        if response.status_code == 404:
            return None
        body = self._decode(path, response)
        markets = _parse_items(body if isinstance(body, list) else [body])  # array tolerated
        return markets[0] if markets else None

    async def lookup(self, refs: Sequence[str]) -> Lookup:
        """
        Fetch markets by mixed references (see :func:`classify_ref`): ids and
        condition ids in batches of at most 100, slugs one request each.

        Raises:
            GammaError: a request failed after its retries; nothing is returned.
        """
        kinds: dict[RefKind, list[str]] = {"id": [], "condition_id": [], "slug": []}
        for ref in dict.fromkeys(refs):
            kinds[classify_ref(ref)].append(ref)
        found: dict[str, GammaMarket] = {}
        if kinds["id"]:
            by_id = {m.id: m for m in await self.markets_by_ids(kinds["id"])}
            found.update((ref, by_id[ref]) for ref in kinds["id"] if ref in by_id)
        if kinds["condition_id"]:
            markets = await self.markets_by_condition_ids(kinds["condition_id"])
            by_cid = {m.condition_id: m for m in markets if m.condition_id}
            found.update((ref, by_cid[ref]) for ref in kinds["condition_id"] if ref in by_cid)
        for slug in kinds["slug"]:
            market = await self.market_by_slug(slug)
            if market is not None:
                found[slug] = market
        unknown = tuple(ref for ref in dict.fromkeys(refs) if ref not in found)
        return Lookup(found, unknown)


@asynccontextmanager
async def open_gamma_client(
    url: str = DEFAULT_GAMMA_URL,
    *,
    request_timeout: float = 10.0,
    attempts: int = 5,
    wait_initial: float = 0.5,
    wait_max: float = 10.0,
) -> AsyncIterator[GammaClient]:
    """
    Open an HTTP client for Gamma at ``url`` and close it on exit.

    ``request_timeout`` bounds each HTTP attempt (connect, read, write, pool),
    in seconds; see :class:`GammaClient` for the retry arguments.
    """
    async with open_http(url, request_timeout) as http:
        yield GammaClient(http, attempts, wait_initial, wait_max)
