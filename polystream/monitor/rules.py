"""
The rules the monitor watches and the decisions it makes: take-profit /
stop-loss thresholds of active positions (:class:`TpSlTable`), pending timed
predictions, and :class:`Decision`, what a rule that fired says. Loaded from
the database as sets (:func:`load_rules`), streamed through a server-side
cursor so a 100,000-row load never holds the event loop's thread for long
and never holds the whole result in memory.

Prices are probabilities in [0, 1] (``Decimal``); prediction windows are epoch
seconds; stakes are USDC.
"""

from __future__ import annotations

import math
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Iterator
from decimal import ROUND_FLOOR, Decimal
from typing import Any, Literal, get_args

import attrs
import psycopg

__all__ = [
    "DECISION_KINDS",
    "PRICE_DECIMALS",
    "TPSL_KINDS",
    "Decision",
    "DecisionKind",
    "Prediction",
    "RuleSet",
    "Timing",
    "TpSlKind",
    "TpSlRule",
    "TpSlTable",
    "decision_time",
    "load_rules",
    "tpsl_dedupe_key",
]

Timing = Literal["from_start", "from_end", "percentage", "edge"]
DecisionKind = Literal["take_profit", "stop_loss", "prediction", "prediction_skipped"]
DECISION_KINDS: tuple[DecisionKind, ...] = get_args(DecisionKind)
"""What a rule that fired decided: ``triggers.kind``."""

TpSlKind = Literal["take_profit", "stop_loss"]
TPSL_KINDS: tuple[TpSlKind, ...] = get_args(TpSlKind)
"""The two kinds of threshold a position may have."""

PRICE_DECIMALS = 12
"""
Thresholds are kept as integers of ``10**-PRICE_DECIMALS``: a price with at
most this many decimals (the venue's have at most 4, a midpoint 5) compares
with any threshold exactly (see :class:`TpSlTable`).
"""


def tpsl_dedupe_key(position_id: int, kind: TpSlKind, threshold: Decimal) -> str:
    """The ``triggers.dedupe_key`` of a TP/SL rule: one per position, kind and threshold."""
    return f"position:{position_id}:{kind}:{threshold}"


@attrs.frozen
class TpSlRule:
    """A take-profit or stop-loss threshold (probability in [0, 1]) of one position."""

    position_id: int
    asset_id: str
    kind: TpSlKind
    threshold: Decimal

    @property
    def dedupe_key(self) -> str:
        """Unique per position, kind and threshold: the same rule fires once."""
        return tpsl_dedupe_key(self.position_id, self.kind, self.threshold)


@attrs.frozen
class Prediction:
    """
    A timed bet: buy ``asset_id`` for ``stake_usdc`` USDC at most at
    ``limit_price`` (probability), decided inside ``[opens_at, closes_at]``
    (epoch seconds) by ``timing``:

    * ``from_start``: ``delay_s`` after opening;
    * ``from_end``: ``delay_s`` before closing (the default: windows close early);
    * ``percentage``: at ``fraction`` (0..1) of the window;
    * ``edge``: at the first tick in ``[opens_at, deadline)`` where
      ``forecast_probability - best_ask >= min_edge``, the deadline being
      the ``from_end`` moment; skipped with ``no_edge`` at the deadline if
      that never happened (quoted or not then: an edge is never deferred).

    A ``from_start``/``from_end``/``percentage`` prediction due while its
    asset has no best ask is deferred until an ask arrives (then decided
    with it) or the window closes (then skipped ``no_price``).
    """

    id: int
    asset_id: str
    stake_usdc: Decimal
    limit_price: Decimal
    opens_at: float
    closes_at: float
    timing: Timing = "from_end"
    delay_s: float = 0.0
    fraction: float = 0.5
    forecast_probability: Decimal | None = None
    min_edge: Decimal | None = None

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Prediction:
        """Build from a ``predictions`` row (dict row; timestamps as datetimes)."""
        return cls(
            id=int(row["id"]),
            asset_id=str(row["token_id"]),
            stake_usdc=row["stake_usdc"] or Decimal(0),
            limit_price=row["limit_price"] if row["limit_price"] is not None else Decimal(1),
            opens_at=row["opens_at"].timestamp(),
            closes_at=row["closes_at"].timestamp(),
            timing=row["timing_mode"] or "from_end",
            delay_s=float(row["delay_s"] or 0.0),
            fraction=float(row["fraction"] if row["fraction"] is not None else 0.5),
            forecast_probability=row["forecast_probability"],
            min_edge=row["min_edge"],
        )


def decision_time(prediction: Prediction) -> float:
    """
    When a prediction must be decided (epoch seconds): the scheduled moment
    for ``from_start``/``from_end``/``percentage``, the ``no_edge`` deadline
    for ``edge``; clamped into the window.
    """
    opens, closes = prediction.opens_at, prediction.closes_at
    if prediction.timing == "from_start":
        at = opens + prediction.delay_s
    elif prediction.timing == "percentage":
        at = opens + prediction.fraction * (closes - opens)
    else:  # from_end, and edge's deadline
        at = closes - prediction.delay_s
    return min(max(at, opens), closes)


@attrs.frozen
class Decision:
    """
    A rule that fired: what to write. ``price`` is the price seen
    (probability), ``reason`` a short snake_case word.
    """

    kind: DecisionKind
    dedupe_key: str
    price: Decimal | None
    reason: str
    position_id: int | None = None
    prediction_id: int | None = None
    decided_at: float = 0.0


# ------------------------------------------------------------------ TP/SL table

_KEY_MAX = 2**63 - 1
_KEY_MIN = -(2**63)
_SIGN: dict[str, int] = {"take_profit": -1, "stop_loss": 1}
"""Keys are ``sign × threshold``: so the crossed rules of either kind are a suffix."""


def _clamped(value: int) -> int:
    return _KEY_MIN if value < _KEY_MIN else _KEY_MAX if value > _KEY_MAX else value


def _threshold_key(threshold: Decimal, sign: int) -> int | None:
    """``floor(sign × threshold × 10**PRICE_DECIMALS)`` as an int64, None for NaN."""
    if threshold.is_nan():
        return None
    if threshold.is_infinite():
        return _KEY_MAX if (threshold > 0) == (sign > 0) else _KEY_MIN
    scaled = (threshold if sign > 0 else -threshold).scaleb(PRICE_DECIMALS)
    return _clamped(int(scaled.to_integral_value(rounding=ROUND_FLOOR)))


@attrs.define(slots=True, eq=False)
class _Side:
    """
    One asset's thresholds of one kind: ``keys`` (``sign × threshold`` in
    ``10**-PRICE_DECIMALS``) and ``ids`` (``sign × position id``), parallel,
    sorted ascending by (key, id), so a price crosses exactly a suffix; and
    entries added since the last :meth:`settle`, not yet in order (``tail``),
    so that adding many rules costs one merge, not a move of the arrays each.
    """

    keys: array[int] = attrs.field(factory=lambda: array("q"))
    ids: array[int] = attrs.field(factory=lambda: array("q"))
    tail: list[tuple[int, int]] | None = None

    def _find(self, key: int, ident: int, lo: int = 0) -> int:
        """Where (key, ident) is or would go in the settled arrays, from ``lo``."""
        lo = bisect_left(self.keys, key, lo)
        hi = bisect_right(self.keys, key, lo)
        return bisect_left(self.ids, ident, lo, hi)

    def add(self, key: int, ident: int) -> None:
        """Add one entry (in order at the next :meth:`settle`)."""
        if self.tail is None:
            self.tail = []
        self.tail.append((key, ident))

    def discard(self, key: int, ident: int) -> None:
        """Remove one entry if present."""
        self.settle()
        at = self._find(key, ident)
        if at < len(self.ids) and self.ids[at] == ident and self.keys[at] == key:
            del self.keys[at]
            del self.ids[at]

    def sort(self) -> None:
        """Order the arrays after a bulk load appended to them unsorted."""
        if len(self.keys) > 1:
            pairs = sorted(zip(self.keys, self.ids, strict=True))
            self.keys = array("q", [key for key, _ in pairs])
            self.ids = array("q", [ident for _, ident in pairs])

    def settle(self) -> None:
        """Merge the entries added since the last call into the sorted arrays."""
        tail = self.tail
        if tail is None:
            return
        self.tail = None
        tail.sort()
        if not self.keys:
            self.keys = array("q", [key for key, _ in tail])
            self.ids = array("q", [ident for _, ident in tail])
            return
        keys, ids = array("q"), array("q")
        start = 0
        for key, ident in tail:  # copy runs of the old arrays between the new entries
            at = self._find(key, ident, start)
            keys += self.keys[start:at]
            ids += self.ids[start:at]
            keys.append(key)
            ids.append(ident)
            start = at
        keys += self.keys[start:]
        ids += self.ids[start:]
        self.keys, self.ids = keys, ids


@attrs.define(slots=True, eq=False)
class _AssetThresholds:
    """One asset's TP and SL thresholds (see :class:`_Side`)."""

    take_profit: _Side = attrs.field(factory=_Side)
    stop_loss: _Side = attrs.field(factory=_Side)

    def side(self, kind: str) -> _Side:
        """The side of ``kind`` (``take_profit`` or ``stop_loss``)."""
        return self.take_profit if kind == "take_profit" else self.stop_loss


@attrs.define(eq=False)
class TpSlTable:
    """
    TP/SL rules at rest, without an object per rule (about 75 bytes a rule
    at 10,000 assets and 200,000 rules, of which 16 in the sorted arrays):

    * per asset and kind, two parallel ``array('q')`` sorted by threshold,
      so a price update finds the rules it crosses by bisection, O(log n + k);
    * thresholds as integers of ``10**-PRICE_DECIMALS``, floor-rounded
      towards not firing, compared with the price rounded the other way: exact
      whenever the price or the threshold has at most :data:`PRICE_DECIMALS`
      decimals (venue prices have at most 5); NaN thresholds never fire;
    * each asset id string once, each distinct written threshold
      (``Decimal``, kept for ``dedupe_key``) once;
    * positions in arrays sorted by id (asset and two threshold indexes per
      position; removed positions leave a hole until the next full load).

    A position's rules are on its one asset: a rule on another asset
    replaces its other rule too. :class:`TpSlRule` objects are made only on
    the way out (:meth:`get`, :meth:`take_crossed`, iteration). Not thread
    safe: build one in a worker thread, then hand it over whole.
    """

    _asset_ids: list[str] = attrs.field(factory=list)
    _asset_of: dict[str, int] = attrs.field(factory=dict)
    _assets: list[_AssetThresholds] = attrs.field(factory=list)
    _levels: list[Decimal] = attrs.field(factory=list)
    _level_of: dict[str, int] = attrs.field(factory=dict)
    _pids: array[int] = attrs.field(factory=lambda: array("q"))
    _pos_asset: array[int] = attrs.field(factory=lambda: array("i"))  # -1: no rule
    _pos_level: dict[str, array[int]] = attrs.field(
        factory=lambda: {kind: array("i") for kind in TPSL_KINDS}  # -1: no rule of that kind
    )
    _count: int = 0

    # -------------------------------------------------------- building

    @classmethod
    def from_rows(cls, rows: Iterable[tuple[int, str, str | None, str | None]]) -> TpSlTable:
        """
        Build from ``(position_id, asset_id, take_profit, stop_loss)`` rows in
        ascending, unique position id order (thresholds: probabilities as
        decimal text, as PostgreSQL writes ``numeric``, None for none),
        streaming: per row only a few array entries are kept, and each asset
        id and written threshold once.

        Raises:
            ValueError: the position ids are not strictly ascending.
        """
        table = cls()
        asset_of, assets, pids = table._asset_of, table._assets, table._pids
        pos_asset = table._pos_asset
        tp_levels, sl_levels = table._pos_level["take_profit"], table._pos_level["stop_loss"]
        tp_cache: dict[str | None, tuple[int, int]] = {None: (-1, 0)}  # text -> (level, key)
        sl_cache: dict[str | None, tuple[int, int]] = {None: (-1, 0)}
        last = _KEY_MIN
        for pid, asset_id, take_profit, stop_loss in rows:
            if pid <= last:
                raise ValueError(f"position ids not ascending: {pid} after {last}")
            last = pid
            tp = tp_cache.get(take_profit)
            if tp is None:
                tp = tp_cache[take_profit] = table._level_key(take_profit, -1)
            sl = sl_cache.get(stop_loss)
            if sl is None:
                sl = sl_cache[stop_loss] = table._level_key(stop_loss, 1)
            if tp[0] < 0 and sl[0] < 0:
                continue
            asset = asset_of.get(asset_id)
            if asset is None:
                asset = table._intern_asset(asset_id)
            sides = assets[asset]
            pids.append(pid)
            pos_asset.append(asset)
            tp_levels.append(tp[0])
            sl_levels.append(sl[0])
            if tp[0] >= 0:
                sides.take_profit.keys.append(tp[1])
                sides.take_profit.ids.append(-pid)
            if sl[0] >= 0:
                sides.stop_loss.keys.append(sl[1])
                sides.stop_loss.ids.append(pid)
        for sides in assets:
            sides.take_profit.sort()
            sides.stop_loss.sort()
            table._count += len(sides.take_profit.keys) + len(sides.stop_loss.keys)
        return table

    def _level_key(self, threshold: str | None, sign: int) -> tuple[int, int]:
        """(level, key) of a threshold for a side of ``sign``; level -1 for none or NaN."""
        level = self._level(threshold)
        key = _threshold_key(self._levels[level], sign) if level >= 0 else None
        return (-1, 0) if key is None else (level, key)

    @classmethod
    def of(cls, rules: Iterable[TpSlRule]) -> TpSlTable:
        """Build from rules in any order (the last of a position and kind wins)."""
        table = cls()
        for rule in sorted(rules, key=lambda rule: rule.position_id):  # stable: last wins
            table.add(rule)
        return table

    def _level(self, threshold: Decimal | str | None) -> int:
        """The index of a threshold's written form (-1: none, or NaN)."""
        if threshold is None:
            return -1
        text = threshold if isinstance(threshold, str) else str(threshold)
        level = self._level_of.get(text)
        if level is None:
            value = Decimal(text) if isinstance(threshold, str) else threshold
            if value.is_nan():
                return -1
            level = self._level_of[text] = len(self._levels)
            self._levels.append(value)
        return level

    def _intern_asset(self, asset_id: str) -> int:
        asset = self._asset_of.get(asset_id)
        if asset is None:
            asset = self._asset_of[asset_id] = len(self._asset_ids)
            self._asset_ids.append(asset_id)
            self._assets.append(_AssetThresholds())
        return asset

    def _slot(self, position_id: int) -> int:
        """Index of ``position_id`` in the position arrays, or -1."""
        at = bisect_left(self._pids, position_id)
        return at if at < len(self._pids) and self._pids[at] == position_id else -1

    # -------------------------------------------------------- reading

    def __len__(self) -> int:
        """Rules (a position with TP and SL counts two)."""
        return self._count

    def __iter__(self) -> Iterator[TpSlRule]:
        """Every rule, by position id, TP before SL (made on the fly)."""
        for slot in range(len(self._pids)):
            for kind in TPSL_KINDS:
                rule = self._rule(slot, kind)
                if rule is not None:
                    yield rule

    def _rule(self, slot: int, kind: TpSlKind) -> TpSlRule | None:
        level = self._pos_level[kind][slot]
        if level < 0:
            return None
        asset_id = self._asset_ids[self._pos_asset[slot]]
        return TpSlRule(self._pids[slot], asset_id, kind, self._levels[level])

    def get(self, position_id: int, kind: TpSlKind) -> TpSlRule | None:
        """The position's rule of ``kind``, or None."""
        slot = self._slot(position_id)
        return None if slot < 0 else self._rule(slot, kind)

    def position_ids(self) -> list[int]:
        """Positions with at least one rule, ascending."""
        return [pid for pid, asset in zip(self._pids, self._pos_asset, strict=True) if asset >= 0]

    def asset_ids(self) -> list[str]:
        """Assets that have rules or had some since the table was built (a copy)."""
        return self._asset_ids.copy()

    def watches(self, asset_id: str) -> bool:
        """
        Whether ``asset_id`` may have rules: it had some since the table was
        built (cheap; an asset whose rules all went stays until a full reload).
        """
        return asset_id in self._asset_of

    def same_rules(self, asset_id: str, other: TpSlTable) -> bool:
        """Whether ``other`` holds the same thresholds (by value) of the same positions on ``asset_id``."""
        mine, theirs = self._asset_of.get(asset_id), other._asset_of.get(asset_id)
        if mine is None or theirs is None:
            return mine is None and theirs is None
        for kind in TPSL_KINDS:
            a, b = self._assets[mine].side(kind), other._assets[theirs].side(kind)
            a.settle()
            b.settle()
            if a.keys != b.keys or a.ids != b.ids:
                return False
        return True

    # -------------------------------------------------------- changing

    def add(self, rule: TpSlRule) -> None:
        """
        Watch ``rule``, replacing the position's rule of that kind; a rule on
        another asset than the position's other rule removes that one (a
        position's rules are on its one asset: its token). A NaN threshold
        removes the position's rule of that kind (it would never fire).
        """
        level = self._level(rule.threshold)
        slot = self._slot(rule.position_id)
        if slot < 0:
            at = bisect_left(self._pids, rule.position_id)
            self._pids.insert(at, rule.position_id)
            self._pos_asset.insert(at, -1)
            for kind in TPSL_KINDS:
                self._pos_level[kind].insert(at, -1)
            slot = at
        asset = self._intern_asset(rule.asset_id)
        self._unlink(slot, rule.kind)
        other: TpSlKind = "stop_loss" if rule.kind == "take_profit" else "take_profit"
        if self._pos_asset[slot] not in (-1, asset):
            self._unlink(slot, other)  # a position's rules are on its one asset
        if level >= 0:
            self._link(slot, asset, rule.kind, level)
        self._forget_if_empty(slot)

    def remove(self, position_id: int, kind: TpSlKind) -> bool:
        """Stop watching one rule; False if there was none."""
        slot = self._slot(position_id)
        if slot < 0 or self._pos_level[kind][slot] < 0:
            return False
        self._unlink(slot, kind)
        self._forget_if_empty(slot)
        return True

    def _link(self, slot: int, asset: int, kind: TpSlKind, level: int) -> None:
        sign = _SIGN[kind]
        key = _threshold_key(self._levels[level], sign)
        assert key is not None
        self._assets[asset].side(kind).add(key, sign * self._pids[slot])
        self._pos_asset[slot] = asset
        self._pos_level[kind][slot] = level
        self._count += 1

    def _unlink(self, slot: int, kind: TpSlKind) -> None:
        level = self._pos_level[kind][slot]
        if level < 0:
            return
        sign = _SIGN[kind]
        key = _threshold_key(self._levels[level], sign)
        assert key is not None
        self._assets[self._pos_asset[slot]].side(kind).discard(key, sign * self._pids[slot])
        self._pos_level[kind][slot] = -1
        self._count -= 1

    def _forget_if_empty(self, slot: int) -> None:
        """Mark the position rule-less if neither kind is left."""
        if all(self._pos_level[kind][slot] < 0 for kind in TPSL_KINDS):
            self._pos_asset[slot] = -1

    def take_crossed(self, asset_id: str, price: Decimal) -> list[TpSlRule]:
        """
        Remove and return the rules of ``asset_id`` that ``price``
        (probability) crosses: take-profits with ``price >= threshold``,
        ascending, then stop-losses with ``price <= threshold``, descending.
        A crossed position's other rule is removed too (it is closing).
        """
        asset = self._asset_of.get(asset_id)
        if asset is None or not price.is_finite():
            return []
        sides = self._assets[asset]
        take_profit, stop_loss = sides.take_profit, sides.stop_loss
        if take_profit.tail is not None:
            take_profit.settle()
        if stop_loss.tail is not None:
            stop_loss.settle()
        scaled = price.scaleb(PRICE_DECIMALS)
        # The largest key is the one a price crosses first: most ticks stop here.
        tp_crossed = bool(take_profit.keys) and take_profit.keys[-1] >= -math.floor(scaled)
        sl_crossed = bool(stop_loss.keys) and stop_loss.keys[-1] >= math.ceil(scaled)
        if not (tp_crossed or sl_crossed):
            return []
        crossed: list[TpSlRule] = []
        slots: list[int] = []
        if tp_crossed:
            self._cut(asset_id, "take_profit", take_profit, -math.floor(scaled), crossed, slots)
        if sl_crossed:
            self._cut(asset_id, "stop_loss", stop_loss, math.ceil(scaled), crossed, slots)
        for slot in slots:
            for kind in TPSL_KINDS:
                self._unlink(slot, kind)
            self._pos_asset[slot] = -1
        return crossed

    def _cut(
        self,
        asset_id: str,
        kind: TpSlKind,
        side: _Side,
        bound: int,
        crossed: list[TpSlRule],
        slots: list[int],
    ) -> None:
        """Take the entries of ``side`` with key >= ``bound`` (a suffix), nearest first."""
        start = bisect_left(side.keys, _clamped(bound))
        sign = _SIGN[kind]
        levels = self._pos_level[kind]
        for ident in reversed(side.ids[start:]):
            slot = self._slot(sign * ident)
            crossed.append(TpSlRule(sign * ident, asset_id, kind, self._levels[levels[slot]]))
            levels[slot] = -1
            self._count -= 1
            slots.append(slot)
        del side.keys[start:]
        del side.ids[start:]


def _as_table(value: TpSlTable | Iterable[TpSlRule]) -> TpSlTable:
    return value if isinstance(value, TpSlTable) else TpSlTable.of(value)


@attrs.define
class RuleSet:
    """
    What :func:`load_rules` read: the rules the database holds now.
    ``tpsl`` may be given as rules (tests); it is kept as a :class:`TpSlTable`,
    which a full reload hands to the monitor as its own.
    """

    tpsl: TpSlTable = attrs.field(factory=TpSlTable, converter=_as_table)
    predictions: list[Prediction] = attrs.field(factory=list)


_LOAD_TPSL = """
SELECT id, token_id, take_profit_price::text, stop_loss_price::text FROM positions
WHERE status = 'active' AND token_id IS NOT NULL
  AND (take_profit_price IS NOT NULL OR stop_loss_price IS NOT NULL)
"""

_LOAD_PREDICTIONS = """
SELECT id, token_id, stake_usdc, limit_price, opens_at, closes_at, timing_mode, delay_s,
       fraction, forecast_probability, min_edge
FROM predictions
WHERE status = 'pending' AND token_id IS NOT NULL AND opens_at IS NOT NULL
  AND closes_at IS NOT NULL
"""

_BATCH = 2000


def _rows_in_batches(cursor: Any, size: int = _BATCH) -> Iterator[Any]:
    """
    Rows ``size`` at a time: psycopg converts a whole ``fetchall`` in C without
    releasing the GIL, which would stall the event loop's thread for a second
    on 100,000 rows; between batches the interpreter can switch threads.
    """
    while rows := cursor.fetchmany(size):
        yield from rows


def load_rules(
    conn: psycopg.Connection[Any],
    position_ids: list[int] | None = None,
    prediction_ids: list[int] | None = None,
) -> RuleSet:
    """
    Read the active TP/SL rules and pending predictions: all of them, or,
    with ``position_ids``/``prediction_ids``, only those rows (an incremental
    reload after NOTIFY; a row absent from the result has no rule any more).
    Positions stream straight into a :class:`TpSlTable`, all of them through
    a server-side cursor (run it inside a transaction: a ``DbLink`` call is).

    Raises:
        psycopg.Error: the database failed.
    """
    tpsl_query, prediction_query = _LOAD_TPSL, _LOAD_PREDICTIONS
    params: dict[str, Any] = {}
    if position_ids is not None or prediction_ids is not None:
        tpsl_query += " AND id = ANY(%(positions)s)"
        prediction_query += " AND id = ANY(%(predictions)s)"
        params = {"positions": position_ids or [], "predictions": prediction_ids or []}
    # All rows: a server-side cursor, so only a batch is ever in memory; a few: one round trip.
    full = not params
    with conn.cursor(name="polystream_tpsl_rules") if full else conn.cursor() as cur:
        cur.execute(tpsl_query + " ORDER BY id", params)
        table = TpSlTable.from_rows(_rows_in_batches(cur))
    predictions = []
    with conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        for row in _rows_in_batches(cur.execute(prediction_query, params)):
            predictions.append(Prediction.from_row(row))
    return RuleSet(tpsl=table, predictions=predictions)


def _prediction_key(prediction_id: int) -> str:
    """The ``triggers.dedupe_key`` of a prediction's decision: one per prediction."""
    return f"prediction:{prediction_id}"
