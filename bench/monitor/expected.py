"""
What must become of each prediction on a run's timeline, from the recording
alone (:class:`~bench.monitor.recording.AskFacts`), by the rules the monitor
documents: decided at the ask it sees, skipped (``price_above_limit``,
``no_price``, ``window_closed``, ``no_edge``), deferred while no ask exists, or
still pending at the stop.
"""

from __future__ import annotations

from decimal import Decimal

import attrs

from bench.monitor.predictions import MARGIN_S, PredictionPlan
from bench.monitor.recording import AskFacts


@attrs.frozen
class Moments:
    """
    A run's timeline (epoch s): ``tape`` first byte of the tape sent,
    ``applied`` the daemon seen to have applied every frame, ``inserted``
    the after-tape predictions committed (None: none), ``stop`` SIGTERM sent.
    """

    tape: float
    applied: float
    inserted: float | None
    stop: float


class Unattributable(Exception):
    """A prediction's outcome depends on a moment the bench cannot place (a design error)."""


@attrs.frozen
class Expected:
    """
    What must become of one prediction: ``status`` (``pending``, ``decided``,
    ``skipped``), with the trigger's ``reason`` and ``price`` (the ask
    seen); ``deferred``: one ``prediction_deferred`` line; ``still_deferred``:
    deferred at the end; ``not_before``: earliest ``decided_at`` (epoch s).
    """

    status: str
    reason: str | None = None
    price: Decimal | None = None
    deferred: bool = False
    still_deferred: bool = False
    not_before: float | None = None

    @property
    def kind(self) -> str | None:
        """The ``triggers.kind`` it must write (None: none)."""
        if self.status == "pending":
            return None
        return "prediction" if self.status == "decided" else "prediction_skipped"


def _span(at: float, moments: Moments) -> str:
    """
    Which books a decision at ``at`` sees: ``no_quotes`` (before the tape),
    ``final`` (the whole tape applied, before the stop), ``after_stop``.

    Raises:
        Unattributable: during the tape, or within MARGIN_S of its start or the stop.
    """
    if at <= moments.tape - MARGIN_S:
        return "no_quotes"
    if moments.applied <= at <= moments.stop - MARGIN_S:
        return "final"
    if at >= moments.stop + MARGIN_S:
        return "after_stop"
    raise Unattributable(f"a decision or close at {at:.3f} is not clear of the tape or the stop")


def expected_outcome(plan: PredictionPlan, facts: AskFacts, moments: Moments) -> Expected:
    """
    What the monitor must make of ``plan`` on this timeline. A prediction is
    loaded before the tape (``before_tape``: the daemon loads its rules
    before subscribing, and the tape waits MARGIN_S after the subscription)
    or within LOAD_WITHIN_S of ``moments.inserted`` (checked by the run).

    Raises:
        Unattributable: see :func:`_span`.
    """
    if plan.phase == "before_tape":
        loaded = moments.tape - MARGIN_S
    else:
        assert moments.inserted is not None
        loaded = moments.inserted
    if plan.closes_at < loaded:  # closed before it was loaded (after-tape loads only)
        ask = facts.final[plan.token] if plan.phase == "after_tape" else None
        return Expected("skipped", "window_closed", ask)
    due = _span(max(plan.decision_at, loaded), moments)
    if plan.timing == "edge":
        return _expected_edge(plan, facts, moments, due)
    if due == "after_stop":
        return Expected("pending")
    if due == "no_quotes":  # deferred; decided on the first ask the tape brings
        ask, not_before = facts.first_ask(plan.token), moments.tape
    else:
        ask, not_before = facts.final[plan.token], plan.decision_at
    if ask is not None:
        if due == "no_quotes" and _span(plan.closes_at, moments) == "no_quotes":
            return Expected("skipped", "no_price", None, deferred=True)
        return _placed(plan, ask, plan.timing, not_before, deferred=due == "no_quotes")
    # no ask ever after its decision time: deferred until the window closes
    if plan.closes_at <= moments.stop - MARGIN_S:
        return Expected("skipped", "no_price", None, deferred=True, not_before=plan.closes_at)
    if plan.closes_at >= moments.stop + MARGIN_S:
        return Expected("pending", deferred=True, still_deferred=True)
    raise Unattributable(f"prediction {plan.id} closes at the stop")


def _placed(
    plan: PredictionPlan,
    ask: Decimal,
    reason: str,
    not_before: float | None,
    *,
    deferred: bool = False,
) -> Expected:
    """Placed with ``reason`` at ``ask``, unless the ask is above the limit price."""
    if ask > plan.limit:
        return Expected("skipped", "price_above_limit", ask, deferred, not_before=not_before)
    return Expected("decided", reason, ask, deferred, not_before=not_before)


def _expected_edge(
    plan: PredictionPlan, facts: AskFacts, moments: Moments, deadline: str
) -> Expected:
    """An edge prediction: the first qualifying ask before its deadline, else ``no_edge`` there."""
    if plan.phase == "before_tape":  # every tick of the tape falls inside [opens, deadline)
        if deadline == "no_quotes":
            return Expected("skipped", "no_edge", None, not_before=plan.decision_at)
        ask = facts.first_ask(plan.token, plan.forecast, plan.min_edge)
        if ask is not None:
            return _placed(plan, ask, "edge", moments.tape)
    else:  # loaded on the final books: decided at once if they give the edge
        ask = facts.final[plan.token]
        assert plan.forecast is not None
        if ask is not None and plan.forecast - ask >= (plan.min_edge or Decimal(0)):
            return _placed(plan, ask, "edge", moments.inserted)
    if deadline == "after_stop":
        return Expected("pending")
    return Expected("skipped", "no_edge", facts.final[plan.token], not_before=plan.decision_at)
