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
import sys
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


def _packed(take_profit: list[tuple[int, int]], stop_loss: list[tuple[int, int]]) -> array[int]:
    """``[TP keys | TP ids | SL keys | SL ids]`` of each kind's (key, id) pairs, in their order."""
    values = [key for key, _ in take_profit]
    values += [ident for _, ident in take_profit]
    values += [key for key, _ in stop_loss]
    values += [ident for _, ident in stop_loss]
    return array("q", values)


class _AssetThresholds:
    """
    One asset's TP and SL thresholds, both kinds in ONE ``array('q')``,
    ``entries``: ``[TP keys | TP ids | SL keys | SL ids]``, the first
    ``take_profit`` keys and ids being the TP entries. Keys are ``sign ×
    threshold`` in ``10**-PRICE_DECIMALS``, ids ``sign × position id`` (signs:
    :data:`_SIGN`); each kind is sorted ascending by (key, id), so a price
    crosses exactly a suffix of it. ``tail`` holds the entries added since the
    last :meth:`settle`, ``(kind, key, id)``, not yet in order, so that adding
    many rules costs one merge, not a move of the array each.

    One array an asset rather than a key array and an id array per kind: at
    10 positions an asset (20 entries, 320 bytes) the four arrays and their
    two holders cost about 780 bytes an asset, this about 450.
    """

    __slots__ = ("entries", "tail", "take_profit")

    def __init__(self) -> None:
        self.entries: array[int] = array("q")
        self.take_profit = 0
        self.tail: list[tuple[TpSlKind, int, int]] | None = None

    def __len__(self) -> int:
        """Settled entries, both kinds."""
        return len(self.entries) // 2

    def _span(self, kind: TpSlKind) -> tuple[int, int]:
        """Where the kind's keys start in ``entries``, and how many it has (its ids follow)."""
        if kind == "take_profit":
            return 0, self.take_profit
        start = 2 * self.take_profit
        return start, (len(self.entries) - start) // 2

    def pairs(self, kind: TpSlKind) -> list[tuple[int, int]]:
        """The settled (key, id) entries of ``kind``, ascending."""
        start, count = self._span(kind)
        entries = self.entries
        middle = start + count
        return list(zip(entries[start:middle], entries[middle : middle + count], strict=True))

    def assign(self, take_profit: list[tuple[int, int]], stop_loss: list[tuple[int, int]]) -> None:
        """Hold exactly these (key, id) entries of each kind, each list sorted ascending."""
        self.entries = _packed(take_profit, stop_loss)
        self.take_profit = len(take_profit)

    def top_key(self, kind: TpSlKind) -> int | None:
        """The largest settled key of ``kind`` (the first a price crosses), or None."""
        start, count = self._span(kind)
        return self.entries[start + count - 1] if count else None

    def add(self, kind: TpSlKind, key: int, ident: int) -> None:
        """Add one entry (in order at the next :meth:`settle`)."""
        if self.tail is None:
            self.tail = []
        self.tail.append((kind, key, ident))

    def discard(self, kind: TpSlKind, key: int, ident: int) -> None:
        """Remove one entry if present."""
        self.settle()
        start, count = self._span(kind)
        entries = self.entries
        lo = bisect_left(entries, key, start, start + count)
        hi = bisect_right(entries, key, lo, start + count)
        at = bisect_left(entries, ident, lo + count, hi + count) - count
        if at < hi and entries[at + count] == ident:  # keys[lo:hi] are all ``key``
            del entries[at + count]
            del entries[at]
            if kind == "take_profit":
                self.take_profit -= 1

    def cut(self, kind: TpSlKind, bound: int) -> array[int]:
        """Remove the entries of ``kind`` with key >= ``bound`` (a suffix); their ids, nearest first."""
        start, count = self._span(kind)
        entries = self.entries
        at = bisect_left(entries, bound, start, start + count)
        ids = entries[at + count : start + 2 * count]
        del entries[at + count : start + 2 * count]
        del entries[at : start + count]
        if kind == "take_profit":
            self.take_profit -= start + count - at
        ids.reverse()
        return ids

    def settle(self) -> None:
        """Merge the entries added since the last call into the sorted array."""
        tail = self.tail
        if tail is None:
            return
        self.tail = None
        take_profit, stop_loss = self.pairs("take_profit"), self.pairs("stop_loss")
        for kind, key, ident in tail:
            (take_profit if kind == "take_profit" else stop_loss).append((key, ident))
        take_profit.sort()  # linear on the sorted run, then the new entries merged in
        stop_loss.sort()
        self.assign(take_profit, stop_loss)

    def same(self, other: _AssetThresholds) -> bool:
        """Whether both hold the same entries of each kind."""
        self.settle()
        other.settle()
        return self.take_profit == other.take_profit and self.entries == other.entries


@attrs.define(eq=False)
class TpSlTable:
    """
    TP/SL rules at rest, without an object per rule (about 37 bytes a rule
    at 10,000 assets and 200,000 rules, asset ids aside, of which 16 in the
    sorted arrays; 56 with an array per asset, kind and field):

    * per asset one ``array('q')``, each kind's thresholds and position ids
      sorted by threshold (:class:`_AssetThresholds`), so a price update finds
      the rules it crosses by bisection, O(log n + k);
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
        asset_of, pids = table._asset_of, table._pids
        pos_asset = table._pos_asset
        tp_levels, sl_levels = table._pos_level["take_profit"], table._pos_level["stop_loss"]
        tp_cache: dict[str | None, tuple[int, int]] = {None: (-1, 0)}  # text -> (level, key)
        sl_cache: dict[str | None, tuple[int, int]] = {None: (-1, 0)}
        # Per asset, its entries in row order: (kind, key, id) triples, kind 0 TP, 1 SL.
        staged: list[array[int]] = []
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
                staged.append(array("q"))
            pids.append(pid)
            pos_asset.append(asset)
            tp_levels.append(tp[0])
            sl_levels.append(sl[0])
            if tp[0] >= 0:
                staged[asset].extend((0, tp[1], -pid))
            if sl[0] >= 0:
                staged[asset].extend((1, sl[1], pid))
        for sides, triples in zip(table._assets, staged, strict=True):
            # by kind, then (key, id)
            ordered = sorted(zip(triples[0::3], triples[1::3], triples[2::3], strict=True))
            sides.assign(
                [(key, ident) for kind, key, ident in ordered if kind == 0],
                [(key, ident) for kind, key, ident in ordered if kind == 1],
            )
            table._count += len(sides)
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
        """
        The index of ``asset_id``, added on first use; the id is kept as the
        process-wide interned string (``sys.intern``), shared with the books
        and the catalog rather than a copy per table.
        """
        asset = self._asset_of.get(asset_id)
        if asset is None:
            asset_id = sys.intern(asset_id)
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
        return self._assets[mine].same(other._assets[theirs])

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
        self._assets[asset].add(kind, key, sign * self._pids[slot])
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
        self._assets[self._pos_asset[slot]].discard(kind, key, sign * self._pids[slot])
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
        if sides.tail is not None:
            sides.settle()
        scaled = price.scaleb(PRICE_DECIMALS)
        # The largest key is the one a price crosses first: most ticks stop here.
        tp_top, sl_top = sides.top_key("take_profit"), sides.top_key("stop_loss")
        tp_crossed = tp_top is not None and tp_top >= -math.floor(scaled)
        sl_crossed = sl_top is not None and sl_top >= math.ceil(scaled)
        if not (tp_crossed or sl_crossed):
            return []
        crossed: list[TpSlRule] = []
        slots: list[int] = []
        if tp_crossed:
            self._cut(asset_id, "take_profit", sides, -math.floor(scaled), crossed, slots)
        if sl_crossed:
            self._cut(asset_id, "stop_loss", sides, math.ceil(scaled), crossed, slots)
        for slot in slots:
            for kind in TPSL_KINDS:
                self._unlink(slot, kind)
            self._pos_asset[slot] = -1
        return crossed

    def _cut(
        self,
        asset_id: str,
        kind: TpSlKind,
        sides: _AssetThresholds,
        bound: int,
        crossed: list[TpSlRule],
        slots: list[int],
    ) -> None:
        """Take the entries of ``kind`` with key >= ``bound`` (a suffix), nearest first."""
        sign = _SIGN[kind]
        levels = self._pos_level[kind]
        for ident in sides.cut(kind, _clamped(bound)):
            slot = self._slot(sign * ident)
            crossed.append(TpSlRule(sign * ident, asset_id, kind, self._levels[levels[slot]]))
            levels[slot] = -1
            self._count -= 1
            slots.append(slot)


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
