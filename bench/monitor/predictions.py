"""
The monitor benchmark's predictions: the groups of :data:`PREDICTION_MIX`,
each planned to test one rule the monitor documents (timing modes, deferral
while an asset has no ask, the edge deadline; ``polystream/monitor/``).

A decision time is only ever placed where the books it sees are known: before
the tape starts (no quote at all: the sender holds the tape), after the daemon
has applied the whole tape (the final books), or long after the stop; each at
least MARGIN_S away from those moments. Their outcomes are computed in
:mod:`bench.monitor.expected`.
"""

from __future__ import annotations

import datetime
import random
from collections.abc import Sequence
from decimal import Decimal
from typing import Any, Literal

import attrs

from bench.harness import Market
from bench.monitor.recording import AskFacts

Phase = Literal["before_tape", "after_tape"]

PREDICTION_WINDOW_S = 900.0  # long windows: "late" decision times stay far after the stop
EARLY_DUE_S = (1.0, 6.0)  # before-tape decisions: s after planning (the tape waits for them)
LATE_FROM = 0.6  # not-yet-due decisions: at least this far into the window (540 s)
AFTER_DUE_S = (2.0, 3.0)  # after-tape decisions: s after insertion
AFTER_CLOSE_S = 4.0  # the no_price group's windows close this long after insertion
AFTER_EDGE_DEADLINE_S = 3.0  # the no_edge group's deadline, after insertion
LOAD_WITHIN_S = 1.5  # inserted predictions must be loaded before the first is due
MARGIN_S = 2.0  # a decision time's distance from any moment it could be confused with
HIGH_LIMIT, LOW_LIMIT = Decimal("0.99"), Decimal("0.05")
HIGH_FORECAST, LOW_FORECAST = Decimal("0.99"), Decimal("0.01")

# (share, group, phase): what each group tests
PREDICTION_MIX: tuple[tuple[float, str, Phase], ...] = (
    (0.15, "late_from_end", "before_tape"),  # due long after the stop: pending
    (0.15, "late_percentage", "before_tape"),
    (0.15, "edge_never", "before_tape"),  # forecast 0.01, min edge 0.05: no ask gives it
    (0.10, "edge_first_ask", "before_tape"),  # forecast 0.99, min edge 0: the first ask
    (0.15, "due_before_tape", "before_tape"),  # due with no quote: deferred, then first ask
    (0.10, "due_after_tape", "after_tape"),  # due on the final books (or deferred)
    (0.05, "no_price", "after_tape"),  # assets without a final ask, window closes in 4 s
    (0.05, "window_closed", "after_tape"),  # the window closed before insertion
    (0.05, "no_edge", "after_tape"),  # forecast 0.01, deadline 3 s after insertion
    (0.05, "edge_final_ask", "after_tape"),  # forecast 0.99: decided when loaded, if quoted
)


@attrs.frozen
class PredictionPlan:
    """
    One pending prediction to insert (times epoch seconds, prices
    probabilities), of a ``group`` of :data:`PREDICTION_MIX`, inserted in
    ``phase``: before the daemon starts, or once it has applied the tape.
    """

    id: int
    group: str
    phase: Phase
    market: str
    outcome: str
    token: str
    timing: str
    delay_s: float
    fraction: float
    forecast: Decimal | None
    min_edge: Decimal | None
    limit: Decimal
    opens_at: float
    closes_at: float

    @property
    def decision_at(self) -> float:
        """
        When it is due (epoch s), as ``predictions.timing_mode`` is specified:
        ``from_start`` delay after opening, ``percentage`` of the window,
        ``from_end`` delay before closing (and ``edge``'s no-edge deadline),
        clamped into the window.
        """
        if self.timing == "from_start":
            at = self.opens_at + self.delay_s
        elif self.timing == "percentage":
            at = self.opens_at + self.fraction * (self.closes_at - self.opens_at)
        else:
            at = self.closes_at - self.delay_s
        return min(max(at, self.opens_at), self.closes_at)

    def row(self) -> tuple[Any, ...]:
        """The ``predictions`` row (COPY column order of :func:`insert_predictions`)."""
        return (
            self.id,
            "bench",
            self.market,
            self.token,
            self.outcome,
            Decimal(5),
            self.limit,
            _ts(self.opens_at),
            _ts(self.closes_at),
            self.timing,
            self.delay_s,
            self.fraction,
            self.forecast,
            self.min_edge,
        )


def _ts(epoch: float) -> Any:
    return datetime.datetime.fromtimestamp(epoch, tz=datetime.UTC)


def mix_counts(count: int) -> list[tuple[str, Phase, int]]:
    """``(group, phase, predictions)`` of :data:`PREDICTION_MIX` for ``count`` in all."""
    return [(group, phase, round(share * count)) for share, group, phase in PREDICTION_MIX]


def make_predictions(
    count: int,
    markets: Sequence[Market],
    facts: AskFacts,
    phase: Phase,
    now: float,
    seed: int,
) -> list[PredictionPlan]:
    """
    The predictions of ``phase`` (ids numbered over both phases, in
    :data:`PREDICTION_MIX` order), planned at ``now`` (epoch s): before the
    daemon starts for ``before_tape``, at insertion for ``after_tape``.
    """
    rng = random.Random(f"{seed}-{phase}")
    owners = [owner for m in markets for owner in m.owners]
    unquoted = [owner for owner in owners if owner[2] not in facts.quoted_at_end()]
    plans: list[PredictionPlan] = []
    pid = 0
    for group, group_phase, n in mix_counts(count):
        for _ in range(n):
            pid += 1
            if group_phase != phase:
                continue
            pool = unquoted if group == "no_price" else owners
            plans.append(_plan(pid, group, phase, pool[pid % len(pool)], rng, now))
    return plans


@attrs.frozen
class _Terms:
    """A prediction's timing and window (epoch s), and its forecast and edge (None: timed)."""

    timing: str
    delay_s: float
    fraction: float
    opens_at: float
    closes_at: float
    forecast: Decimal | None = None
    min_edge: Decimal | None = None


def _plan(
    pid: int,
    group: str,
    phase: Phase,
    owner: tuple[str, str, str],
    rng: random.Random,
    now: float,
) -> PredictionPlan:
    """
    One prediction of ``group`` planned at ``now`` (epoch s); timed ones
    cycle through the three timing modes, every fourth has the low limit.
    """
    market, outcome, token = owner
    limit = LOW_LIMIT if pid % 4 == 0 else HIGH_LIMIT
    if group.startswith("edge_") or group == "no_edge":
        terms = _edge_terms(group, phase, rng, now)
    else:
        terms = _timed_terms(pid, group, rng, now)
    return PredictionPlan(
        pid,
        group,
        phase,
        market,
        outcome,
        token,
        terms.timing,
        terms.delay_s,
        terms.fraction,
        terms.forecast,
        terms.min_edge,
        limit,
        terms.opens_at,
        terms.closes_at,
    )


def _timed_terms(pid: int, group: str, rng: random.Random, now: float) -> _Terms:
    """The timing of a timed prediction of ``group``: due when the group says (or never)."""
    window = PREDICTION_WINDOW_S
    opens, closes = now, now + window
    timing = ("from_start", "from_end", "percentage")[pid % 3]
    delay, fraction = 0.0, 0.5
    due: float | None = None
    if group == "late_from_end":
        timing, delay = "from_end", rng.uniform(0, (1 - LATE_FROM) * window)
    elif group == "late_percentage":
        timing, fraction = "percentage", rng.uniform(LATE_FROM, 0.95)
    elif group == "due_before_tape":
        due = now + rng.uniform(*EARLY_DUE_S)
    elif group == "due_after_tape":
        opens, due = now - 10, now + rng.uniform(*AFTER_DUE_S)
    elif group == "no_price":
        timing, opens, closes = "from_start", now - 1, now + AFTER_CLOSE_S
        due = now + rng.uniform(*AFTER_DUE_S)
    elif group == "window_closed":
        timing, opens, closes, delay = "from_end", now - 60, now - 30, 5.0
    if due is not None:  # the timing mode's parameter that makes it due then
        if timing == "from_start":
            delay = due - opens
        elif timing == "from_end":
            delay = closes - due
        else:
            fraction = (due - opens) / (closes - opens)
    return _Terms(timing, delay, fraction, opens, closes)


def _edge_terms(group: str, phase: Phase, rng: random.Random, now: float) -> _Terms:
    """
    An edge prediction: forecast 0.99 with min edge 0 (any ask up to 0.99
    gives it) or 0.01 with 0.05 (none does); deadline late in a long window,
    or, for ``no_edge``, AFTER_EDGE_DEADLINE_S after ``now``.
    """
    high = group in ("edge_first_ask", "edge_final_ask")
    forecast = HIGH_FORECAST if high else LOW_FORECAST
    min_edge = Decimal(0) if high else Decimal("0.05")
    opens = now - 1 if phase == "after_tape" else now
    closes = now + PREDICTION_WINDOW_S
    delay = rng.uniform(0, (1 - LATE_FROM) * PREDICTION_WINDOW_S)
    if group == "no_edge":
        closes = now + 2 * AFTER_EDGE_DEADLINE_S
        delay = closes - (now + AFTER_EDGE_DEADLINE_S)
    return _Terms("edge", delay, 0.5, opens, closes, forecast, min_edge)
