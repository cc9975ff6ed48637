"""
Market metadata for markets the database lacks, fetched from Gamma.

An asset set can only be derived for markets whose ``clob_token_ids`` are
known. :class:`MetadataFiller` finds the ``positions.market_id`` values of
``active`` positions with no usable ``markets`` row (:func:`missing_markets`),
fetches them from Gamma in batches and upserts them with ``source = 'gamma'``
(:func:`polystream.store.markets.upsert_markets`), then calls ``on_filled()``
(the app passes ``Reconciler.wake`` so the new tokens are subscribed at once).
An id Gamma does not know is logged once and asked again later (60 s doubling
to 1 h) without blocking the others. :func:`import_from_gamma` does the same
for ``polystream markets import --from-gamma``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import attrs
import psycopg
import structlog
import trio

from polystream.errors import DatabaseError, ImportDataError
from polystream.store import db
from polystream.store.link import DbLink
from polystream.store.markets import (
    GammaMarket,
    Warn,
    require_current_schema,
    upsert_markets,
    warn_on_stderr,
    without_tokens_warnings,
)
from polystream.venue.gamma import (
    MAX_PER_REQUEST,
    GammaClient,
    GammaError,
    Lookup,
    classify_ref,
    retries_unlogged,
)
from polystream.venue.http import chunks

__all__ = [
    "WAKE_COALESCE",
    "MetadataFiller",
    "RetrySchedule",
    "import_from_gamma",
    "missing_markets",
    "run_metadata_filler",
]

logger = structlog.get_logger(__name__)

WAKE_COALESCE = 0.5
"""Seconds a wake-up waits so that a burst of position changes costs one round."""


# --------------------------------------------------------------- database side

_MISSING = r"""
SELECT DISTINCT p.market_id FROM positions AS p
WHERE p.status = 'active'
  AND (p.market_id ~ '^[0-9]+$' OR p.market_id ~ '^0x[0-9a-fA-F]{64}$')
  AND NOT EXISTS (
      SELECT 1 FROM markets AS m
      WHERE m.id = p.market_id
        AND jsonb_typeof(m.clob_token_ids) = 'array'
        AND m.clob_token_ids <> '[]'::jsonb)
  AND NOT EXISTS (
      SELECT 1 FROM markets AS m
      WHERE m.condition_id = p.market_id
        AND jsonb_typeof(m.clob_token_ids) = 'array'
        AND m.clob_token_ids <> '[]'::jsonb)
"""
# Two anti-joins, not one on ``m.id = ... OR m.condition_id = ...``: an OR join
# condition is a nested loop (positions x markets, 39 s at 100,000 x 5,000 in
# bench.scale, past the statement timeout); each of these is a merge or hash
# anti-join (80 ms there).


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


def _check_schema_sync(dsn: str) -> None:
    with db.connect(dsn, application_name="polystream-import") as conn:
        require_current_schema(conn)


def _import_sync(dsn: str, markets: list[GammaMarket], warn: Warn) -> int:
    with db.connect(dsn, application_name="polystream-import") as conn:
        require_current_schema(conn)
        for line in without_tokens_warnings(conn, markets):
            warn(line)
        count = upsert_markets(conn, markets)
        conn.commit()
        return count


async def import_from_gamma(
    dsn: str, refs: Sequence[str], client: GammaClient, *, warn: Warn | None = None
) -> int:
    """
    Fetch markets by id, condition id or slug (see :func:`classify_ref`) and
    upsert them into ``markets`` (``source = 'gamma'`` unless live prices
    exist).  All or nothing: returns the number of rows written.

    The schema is checked before Gamma is asked.  A market Gamma returns
    without ``clobTokenIds`` (its hydration window) is imported and reported
    to ``warn``, one line each (default
    :func:`polystream.store.markets.warn_on_stderr`).  stamina's own log line
    per retry is off meanwhile (:func:`polystream.venue.gamma.retries_unlogged`):
    a failure is the one line of its :class:`GammaError`.

    Raises:
        ImportDataError: Gamma knows none of some refs (the message names
            them and Gamma's host); nothing is written.
        GammaError: Gamma could not be asked (the message names the host and
            the HTTP status or the transport's cause).
        DatabaseError: connecting failed, the schema is not migrated
            ("... run `polystream db migrate` first"), or the upsert failed.
    """
    await trio.to_thread.run_sync(_check_schema_sync, dsn)
    with retries_unlogged():
        lookup = await client.lookup(refs)
    if lookup.unknown:
        raise ImportDataError(
            f"Gamma ({client.host}) has no market for: {', '.join(lookup.unknown)}"
        )
    markets = list({m.id: m for m in lookup.found.values()}.values())
    if not markets:
        return 0
    return await trio.to_thread.run_sync(_import_sync, dsn, markets, warn or warn_on_stderr)
