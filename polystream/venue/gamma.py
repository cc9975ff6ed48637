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
not retried. A failure is one :class:`GammaError` line naming the host and
the HTTP status or the transport's cause, in the words the feed uses for its
connections (:func:`describe_http_failure`).
"""

from __future__ import annotations

import re
import socket
import ssl
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from typing import Literal
from urllib.parse import quote

import attrs
import httpx
import orjson
import stamina
import structlog

from polystream.errors import GammaError, ImportDataError, leaves
from polystream.store.markets import GammaMarket
from polystream.venue.http import chunks, open_http, retry_delay, send_with_retries

__all__ = [
    "DEFAULT_GAMMA_URL",
    "MAX_PER_REQUEST",
    "GammaClient",
    "GammaError",
    "Lookup",
    "RefKind",
    "classify_ref",
    "describe_http_failure",
    "open_gamma_client",
    "retries_unlogged",
]

logger = structlog.get_logger(__name__)

DEFAULT_GAMMA_URL = "https://gamma-api.polymarket.com"
"""Gamma's public base URL (docs/protocol.md, "Gamma")."""

MAX_PER_REQUEST = 100
"""Most ids or condition ids in one ``GET /markets`` (Gamma caps pages at 100)."""

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


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and its causes (``__cause__``, else ``__context__``), outermost first."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def describe_http_failure(exc: httpx.HTTPError, url: httpx.URL, timeout: float | None) -> str:
    """
    Why a request to ``url`` failed, in words naming the host: ``"HTTP 503
    Service Unavailable from gamma-api.polymarket.com"``, ``"connection
    refused by 127.0.0.1:9"``, ``"host not found: ... (Name or service not
    known)"``, ``"no answer from HOST within 10 s"``, ``"TLS failed with HOST:
    ..."``. ``timeout`` is the request timeout in seconds (for the words).
    """
    host = url.netloc.decode("ascii", "replace") or "?"
    if isinstance(exc, httpx.HTTPStatusError):
        code = exc.response.status_code
        reason = exc.response.reason_phrase or httpx.codes.get_reason_phrase(code)
        status = f"{code} {reason}".rstrip()
        return f"HTTP {status} from {host}"
    if isinstance(exc, httpx.TimeoutException):
        within = f" within {timeout:g} s" if timeout is not None else ""
        if isinstance(exc, httpx.ConnectTimeout):
            return f"no connection to {host}{within}"
        return f"no answer from {host}{within}"
    causes = [leaf for e in _chain(exc) for leaf in leaves(e)]
    gai = next((e for e in causes if isinstance(e, socket.gaierror)), None)
    if gai is not None:
        return f"host not found: {url.host} ({gai.strerror})"
    if any(isinstance(e, ConnectionRefusedError) for e in causes):
        return f"connection refused by {host}"
    tls = next((e for e in causes if isinstance(e, ssl.SSLError)), None)
    if tls is not None:
        return f"TLS failed with {host}: {tls}"
    oserror = next((e for e in causes if isinstance(e, OSError) and e.strerror), None)
    if oserror is not None:
        return f"cannot connect to {host}: {oserror.strerror}"
    if isinstance(exc, httpx.RemoteProtocolError):
        return f"{host} closed the connection without an answer ({exc})"
    return f"{type(exc).__name__} with {host}: {exc}"


@contextmanager
def retries_unlogged() -> Iterator[None]:
    """
    Within the block, stamina calls no retry hook (by default it logs a
    ``stamina.retry_scheduled`` warning per retry, with the raw exception):
    for a one-shot command whose failure is reported in one line. The hooks
    are process-wide; the previous ones are restored on exit.
    """
    saved = stamina.instrumentation.get_on_retry_hooks()
    stamina.instrumentation.set_on_retry_hooks([])
    try:
        yield
    finally:
        stamina.instrumentation.set_on_retry_hooks(saved)


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

    @property
    def host(self) -> str:
        """Gamma's ``host[:port]``, for messages (``gamma-api.polymarket.com``)."""
        return self.http.base_url.netloc.decode("ascii", "replace")

    async def _get(self, path: str, params: httpx.QueryParams | None = None) -> httpx.Response:
        """
        GET with retries; returns a 2xx or 404 response.

        Raises:
            GammaError: ``"Gamma: GET /markets: HTTP 503 Service Unavailable from
                HOST (gave up after 5 attempts)"``, or the transport's cause
                (:func:`describe_http_failure`) instead of the status.
        """
        try:
            return await send_with_retries(
                lambda: self.http.get(path, params=params),
                attempts=self.attempts,
                wait_initial=self.wait_initial,
                wait_max=self.wait_max,
                accept=(404,),
            )
        except httpx.HTTPError as exc:
            cause = describe_http_failure(exc, self.http.base_url, self.http.timeout.read)
            retried = retry_delay(exc) is not False
            tries = f"gave up after {self.attempts} attempts" if retried else "not retried"
            raise GammaError(f"Gamma: GET {path}: {cause} ({tries})") from exc

    @staticmethod
    def _decode(path: str, response: httpx.Response) -> object:
        host = response.url.netloc.decode("ascii", "replace")
        try:
            return orjson.loads(response.content)
        except orjson.JSONDecodeError as exc:
            raise GammaError(f"Gamma: GET {path}: the answer of {host} is not JSON") from exc

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
                raise GammaError(
                    f"Gamma: GET /markets: {self.host} answered a JSON {type(body).__name__}, "
                    "expected an array"
                )
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
