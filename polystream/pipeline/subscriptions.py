"""
The subscription set, derived from the database for the life of the process.

Desired assets = every ``clob_token_ids`` entry of each market holding an
``active`` position or a ``pending`` prediction (so its ``outcome_prices`` is
complete), plus their own ``token_id``, plus ``feed.watch``. An empty set is a
normal state. The set is read at start-up, every ``feed.reconcile_interval``
seconds, and at once when PostgreSQL notifies ``polystream_positions`` (the
triggers of the schema), so a trade made by any service is subscribed without
that service calling polystream. A position that becomes active, has its token
filled in, or has no price yet is priced from the current books at once.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from typing import Any

import attrs
import orjson
import psycopg
import structlog
import trio

from polystream.catalog import Catalog
from polystream.errors import DatabaseError
from polystream.feed.pool import FeedPool
from polystream.stats import Stats
from polystream.store.link import DbLink
from polystream.store.listen import POSITIONS_CHANNEL

__all__ = [
    "COALESCE_SECONDS",
    "FULL_AFTER_NOTIFY",
    "DesiredSet",
    "Reconciler",
    "read_desired",
    "read_market_tokens",
    "read_new_positions",
]

logger = structlog.get_logger(__name__)

COALESCE_SECONDS = 1.0
"""
After a close or delete, the full read follows within this: a stream of closes
(TP/SL firing one after another) costs one full read per second, not one per
close. Nothing waits for it: a closed position is no longer priced (the writer
prices ``active`` rows), and its asset stays subscribed for
``feed.unsubscribe_grace`` anyway.
"""

FULL_AFTER_NOTIFY = 1.0
"""After a fast-path subscribe, the full reconcile (catalog, counts) follows within this."""


@attrs.frozen
class DesiredSet:
    """
    What the database wants subscribed, and the catalog that goes with it.

    ``unpriced`` holds the catalog keys (market ids, or bare token ids) of
    markets with an active position that has no price yet (``current_price``
    or ``pnl_amount`` NULL): the position writer prices them from the
    current books at once, without waiting for the market to move.
    """

    assets: frozenset[str]
    catalog: Catalog
    unpriced: frozenset[str] = frozenset()


_FILL_TOKEN_IDS = """
UPDATE positions AS p SET token_id = m.clob_token_ids ->> (o.ord::int - 1)
FROM markets AS m, jsonb_array_elements_text(m.outcomes) WITH ORDINALITY AS o(name, ord)
WHERE p.token_id IS NULL AND p.status = 'active' AND p.outcome IS NOT NULL
  AND (p.market_id = m.id OR p.market_id = m.condition_id)
  AND jsonb_typeof(m.clob_token_ids) = 'array' AND lower(o.name) = lower(p.outcome)
"""

_FILL_TOKEN_IDS_OF = _FILL_TOKEN_IDS + " AND p.id = ANY(%(ids)s) RETURNING p.token_id"

_ACTIVE = """
SELECT token_id, market_id, count(*),
       count(*) FILTER (WHERE current_price IS NULL OR pnl_amount IS NULL)
FROM positions WHERE status = 'active' GROUP BY token_id, market_id
"""

# Same shape as _ACTIVE; a prediction holds no position, so it counts 0.
_PREDICTED = """
SELECT token_id, market_id, 0, 0 FROM predictions
WHERE status = 'pending' AND (closes_at IS NULL OR closes_at > now() - interval '1 minute')
GROUP BY token_id, market_id
"""

# Three index-friendly lookups (primary key, unique condition_id, GIN on
# clob_token_ids) instead of one OR that scans the table.
_MARKETS = """
SELECT id, condition_id, clob_token_ids FROM markets
WHERE id = ANY(%(ids)s) AND jsonb_typeof(clob_token_ids) = 'array'
UNION
SELECT id, condition_id, clob_token_ids FROM markets
WHERE condition_id = ANY(%(ids)s) AND jsonb_typeof(clob_token_ids) = 'array'
UNION
SELECT id, condition_id, clob_token_ids FROM markets
WHERE clob_token_ids ?| %(tokens)s AND jsonb_typeof(clob_token_ids) = 'array'
"""


def read_market_tokens(
    conn: psycopg.Connection[Any], market_keys: list[str], tokens: list[str]
) -> list[tuple[str, str | None, list[str]]]:
    """
    ``(id, condition_id, clob_token_ids)`` of markets named by id, condition id
    or token. The token ids are interned (``sys.intern``) row by row as the
    result is read: the catalog, the feed pool, the books and the rules then
    share one string per asset, and no copy of every token id is made on the way.
    """
    rows = conn.execute(_MARKETS, {"ids": market_keys, "tokens": tokens})
    return [(str(i), c, [sys.intern(str(t)) for t in clob]) for i, c, clob in rows]


def read_new_positions(
    conn: psycopg.Connection[Any],
    market_keys: list[str],
    tokens: list[str],
    position_ids: list[int],
) -> tuple[list[tuple[str, str | None, list[str]]], list[str]]:
    """
    The fast path's one round trip: fill ``token_id`` of the notified
    positions that name only their ``outcome`` (from ``markets.outcomes``),
    then read their markets (see :func:`read_market_tokens`).

    Returns:
        The market rows, and the token ids just filled in.
    """
    filled: list[str] = []
    if position_ids:
        rows = conn.execute(_FILL_TOKEN_IDS_OF, {"ids": position_ids}).fetchall()
        filled = [str(token) for (token,) in rows if token is not None]
    return read_market_tokens(conn, market_keys, tokens + filled), filled


def read_desired(conn: psycopg.Connection[Any], watch: tuple[str, ...]) -> DesiredSet:
    """
    Read the desired asset set (see the module docstring) and its catalog.

    Also fills ``positions.token_id`` from ``markets.outcomes`` where another
    service left it empty but named the outcome, and names the markets whose
    active positions have no price yet (``DesiredSet.unpriced``).
    """
    conn.execute(_FILL_TOKEN_IDS)
    # (token_id, market_id, active positions, unpriced ones): positions, then pending
    # predictions, which need their prices too. Read row by row, each token id interned
    # at once (see read_market_tokens): its copy in the row is dropped with the row.
    holders = [
        (None if token is None else sys.intern(token), market_id, count, unpriced_count)
        for query in (_ACTIVE, _PREDICTED)
        for token, market_id, count, unpriced_count in conn.execute(query)
    ]
    market_keys = list(dict.fromkeys(m for _, m, _, _ in holders if m))
    tokens = list(dict.fromkeys([*(t for t, _, _, _ in holders if t), *watch]))
    catalog = Catalog()
    by_key: dict[str, str] = {}
    for market_id, condition_id, clob in read_market_tokens(conn, market_keys, tokens):
        catalog.add_market(market_id, tuple(clob))
        by_key[market_id] = market_id
        if condition_id:
            by_key[condition_id] = market_id
    assets: set[str] = set(watch)
    unpriced: set[str] = set()
    for token, market_key, count, unpriced_count in holders:
        found = by_key.get(market_key or "") or catalog.keys.get(token or "")
        if found is not None:
            assets.update(catalog.tokens[found])
        if token:
            assets.add(token)
        key = found or token
        if key and count:
            catalog.positions[key] = catalog.positions.get(key, 0) + count
        if key and unpriced_count:
            unpriced.add(key)
    return DesiredSet(frozenset(assets), catalog, frozenset(unpriced))


@attrs.define(eq=False)
class Reconciler:
    """
    Keeps the feed's subscriptions equal to the desired set.

    ``wake()`` asks for a reconcile now (from LISTEN); otherwise one runs
    every ``interval`` seconds. An asset that leaves the desired set stays
    subscribed for ``grace`` seconds (a close-and-reopen does not flap). The
    catalog object is updated in place so that the router and writers, which
    hold it, see the change.

    ``price_now(market_keys)`` (the position writer's ``touch``) is told of
    markets holding a position that became active, had its token filled in or
    has no price yet, so it is priced from the current books within one
    debounce window, whether or not its market moves.
    """

    link: DbLink
    pool: FeedPool
    catalog: Catalog
    stats: Stats
    watch: tuple[str, ...]
    interval: float
    grace: float = 60.0
    _wake: trio.Event = attrs.field(factory=trio.Event)
    _leaving: dict[str, float] = attrs.field(factory=dict)
    _full_at: float | None = None
    _added: dict[str, str | None] = attrs.field(factory=dict)  # market key -> token
    _added_positions: set[int] = attrs.field(factory=set)
    _fast_wake: trio.Event = attrs.field(factory=trio.Event)
    _fast_markets: dict[str, tuple[str, ...]] = attrs.field(factory=dict)
    fast_link: DbLink | None = None  # the fast path's own connection (else ``link``)
    price_now: Callable[[Iterable[str]], None] | None = None
    owns: Callable[[str], bool] | None = None  # market key served here (a cluster), None = all

    def wake(self) -> None:
        """Reconcile (fully) as soon as possible."""
        self._full_at = trio.current_time()
        self._wake.set()

    def notify(self, notes: list[tuple[str, str]] | None) -> None:
        """
        Position and prediction notifications. A row that became active is
        subscribed at once through a small lookup of its market (the fast
        path); everything else (closes, deletes, ``None`` after a LISTEN
        reconnect) is left to a full reconcile, soon but coalesced.
        """
        if notes is None:
            self.wake()
            return
        now = trio.current_time()
        for channel, payload in notes:
            try:
                note = orjson.loads(payload)
                active = note["op"] != "DELETE" and note["status"] in ("active", "pending")
                market, token = note.get("market_id"), note.get("token_id")
                row_id = int(note["id"]) if channel == POSITIONS_CHANNEL else None
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                active, market, token, row_id = False, None, None, None
            if active and (market or token):
                self._added[str(market or token)] = None if token is None else str(token)
                if row_id is not None:
                    self._added_positions.add(row_id)
                self._fast_wake.set()
            full_at = now + (FULL_AFTER_NOTIFY if active else COALESCE_SECONDS)
            self._full_at = full_at if self._full_at is None else min(self._full_at, full_at)
        self._wake.set()

    async def _fast_path(self) -> None:
        """Subscribe (and price) the markets of newly active rows without a full read."""
        added, self._added = self._added, {}
        position_ids, self._added_positions = sorted(self._added_positions), set()
        keys = list(added)
        tokens = [t for t in added.values() if t is not None]
        try:
            rows, filled = await (self.fast_link or self.link).call(
                read_new_positions, keys, tokens, position_ids
            )
        except DatabaseError:
            self._added = added | self._added
            self._added_positions.update(position_ids)
            raise
        assets = set(tokens) | set(filled)
        for market_id, _condition_id, clob in rows:
            assets.update(clob)
            self._fast_markets[market_id] = tuple(clob)
            self.catalog.add_market(market_id, tuple(clob))
            self.catalog.positions[market_id] = self.catalog.positions.get(market_id, 0) + 1
        if self.owns is not None:
            assets = {a for a in assets if self.owns(self.catalog.key_of(a))}
        new = assets - set(self.pool.asset_shard)
        if new:
            self.pool.set_assets(set(self.pool.asset_shard) | new)
            logger.info("subscriptions_added", assets=len(new), markets=len(rows))
        if self.price_now is not None:
            known = {t for _, _, clob in rows for t in clob}
            bare = [t for t in tokens if t not in known]  # a token with no market row
            self.price_now([market_id for market_id, _, _ in rows] + bare)

    def _with_grace(self, desired: frozenset[str], now: float) -> set[str]:
        """
        ``desired`` plus the assets still inside their unsubscribe grace period;
        an asset whose market another daemon serves now goes at once.
        """
        owns, key_of = self.owns, self.catalog.key_of
        for asset_id in self.pool.asset_shard:
            if asset_id not in desired:
                if owns is not None and not owns(key_of(asset_id)):
                    self._leaving.pop(asset_id, None)
                    continue
                self._leaving.setdefault(asset_id, now + self.grace)
        for asset_id in [a for a, t in self._leaving.items() if a in desired or t <= now]:
            del self._leaving[asset_id]
        return set(desired) | set(self._leaving)

    def _owned(self, desired: DesiredSet) -> DesiredSet:
        """``desired`` cut to the markets this daemon serves (``owns``; all without a cluster)."""
        owns = self.owns
        if owns is None:
            return desired
        key_of = desired.catalog.key_of
        return DesiredSet(
            frozenset(a for a in desired.assets if owns(key_of(a))),
            desired.catalog,
            frozenset(k for k in desired.unpriced if owns(k)),
        )

    async def reconcile(self) -> DesiredSet:
        """Read the desired set and apply it (the part served here); raises DatabaseError."""
        self._fast_markets.clear()
        desired = self._owned(await self.link.call(read_desired, self.watch))
        if self._fast_markets:  # subscribed by the fast path while we were reading
            assets = set(desired.assets)
            for market_id, clob in self._fast_markets.items():
                if market_id not in desired.catalog.tokens:
                    desired.catalog.add_market(market_id, clob)
                assets.update(clob)
            desired = DesiredSet(frozenset(assets), desired.catalog)
        self.catalog.tokens = desired.catalog.tokens
        self.catalog.keys = desired.catalog.keys
        self.catalog.positions = desired.catalog.positions
        self.pool.set_assets(self._with_grace(desired.assets, trio.current_time()))
        self.stats.desired_assets = len(desired.assets)
        if desired.unpriced and self.price_now is not None:
            self.price_now(desired.unpriced)
        return desired

    def _next_run(self) -> float:
        """When the next full reconcile is due (trio seconds)."""
        deadline = trio.current_time() + self.interval
        if self._leaving:
            deadline = min(deadline, min(self._leaving.values()))
        if self._full_at is not None:
            deadline = min(deadline, self._full_at)
        return deadline

    async def _full(self, previous: frozenset[str] | None) -> frozenset[str] | None:
        self._full_at = None
        try:
            desired = await self.reconcile()
        except DatabaseError:
            return previous  # logged by the link; the next interval retries
        if desired.assets != previous:
            logger.info(
                "subscriptions_reconciled",
                assets=len(desired.assets),
                markets=len(desired.catalog.tokens),
                leaving=len(self._leaving),
            )
        return desired.assets

    async def _run_fast_path(self) -> None:
        """Its own task, so that a long full reconcile never delays a new subscription."""
        while True:
            await self._fast_wake.wait()
            self._fast_wake = trio.Event()
            if self._added:
                try:
                    await self._fast_path()
                except DatabaseError:
                    self.wake()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Reconcile now, then on notifications, interval or grace expiry; until cancelled."""
        previous = await self._full(None)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._run_fast_path)
            task_status.started()
            while True:
                self._wake = trio.Event()
                with trio.move_on_at(self._next_run()):
                    await self._wake.wait()
                    continue
                previous = await self._full(previous)
