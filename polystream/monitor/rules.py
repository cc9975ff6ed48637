"""
The rules the monitor watches and the decisions it makes: take-profit /
stop-loss thresholds of active positions, pending timed predictions, and
:class:`Decision`, what a rule that fired says. Loaded from the database as
sets (:func:`load_rules`), in batches so a 100,000-row load never holds the
event loop's thread for long.

Prices are probabilities in [0, 1] (``Decimal``); prediction windows are epoch
seconds; stakes are USDC.
"""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal
from typing import Any, Literal, get_args

import attrs
import psycopg

__all__ = [
    "DECISION_KINDS",
    "Decision",
    "DecisionKind",
    "Prediction",
    "RuleSet",
    "Timing",
    "TpSlRule",
    "decision_time",
    "load_rules",
]

Timing = Literal["from_start", "from_end", "percentage", "edge"]
DecisionKind = Literal["take_profit", "stop_loss", "prediction", "prediction_skipped"]
DECISION_KINDS: tuple[DecisionKind, ...] = get_args(DecisionKind)
"""What a rule that fired decided: ``triggers.kind``."""


@attrs.frozen
class TpSlRule:
    """A take-profit or stop-loss threshold (probability in [0, 1]) of one position."""

    position_id: int
    asset_id: str
    kind: Literal["take_profit", "stop_loss"]
    threshold: Decimal

    @property
    def dedupe_key(self) -> str:
        """Unique per position, kind and threshold: the same rule fires once."""
        return f"position:{self.position_id}:{self.kind}:{self.threshold}"


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


@attrs.define
class RuleSet:
    """What :func:`load_rules` read: the rules the database holds now."""

    tpsl: list[TpSlRule] = attrs.field(factory=list)
    predictions: list[Prediction] = attrs.field(factory=list)


_LOAD_TPSL = """
SELECT id, token_id, take_profit_price, stop_loss_price FROM positions
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


def _rows_in_batches(cursor: Any, size: int = 2000) -> Iterator[Any]:
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
    """
    rules = RuleSet()
    tpsl_query, prediction_query = _LOAD_TPSL, _LOAD_PREDICTIONS
    params: dict[str, Any] = {}
    if position_ids is not None or prediction_ids is not None:
        tpsl_query += " AND id = ANY(%(positions)s)"
        prediction_query += " AND id = ANY(%(predictions)s)"
        params = {"positions": position_ids or [], "predictions": prediction_ids or []}
    for pid, token, tp, sl in _rows_in_batches(conn.execute(tpsl_query, params)):
        if tp is not None:
            rules.tpsl.append(TpSlRule(int(pid), str(token), "take_profit", tp))
        if sl is not None:
            rules.tpsl.append(TpSlRule(int(pid), str(token), "stop_loss", sl))
    with conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        for row in _rows_in_batches(cur.execute(prediction_query, params)):
            rules.predictions.append(Prediction.from_row(row))
    return rules


def _prediction_key(prediction_id: int) -> str:
    """The ``triggers.dedupe_key`` of a prediction's decision: one per prediction."""
    return f"prediction:{prediction_id}"
