r"""
Import Gamma market metadata into ``markets``.

Gamma (``https://gamma-api.polymarket.com/markets``) serves markets as JSON
objects whose list fields (``outcomes``, ``outcomePrices``, ``clobTokenIds``)
are JSON *strings* holding arrays, e.g. ``"[\"Up\", \"Down\"]"``, and whose
prices are JSON numbers or decimal strings.  Real samples:
``tests/data/real/nautilus_trader/rust_test_data/gamma_market*.json``.
Prices become :class:`decimal.Decimal` (through ``str()``), never floats.

A market without ``clobTokenIds`` (Gamma's "hydration window": a new market
lacks them for a few minutes) is imported all the same, so services can
reference it, and reported (:func:`import_markets_file`'s ``warn``): it cannot
be priced until its token ids are known, which ``polystream run`` asks Gamma for
while an active position holds it (:mod:`polystream.pipeline.metadata`).  Such
an import never erases token ids a row already has.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import attrs
import orjson
import psycopg
from psycopg.types.json import Jsonb

from polystream.errors import DatabaseError, ImportDataError
from polystream.numbers import NotANumber, ask_or_none, bid_or_none, finite_decimal
from polystream.store import db

__all__ = [
    "GammaMarket",
    "Warn",
    "import_markets_file",
    "parse_gamma_payload",
    "require_current_schema",
    "upsert_markets",
    "warn_on_stderr",
    "without_tokens_warnings",
]

Warn = Callable[[str], None]
"""Receives one warning line (no prefix, no line end)."""

_ZERO = Decimal(0)
_ONE = Decimal(1)


def _fail(market_id: str, field: str, problem: str) -> ImportDataError:
    return ImportDataError(f"market {market_id}: field {field!r}: {problem}")


def _text(obj: dict[str, Any], market_id: str, field: str) -> str | None:
    value = obj.get(field)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise _fail(market_id, field, f"expected a string, got {type(value).__name__}")
    return value


def _flag(obj: dict[str, Any], market_id: str, field: str) -> bool | None:
    value = obj.get(field)
    if value is None or isinstance(value, bool):
        return value
    raise _fail(market_id, field, f"expected true or false, got {value!r}")


def _decimal(value: object, market_id: str, field: str) -> Decimal:
    """A JSON number or decimal string as a finite Decimal (floats via ``str``)."""
    try:
        return finite_decimal(value.strip() if isinstance(value, str) else value)
    except NotANumber:
        raise _fail(market_id, field, f"expected a finite number, got {value!r}") from None


def _price(obj: dict[str, Any], market_id: str, field: str) -> Decimal | None:
    value = obj.get(field)
    if value is None or value == "":
        return None
    return _probability(value, market_id, field)


def _probability(value: object, market_id: str, field: str) -> Decimal:
    price = _decimal(value, market_id, field)
    if not _ZERO <= price <= _ONE:
        raise _fail(market_id, field, f"price {price} is outside [0, 1]")
    return price


def _list(obj: dict[str, Any], market_id: str, field: str) -> list[object]:
    """A Gamma list field: a JSON array, or a string holding one; missing = []."""
    value = obj.get(field)
    if value is None or value == "":
        return []
    if isinstance(value, str):
        try:
            value = orjson.loads(value)
        except orjson.JSONDecodeError:
            raise _fail(market_id, field, "not a JSON-encoded array") from None
    if not isinstance(value, list):
        raise _fail(market_id, field, f"expected an array, got {type(value).__name__}")
    return value


def _strings(obj: dict[str, Any], market_id: str, field: str) -> tuple[str, ...]:
    items = _list(obj, market_id, field)
    if not all(isinstance(item, str) and item for item in items):
        raise _fail(market_id, field, "expected an array of non-empty strings")
    return tuple(str(item) for item in items)


def _timestamp(obj: dict[str, Any], market_id: str, field: str) -> datetime | None:
    text = _text(obj, market_id, field)
    if text is None:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise _fail(market_id, field, f"not an ISO 8601 time: {text!r}") from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _tick_size(obj: dict[str, Any], market_id: str) -> Decimal | None:
    field = "orderPriceMinTickSize"
    value = obj.get(field)
    if value is None or value == "":
        return None
    tick = _decimal(value, market_id, field)
    if not _ZERO < tick < _ONE:
        raise _fail(market_id, field, f"tick size {tick} is not in (0, 1)")
    return tick


def _market_id(obj: dict[str, Any]) -> str:
    value = obj.get("id")
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, str) and value.strip():
        return value.strip()
    raise ImportDataError(f"market without a usable 'id' (got {value!r})")


@attrs.frozen
class GammaMarket:
    """
    One Gamma market's metadata and its last known prices.

    Attributes:
        id: Gamma market id, a decimal string (``"900001"``).
        condition_id: CTF condition id (``0x`` + 64 hex), or None.
        question, slug: display text.
        outcomes: outcome names, e.g. ``("Up", "Down")``.
        clob_token_ids: CLOB token ids, same order as ``outcomes``.
        outcome_prices: one price per outcome, probabilities in [0, 1].
        end_date: when the market ends (UTC), or None.
        active, closed: Gamma's flags, None when absent.
        tick_size: ``orderPriceMinTickSize``, e.g. ``Decimal("0.01")``.
        best_bid, best_ask, last_trade_price: Gamma's snapshot, in [0, 1].
        neg_risk: Gamma's ``negRisk``: orders of a neg-risk market are signed for the
            neg-risk exchange (docs/execution.md), None when absent.
    """

    id: str
    condition_id: str | None
    question: str | None
    slug: str | None
    outcomes: tuple[str, ...]
    clob_token_ids: tuple[str, ...]
    outcome_prices: tuple[Decimal, ...]
    end_date: datetime | None
    active: bool | None
    closed: bool | None
    tick_size: Decimal | None
    best_bid: Decimal | None
    best_ask: Decimal | None
    last_trade_price: Decimal | None
    neg_risk: bool | None = None

    @classmethod
    def from_gamma(cls, obj: object) -> GammaMarket:
        """
        Decode one Gamma market object (a parsed JSON object).

        Raises:
            ImportDataError: ``obj`` is not an object, has no id, or a field has
                the wrong type, a price is outside [0, 1], or the outcome,
                token and price lists differ in length.  The message names
                the market id and the field.
        """
        if not isinstance(obj, dict):
            raise ImportDataError(f"a market must be a JSON object, got {type(obj).__name__}")
        market_id = _market_id(obj)
        outcomes = _strings(obj, market_id, "outcomes")
        tokens = _strings(obj, market_id, "clobTokenIds")
        prices = tuple(
            _probability(p, market_id, "outcomePrices")
            for p in _list(obj, market_id, "outcomePrices")
        )
        for field, items in (("clobTokenIds", tokens), ("outcomePrices", prices)):
            if items and len(items) != len(outcomes):
                raise _fail(market_id, field, f"{len(items)} items for {len(outcomes)} outcomes")
        return cls(
            id=market_id,
            condition_id=_text(obj, market_id, "conditionId"),
            question=_text(obj, market_id, "question"),
            slug=_text(obj, market_id, "slug"),
            outcomes=outcomes,
            clob_token_ids=tokens,
            outcome_prices=prices,
            end_date=_timestamp(obj, market_id, "endDate"),
            active=_flag(obj, market_id, "active"),
            closed=_flag(obj, market_id, "closed"),
            tick_size=_tick_size(obj, market_id),
            best_bid=bid_or_none(_price(obj, market_id, "bestBid")),  # 0: no bid
            best_ask=ask_or_none(_price(obj, market_id, "bestAsk")),  # 1: no ask
            last_trade_price=_price(obj, market_id, "lastTradePrice"),
            neg_risk=_flag(obj, market_id, "negRisk"),
        )


def _load_json(data: bytes) -> object:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        pass
    objects: list[object] = []
    for number, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            objects.append(orjson.loads(line))
        except orjson.JSONDecodeError as exc:
            raise ImportDataError(f"line {number}: not JSON ({exc})") from None
    return objects


def parse_gamma_payload(data: bytes) -> list[GammaMarket]:
    """
    Parse a Gamma payload into markets, in payload order.

    ``data`` is UTF-8 JSON: one market object, an array of market objects,
    or JSON lines (one market object per line; blank lines are skipped).

    Raises:
        ImportDataError: not JSON, an item is not an object, or a market is
            malformed (see :meth:`GammaMarket.from_gamma`).
    """
    parsed = _load_json(data.removeprefix(b"\xef\xbb\xbf"))
    if isinstance(parsed, dict):
        return [GammaMarket.from_gamma(parsed)]
    if not isinstance(parsed, list):
        raise ImportDataError(f"expected a market object or array, got {type(parsed).__name__}")
    return [GammaMarket.from_gamma(item) for item in parsed]


# Prices are Gamma's only while no live source has written the row; a record without
# token ids (Gamma's hydration window) keeps the token ids (and outcomes) a row has.
_UPSERT = """
INSERT INTO markets AS m (
    id, condition_id, question, slug, outcomes, clob_token_ids, outcome_prices,
    end_date, active, closed, tick_size, best_bid, best_ask, last_trade_price, neg_risk,
    source, updated_at
)
SELECT u.*, 'gamma', now()
FROM unnest(
    %s::text[], %s::text[], %s::text[], %s::text[], %s::jsonb[], %s::jsonb[], %s::jsonb[],
    %s::timestamptz[], %s::boolean[], %s::boolean[], %s::numeric[], %s::numeric[],
    %s::numeric[], %s::numeric[], %s::boolean[]
) AS u
ON CONFLICT (id) DO UPDATE SET
    condition_id = EXCLUDED.condition_id,
    question = EXCLUDED.question,
    slug = EXCLUDED.slug,
    outcomes = CASE WHEN EXCLUDED.clob_token_ids = '[]'::jsonb
            AND jsonb_typeof(m.clob_token_ids) = 'array' AND m.clob_token_ids <> '[]'::jsonb
        THEN m.outcomes ELSE EXCLUDED.outcomes END,
    clob_token_ids = CASE WHEN EXCLUDED.clob_token_ids = '[]'::jsonb
            AND jsonb_typeof(m.clob_token_ids) = 'array' AND m.clob_token_ids <> '[]'::jsonb
        THEN m.clob_token_ids ELSE EXCLUDED.clob_token_ids END,
    end_date = EXCLUDED.end_date,
    active = EXCLUDED.active,
    closed = EXCLUDED.closed,
    neg_risk = coalesce(EXCLUDED.neg_risk, m.neg_risk),
    tick_size = CASE WHEN m.source IS NULL OR m.source = 'gamma'
        THEN coalesce(EXCLUDED.tick_size, m.tick_size)
        ELSE coalesce(m.tick_size, EXCLUDED.tick_size) END,
    outcome_prices = CASE WHEN m.source IS NULL OR m.source = 'gamma'
        THEN EXCLUDED.outcome_prices ELSE m.outcome_prices END,
    best_bid = CASE WHEN m.source IS NULL OR m.source = 'gamma'
        THEN EXCLUDED.best_bid ELSE m.best_bid END,
    best_ask = CASE WHEN m.source IS NULL OR m.source = 'gamma'
        THEN EXCLUDED.best_ask ELSE m.best_ask END,
    last_trade_price = CASE WHEN m.source IS NULL OR m.source = 'gamma'
        THEN EXCLUDED.last_trade_price ELSE m.last_trade_price END,
    source = CASE WHEN m.source IS NULL OR m.source = 'gamma'
        THEN 'gamma' ELSE m.source END,
    updated_at = CASE WHEN m.source IS NULL OR m.source = 'gamma'
        THEN now() ELSE m.updated_at END
"""


def _columns(markets: Iterable[GammaMarket]) -> list[list[Any]]:
    """Column-wise parameters for ``_UPSERT``; a repeated id keeps its last record."""
    unique = {market.id: market for market in markets}
    columns: list[list[Any]] = [[] for _ in range(15)]
    for m in unique.values():
        row = (
            m.id,
            m.condition_id,
            m.question,
            m.slug,
            Jsonb(list(m.outcomes)),
            Jsonb(list(m.clob_token_ids)),
            Jsonb([str(p) for p in m.outcome_prices]) if m.outcome_prices else None,
            m.end_date,
            m.active,
            m.closed,
            m.tick_size,
            m.best_bid,
            m.best_ask,
            m.last_trade_price,
            m.neg_risk,
        )
        for column, value in zip(columns, row, strict=True):
            column.append(value)
    return columns


def _one_line(exc: psycopg.Error) -> str:
    """The server's message and detail on one line (no ``LINE 2: ...`` excerpt)."""
    diag = exc.diag
    primary = diag.message_primary or str(exc).splitlines()[0]
    return primary + (f" ({diag.message_detail})" if diag.message_detail else "")


def require_current_schema(conn: psycopg.Connection[Any]) -> None:
    """
    Check that every packaged migration is applied, before writing.

    Raises:
        DatabaseError: migrations are pending (one line, "database schema is not
            up to date (N migration(s) pending): run `polystream db migrate`
            first", the wording of ``polystream run``), or the check failed.
    """
    pending = db.pending_migrations(conn)
    if pending:
        raise DatabaseError(
            f"database schema is not up to date ({len(pending)} migration(s) pending): "
            "run `polystream db migrate` first"
        )


def upsert_markets(conn: psycopg.Connection[Any], markets: Iterable[GammaMarket]) -> int:
    """
    Insert or update ``markets`` rows in one statement; return rows written.

    Metadata (condition id, question, slug, outcomes, token ids, end date,
    flags) always comes from Gamma, except that a record without token ids
    keeps the token ids (and outcomes) the row already has.
    ``outcome_prices``, ``best_bid``,
    ``best_ask``, ``last_trade_price`` and ``updated_at`` are set, with
    ``source = 'gamma'``, only where the row has no live prices yet (its
    ``source`` is NULL or ``'gamma'``): an import never overwrites what the
    feed (``'ws'``) or poller (``'poll'``) wrote.  ``tick_size`` likewise
    keeps a live row's value when it has one.  ``last_mid_price`` is not
    touched.  If a market id repeats, its last record wins.

    Runs in ``conn.transaction()``: committed on return unless the caller
    already has a transaction open (then a savepoint inside it).

    Raises:
        DatabaseError: the statement failed (e.g. a condition id already
            belongs to another market id); the message is one line.
    """
    columns = _columns(markets)
    if not columns[0]:
        return 0
    try:
        with conn.transaction(), conn.cursor() as cur:
            cur.execute(_UPSERT, columns)
            return cur.rowcount
    except psycopg.Error as exc:
        raise DatabaseError(f"cannot upsert {len(columns[0])} markets: {_one_line(exc)}") from exc


def warn_on_stderr(line: str) -> None:
    """The default ``warn``: ``polystream: warning: <line>`` on standard error."""
    print(f"polystream: warning: {line}", file=sys.stderr)


def without_tokens_warnings(
    conn: psycopg.Connection[Any], markets: Sequence[GammaMarket]
) -> list[str]:
    """
    One line per market of ``markets`` without ``clob_token_ids``, read before
    they are upserted: it cannot be priced until Gamma fills them in, or, when
    its row already has token ids, those are kept.  Blocking.

    Raises:
        DatabaseError: the lookup of stored token ids failed.
    """
    empty = {m.id: m for m in markets if not m.clob_token_ids}
    if not empty:
        return []
    try:
        rows = conn.execute(
            "SELECT id FROM markets WHERE id = ANY(%s) AND jsonb_typeof(clob_token_ids) = 'array'"
            " AND clob_token_ids <> '[]'::jsonb",
            (list(empty),),
        ).fetchall()
    except psycopg.Error as exc:
        raise DatabaseError(f"cannot read markets: {_one_line(exc)}") from exc
    stored = {str(row[0]) for row in rows}
    lines = []
    for market in empty.values():
        name = f"market {market.id} ({market.slug or market.question or 'no slug'})"
        if market.id in stored:
            lines.append(f"{name} has no clobTokenIds: the token ids already stored are kept")
        else:
            lines.append(
                f"{name} has no clobTokenIds: imported, but it cannot be priced until Gamma "
                "fills them in (`polystream run` asks Gamma for them while an active position "
                "holds the market)"
            )
    return lines


def import_markets_file(
    conn: psycopg.Connection[Any], path: Path, *, warn: Warn | None = None
) -> int:
    """
    Read a Gamma payload file (see :func:`parse_gamma_payload`) and upsert it.

    Returns the number of rows written (at least one).  Each market without
    ``clobTokenIds`` is imported and reported to ``warn``, one line each
    (default :func:`warn_on_stderr`); see :func:`without_tokens_warnings`.

    Raises:
        ImportDataError: the file cannot be read or parsed, or holds no
            market object (empty, blank, or an empty array); the message
            names the file.
        DatabaseError: the schema is not migrated (see
            :func:`require_current_schema`), or the upsert failed.
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ImportDataError(f"{path}: cannot read: {exc.strerror}") from exc
    try:
        markets = parse_gamma_payload(data)
    except ImportDataError as exc:
        raise ImportDataError(f"{path}: {exc}") from exc
    if not markets:
        what = "an empty file" if not data.strip() else "no market object in it"
        raise ImportDataError(f"{path}: nothing to import: {what} (expected Gamma market JSON)")
    require_current_schema(conn)
    for line in without_tokens_warnings(conn, markets):
        (warn or warn_on_stderr)(line)
    return upsert_markets(conn, markets)
