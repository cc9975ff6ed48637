"""
Market metadata from Polymarket's Gamma API, for markets the database lacks.

An asset set can only be derived for markets whose ``clob_token_ids`` are
known.  :class:`MetadataFiller` finds the ``positions.market_id`` values of
``active`` positions with no usable ``markets`` row (:func:`missing_markets`),
fetches them from Gamma in batches and upserts them with ``source = 'gamma'``
(:func:`polystream.markets.upsert_markets`), then calls ``on_filled()`` (the
app passes ``Reconciler.wake`` so the new tokens are subscribed at once).
:func:`import_from_gamma` does the same for ``polystream markets import
--from-gamma``.

Gamma facts (../shared/protocol.md, section 7; https://docs.polymarket.com):
``GET /markets?id=..&id=..`` and ``GET /markets?condition_ids=..`` take
repeatable parameters and answer a JSON array (unknown ids are simply absent);
pages are capped at 100 items, and at most 100 condition ids go in one request;
``GET /markets/slug/{slug}`` answers one object or 404.  A new market may
come back with empty ``clobTokenIds`` for a few minutes ("hydration window").
Rate limit: 300 requests / 10 s on ``/markets`` (section 9); overshoot is 429.

Requests are retried with exponential backoff and jitter (stamina) on
transport errors, 429 and 5xx, a bounded number of times; any other 4xx is
not retried.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from typing import Any, Literal
from urllib.parse import quote

import attrs
import httpx
import orjson
import psycopg
import structlog
import trio

from polystream import db
from polystream.errors import DatabaseError, ImportDataError, PolystreamError
from polystream.markets import GammaMarket, upsert_markets
from polystream.reconciler import DbLink
from polystream.rest import chunks, send_with_retries

__all__ = [
    "DEFAULT_GAMMA_URL",
    "MAX_PER_REQUEST",
    "GammaClient",
    "GammaError",
    "Lookup",
    "MetadataFiller",
    "RefKind",
    "RetrySchedule",
    "classify_ref",
    "import_from_gamma",
    "missing_markets",
    "open_gamma_client",
    "run_metadata_filler",
]

logger = structlog.get_logger(__name__)

DEFAULT_GAMMA_URL = "https://gamma-api.polymarket.com"
"""Gamma's public base URL (../shared/protocol.md, section 7)."""

MAX_PER_REQUEST = 100

WAKE_COALESCE = 0.5
"""Seconds a wake-up waits so that a burst of position changes costs one round."""
"""Most ids or condition ids in one ``GET /markets`` (Gamma caps pages at 100)."""

RefKind = Literal["id", "condition_id", "slug"]

_GAMMA_ID = re.compile(r"^[0-9]+$")
_CONDITION_ID = re.compile(r"^0x[0-9a-fA-F]{64}$")


class GammaError(PolystreamError):
    """
    Gamma could not be asked: transport errors, 429 or 5xx after every
    attempt, another 4xx, or an answer that is not the expected JSON shape.
    """


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
    async with httpx.AsyncClient(
        base_url=url.rstrip("/"),
        timeout=request_timeout,
        headers={"accept": "application/json", "user-agent": "polystream"},
    ) as http:
        yield GammaClient(http, attempts, wait_initial, wait_max)


# --------------------------------------------------------------- database side

_MISSING = r"""
SELECT DISTINCT p.market_id FROM positions AS p
WHERE p.status = 'active'
  AND (p.market_id ~ '^[0-9]+$' OR p.market_id ~ '^0x[0-9a-fA-F]{64}$')
  AND NOT EXISTS (
      SELECT 1 FROM markets AS m
      WHERE (m.id = p.market_id OR m.condition_id = p.market_id)
        AND jsonb_typeof(m.clob_token_ids) = 'array'
        AND m.clob_token_ids <> '[]'::jsonb)
"""


def _ref_order(ref: str) -> tuple[int, int, str]:
    """Ids first (numerically), then condition ids: batches stay one kind."""
    if classify_ref(ref) == "id":
        return (0, len(ref), ref)
    return (1, 0, ref)


def missing_markets(conn: psycopg.Connection[Any]) -> list[str]:
    """
    The ``positions.market_id`` values of ``active`` positions with no usable
    ``markets`` row: none whose ``id`` or ``condition_id`` equals it, or only
    one whose ``clob_token_ids`` is NULL or ``[]``.

    Only Gamma ids (digits) and condition ids (``0x`` + 64 hex) are returned;
    other values cannot be looked up and are left alone.  Sorted: ids first.
    Blocking; psycopg errors propagate (``DbLink.call`` translates them).
    """
    rows = conn.execute(_MISSING).fetchall()
    return sorted((str(row[0]) for row in rows), key=_ref_order)


def _upsert_each(conn: psycopg.Connection[Any], markets: list[GammaMarket]) -> dict[str, str]:
    """
    Upsert ``markets`` in one statement; if it fails, one by one (each in a
    savepoint), so one bad market cannot block the others.  Returns
    market id -> error for those that failed.
    """
    try:
        upsert_markets(conn, markets)
        return {}
    except DatabaseError:
        pass
    failed: dict[str, str] = {}
    for market in markets:
        try:
            upsert_markets(conn, [market])
        except DatabaseError as exc:
            failed[market.id] = str(exc)[:300]
    return failed


# ---------------------------------------------------------------- retry plan


@attrs.define
class RetrySchedule:
    """
    When to ask Gamma again about a reference it could not resolve.

    After the n-th failure in a row the next try is due ``min(maximum,
    initial * 2**(n-1))`` seconds later.  Times are ``trio.current_time()``
    seconds, passed in, so this is tested under ``trio.testing.MockClock``.
    Only references still missing are kept (:meth:`retain`), so memory is
    bounded by the current missing set.
    """

    initial: float = 60.0
    maximum: float = 3600.0
    _entries: dict[str, tuple[int, float]] = attrs.field(factory=dict)

    def retain(self, refs: Iterable[str]) -> None:
        """Forget every reference not in ``refs``."""
        keep = set(refs)
        for ref in [r for r in self._entries if r not in keep]:
            del self._entries[ref]

    def due(self, refs: Iterable[str], now: float) -> list[str]:
        """The references of ``refs`` never failed or due by ``now``, in order."""
        return [r for r in refs if r not in self._entries or self._entries[r][1] <= now]

    def failed(self, ref: str, now: float) -> bool:
        """Record a failure at ``now``; True if it is the first in a row."""
        failures = self._entries.get(ref, (0, now))[0] + 1
        delay = min(self.maximum, self.initial * 2 ** min(failures - 1, 60))
        self._entries[ref] = (failures, now + delay)
        return failures == 1

    def succeeded(self, ref: str) -> None:
        """Forget ``ref``'s failures."""
        self._entries.pop(ref, None)

    def next_try(self, ref: str) -> float | None:
        """When ``ref`` is due again, or None if it has no failures."""
        entry = self._entries.get(ref)
        return None if entry is None else entry[1]

    def __len__(self) -> int:
        return len(self._entries)


# ---------------------------------------------------------------- the filler


@attrs.define(eq=False)
class MetadataFiller:
    """
    Fills ``markets`` rows for positions whose market lacks token ids.

    A round (:meth:`fill_once`) runs every ``interval`` seconds and at once
    after :meth:`wake`.  A reference Gamma does not know (or returns without
    ``clobTokenIds``, or whose upsert fails) is logged once
    (``gamma_market_unknown`` / ``gamma_market_without_tokens`` /
    ``gamma_market_upsert_failed``, with ``market_id``) and asked again on
    the growing delays of ``schedule``; it never holds up other markets.  A
    Gamma outage is logged (``gamma_unavailable``) and the next round retries.
    """

    link: DbLink
    client: GammaClient
    on_filled: Callable[[], None]
    interval: float = 30.0
    schedule: RetrySchedule = attrs.field(factory=RetrySchedule)
    _wake: trio.Event = attrs.field(factory=trio.Event)

    def wake(self) -> None:
        """Run a round as soon as possible (e.g. after a positions NOTIFY)."""
        self._wake.set()

    async def fill_once(self) -> int:
        """
        One round: read what is missing, fetch what is due, upsert it, and
        call ``on_filled()`` if any market got usable token ids.  Returns the
        number of references resolved.

        Raises:
            DatabaseError: reading the missing set or writing failed.
        """
        missing = await self.link.call(missing_markets)
        self.schedule.retain(missing)
        now = trio.current_time()
        due = self.schedule.due(missing, now)
        resolved = 0
        for chunk in chunks(due, MAX_PER_REQUEST):
            try:
                lookup = await self.client.lookup(chunk)
            except GammaError as exc:
                logger.warning("gamma_unavailable", error=str(exc)[:300], pending=len(due))
                break
            resolved += await self._store(lookup, now)
        if resolved:
            logger.info("gamma_markets_filled", markets=resolved, still_missing=len(self.schedule))
            self.on_filled()
        return resolved

    async def _store(self, lookup: Lookup, now: float) -> int:
        markets = list({m.id: m for m in lookup.found.values()}.values())
        failed = await self.link.call(_upsert_each, markets) if markets else {}
        resolved = 0
        for ref in lookup.unknown:
            if self.schedule.failed(ref, now):
                logger.warning("gamma_market_unknown", market_id=ref)
        for ref, market in lookup.found.items():
            if market.id in failed:
                if self.schedule.failed(ref, now):
                    logger.warning(
                        "gamma_market_upsert_failed", market_id=ref, error=failed[market.id]
                    )
            elif not market.clob_token_ids:
                if self.schedule.failed(ref, now):
                    logger.info("gamma_market_without_tokens", market_id=ref)
            else:
                self.schedule.succeeded(ref)
                resolved += 1
        return resolved

    async def run(
        self, *, task_status: trio.TaskStatus[MetadataFiller] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Start at once (no network before ``started``), then a round per interval or wake."""
        task_status.started(self)
        while True:
            self._wake = trio.Event()
            try:
                await self.fill_once()
            except DatabaseError:
                pass  # logged by the link; the next round retries
            with trio.move_on_after(self.interval):
                await self._wake.wait()
                await trio.sleep(WAKE_COALESCE)  # one round for a burst of NOTIFYs


async def run_metadata_filler(
    link: DbLink,
    client: GammaClient,
    on_filled: Callable[[], None],
    *,
    interval: float = 30.0,
    retry_initial: float = 60.0,
    retry_max: float = 3600.0,
    task_status: trio.TaskStatus[MetadataFiller] = trio.TASK_STATUS_IGNORED,
) -> None:
    """
    Run a :class:`MetadataFiller` until cancelled.

    ``task_status.started`` receives the filler, whose ``wake()`` asks for a
    round now.  ``interval``: seconds between rounds; ``retry_initial`` and
    ``retry_max``: first and longest delay, in seconds, before asking Gamma
    again about a reference it could not resolve.
    """
    schedule = RetrySchedule(retry_initial, retry_max)
    filler = MetadataFiller(link, client, on_filled, interval, schedule)
    await filler.run(task_status=task_status)


# ---------------------------------------------------------------- CLI import


def _import_sync(dsn: str, markets: list[GammaMarket]) -> int:
    with db.connect(dsn, application_name="polystream-import") as conn:
        count = upsert_markets(conn, markets)
        conn.commit()
        return count


async def import_from_gamma(dsn: str, refs: Sequence[str], client: GammaClient) -> int:
    """
    Fetch markets by id, condition id or slug (see :func:`classify_ref`) and
    upsert them into ``markets`` (``source = 'gamma'`` unless live prices
    exist).  All or nothing: returns the number of rows written.

    Raises:
        ImportDataError: Gamma knows none of some refs (the message names
            them); nothing is written.
        GammaError: Gamma could not be asked.
        DatabaseError: connecting or the upsert failed.
    """
    lookup = await client.lookup(refs)
    if lookup.unknown:
        raise ImportDataError(f"Gamma has no market for: {', '.join(lookup.unknown)}")
    markets = list({m.id: m for m in lookup.found.values()}.values())
    if not markets:
        return 0
    return await trio.to_thread.run_sync(_import_sync, dsn, markets)
