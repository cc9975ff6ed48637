"""
One monitor for every rule: take-profit / stop-loss and timed predictions.

The system polystream replaces gave every prediction its own polling thread;
with 20 to 30 at once they starved the WebSocket heartbeat. Here:

* **TP/SL** are evaluated inline on every price event of their asset (no
  debounce), by the router's task. Per asset, TP thresholds sit in one sorted
  array and SL thresholds in another (:class:`~polystream.monitor.rules.TpSlTable`,
  no object per rule), so a tick costs O(log n + k) for the k rules it
  crosses: TP fires when ``price >= take_profit_price``, SL when
  ``price <= stop_loss_price``; ``price`` is ``monitor.trigger_price`` of the
  top of book (``best_bid`` by default: what a sale would get). A full
  reload builds a new table off the event loop and swaps it in whole.
* **Predictions** sit in one heap ordered by their decision time; one task
  ``trio.sleep_until``s its head and is woken early when rules change.
  ``edge`` predictions are also checked on each price event of their asset.
  A prediction due while its asset has no best ask (not quoted yet, feed
  down) is **deferred**, never dropped silently: one ``prediction_deferred``
  log line, counted in ``Stats`` (``/health``, ``/metrics``), decided on the
  first price event of its asset that brings an ask (looked at again every
  :data:`NO_PRICE_RETRY` s as well), or skipped ``no_price`` when its window
  closes.
* **Decisions** go to the :class:`Executor`, which writes them exactly once
  (compare-and-set on the row's status plus a unique ``triggers.dedupe_key``,
  in one statement) and ``NOTIFY polystream_triggers`` with the trigger id.

No task, thread or timer per rule. Times are wall-clock seconds since the
epoch, read through an injectable ``clock`` so that tests run on trio's
``MockClock``.
"""

from __future__ import annotations

import heapq
import time
from collections import deque
from collections.abc import Callable, Iterator
from decimal import Decimal

import attrs
import structlog
import trio
from sortedcontainers import SortedList

from polystream.book import AssetBook, TopOfBook, choose_price
from polystream.config import PriceChoice
from polystream.monitor.rules import (
    TPSL_KINDS,
    Decision,
    DecisionKind,
    Prediction,
    RuleSet,
    TpSlKind,
    TpSlRule,
    TpSlTable,
    _prediction_key,
    decision_time,
)
from polystream.stats import Stats
from polystream.timing import Slices

__all__ = [
    "CROSSED_PER_TICK",
    "DEFERRAL_REASONS",
    "DEFERRED_PER_TICK",
    "NO_PRICE_RETRY",
    "ON_TIME_S",
    "Monitor",
]

logger = structlog.get_logger(__name__)

NO_PRICE_RETRY = 5.0
"""Seconds before a deferred prediction (due, its asset without an ask) is looked at again."""

ON_TIME_S = 1.0
"""
A decision the deadline task makes at most this late after the window's close
still counts as inside the window: a ``from_end`` prediction with ``delay_s``
0 is due exactly at ``closes_at``, and the timer wakes a little after it.
"""

DEFERRED_PER_TICK = 16
"""
Deferred predictions of one asset decided inline when its ask arrives, in the
router's step; more (a hundred due before the first quote) are decided by the
deadline task in slices, so the router's step stays short.
"""

CROSSED_PER_TICK = 16
"""
TP/SL rules fired inline by one price update, in the router's step (the first
ones go out with the frame's own ``pump``); the rest of a burst (65 rules at one
price, in the monitor bench) are fired by the deadline task in slices: a burst
of decisions is milliseconds the next frame and the event loop would wait.
"""

DEFERRAL_REASONS = ("no_price",)
"""Why a due prediction can be deferred (labels of ``Stats.prediction_deferrals``)."""


@attrs.define
class _AssetRules:
    """
    One asset's edge predictions with their deadlines (epoch s), and its
    deferred predictions (due, waiting for an ask). Its TP/SL rules are in
    the monitor's :class:`TpSlTable`.
    """

    edge: dict[int, tuple[Prediction, float]] = attrs.field(factory=dict)
    deferred: dict[int, Prediction] = attrs.field(factory=dict)
    # (highest ask with the edge, prediction id) of the edge predictions that
    # have a forecast: a tick's ask looks only at those it gives their edge.
    edge_asks: SortedList[tuple[Decimal, int]] = attrs.field(factory=SortedList)

    def empty(self) -> bool:
        """Whether no prediction is left (the asset's entry can go)."""
        return not (self.edge or self.deferred)

    def add_edge(self, prediction: Prediction, deadline: float) -> None:
        """Watch an edge prediction until ``deadline`` (epoch s)."""
        self.drop_edge(prediction.id)
        self.edge[prediction.id] = (prediction, deadline)
        highest = _highest_ask(prediction)
        if highest is not None:
            self.edge_asks.add((highest, prediction.id))

    def drop_edge(self, prediction_id: int) -> None:
        """Stop watching an edge prediction (no-op if not watched)."""
        entry = self.edge.pop(prediction_id, None)
        if entry is not None:
            highest = _highest_ask(entry[0])
            if highest is not None:
                self.edge_asks.remove((highest, prediction_id))

    def with_edge_at(self, ask: Decimal) -> list[tuple[Prediction, float]]:
        """The edge predictions (with deadlines) that ``ask`` gives their edge."""
        start = self.edge_asks.bisect_left((ask, -1))  # ids are positive
        return [self.edge[pid] for _, pid in self.edge_asks.islice(start)]


def _highest_ask(prediction: Prediction) -> Decimal | None:
    """
    The highest ask at which an edge prediction has its edge
    (``forecast_probability - ask >= min_edge``), or None without a forecast.
    """
    if prediction.forecast_probability is None:
        return None
    return prediction.forecast_probability - (prediction.min_edge or Decimal(0))


@attrs.define
class _Deferral:
    """A prediction due but not decided: since when (epoch s), why, how often looked at."""

    since: float
    reason: str
    checks: int = 1


@attrs.define(eq=False)
class Monitor:
    """
    All rules in memory. :meth:`on_book` is the router's listener, called for
    every book that moved (it builds a top of book only for assets with
    rules, then :meth:`on_price`); :meth:`run` is the one deadline task for
    predictions.
    Decisions are handed to ``decide`` (the executor's ``submit``).

    Attributes:
        price_choice: the price TP/SL thresholds are compared with
            (``monitor.trigger_price``): ``best_bid``, ``midpoint`` or ``display``.
        decide: receives each :class:`Decision` once.
        clock: wall-clock seconds since the epoch (``time.time``).
        serves: whether this daemon serves an asset (a cluster: the market's
            partition is held here, docs/cluster.md); None = every asset. A
            due prediction of an asset served elsewhere is left to its owner
            (it would see no price here and skip it), and scheduled again here
            by :meth:`ownership_changed` if its partition comes here.
    """

    decide: Callable[[Decision], None]
    stats: Stats
    price_choice: PriceChoice = "best_bid"
    clock: Callable[[], float] = time.time
    serves: Callable[[str], bool] | None = None
    _elsewhere: dict[int, Prediction] = attrs.field(factory=dict)  # due, served elsewhere
    _assets: dict[str, _AssetRules] = attrs.field(factory=dict)
    _tpsl: TpSlTable = attrs.field(factory=TpSlTable)
    _predictions: dict[int, Prediction] = attrs.field(factory=dict)
    _heap: list[tuple[float, int, int]] = attrs.field(factory=list)  # (at, seq, id)
    _scheduled: dict[int, int] = attrs.field(factory=dict)  # id -> live seq
    _seq: int = 0
    _fired: set[str] = attrs.field(factory=set)
    _fired_positions: set[int] = attrs.field(factory=set)  # positions with a rule in _fired
    _deferred: dict[int, _Deferral] = attrs.field(factory=dict)
    _tops: dict[str, TopOfBook] = attrs.field(factory=dict)
    _books: dict[str, AssetBook] = attrs.field(factory=dict)
    _asks_arrived: set[str] = attrs.field(factory=set)  # assets with deferred ones left to decide
    _crossed: deque[Decision] = attrs.field(factory=deque)  # a burst's rest, for the task
    _wake: trio.Event = attrs.field(factory=trio.Event)

    # ------------------------------------------------------------ rules

    def _asset(self, asset_id: str) -> _AssetRules:
        rules = self._assets.get(asset_id)
        if rules is None:
            rules = self._assets[asset_id] = _AssetRules()
        return rules

    def add_rule(self, rule: TpSlRule) -> None:
        """
        Watch a TP/SL rule (replacing the position's previous one of that
        kind); one that already fired here is not watched (nor is the
        position's previous one of that kind), one the latest price already
        crosses fires at once.
        """
        if rule.dedupe_key in self._fired:  # and the version it replaces is gone
            self._tpsl.remove(rule.position_id, rule.kind)
            return
        self._tpsl.add(rule)
        top = self._latest(rule.asset_id)
        if top is not None:  # a rule already crossed when it arrives fires at once
            self._check_tpsl(rule.asset_id, top)

    def remove_rule(self, position_id: int, kind: TpSlKind) -> None:
        """Stop watching one rule (no-op if absent)."""
        self._tpsl.remove(position_id, kind)

    def add_prediction(self, prediction: Prediction) -> None:
        """
        Schedule a pending prediction (replacing an earlier version of it).
        One already decided here is ignored: a reload can read its row before
        the executor's write of that decision commits.
        """
        if _prediction_key(prediction.id) in self._fired:
            return
        self.remove_prediction(prediction.id)
        self._predictions[prediction.id] = prediction
        self.stats.monitor_predictions = len(self._predictions)
        deadline = decision_time(prediction)
        self._schedule(prediction.id, deadline)
        if prediction.timing == "edge":
            self._asset(prediction.asset_id).add_edge(prediction, deadline)
            top = self._latest(prediction.asset_id)
            if top is not None:
                self._check_edge(prediction.asset_id, top)
        self._wake.set()

    def remove_prediction(self, prediction_id: int) -> None:
        """
        Forget a prediction (decided, cancelled or decided elsewhere), deferred
        or not; its heap entry goes stale.
        """
        prediction = self._predictions.pop(prediction_id, None)
        self._scheduled.pop(prediction_id, None)
        self.stats.monitor_predictions = len(self._predictions)
        if self._deferred.pop(prediction_id, None) is not None:
            self.stats.predictions_deferred = len(self._deferred)
        if prediction is None:
            return
        side = self._assets.get(prediction.asset_id)
        if side is not None:
            side.drop_edge(prediction_id)
            side.deferred.pop(prediction_id, None)
            if side.empty():
                del self._assets[prediction.asset_id]

    def _schedule(self, prediction_id: int, at: float) -> None:
        """Make ``at`` (epoch s) the prediction's one live heap entry."""
        self._seq += 1
        self._scheduled[prediction_id] = self._seq
        heapq.heappush(self._heap, (at, self._seq, prediction_id))

    @property
    def deferred_count(self) -> int:
        """Predictions due but waiting for an ask (see :meth:`_defer`)."""
        return len(self._deferred)

    def replace_all(self, rules: RuleSet) -> None:
        """
        Make the in-memory rules equal ``rules`` (a full reload from the
        database). ``rules.tpsl`` becomes the monitor's own table.
        """
        for _ in self._replace(rules):
            pass

    async def replace_all_in_slices(self, rules: RuleSet, slice_size: int = 500) -> None:
        """:meth:`replace_all`, yielding to the scheduler every ``slice_size`` steps."""
        for count, _ in enumerate(self._replace(rules), 1):
            if count % slice_size == 0:
                await trio.lowlevel.checkpoint()

    def apply_changes(
        self, position_ids: set[int], prediction_ids: set[int], rules: RuleSet
    ) -> None:
        """Update only the rules of these rows (``rules`` holds their current state)."""
        for position_id in position_ids:
            for kind in TPSL_KINDS:
                rule = rules.tpsl.get(position_id, kind)
                if rule is None:
                    self.remove_rule(position_id, kind)
                elif self._tpsl.get(position_id, kind) != rule:
                    self.add_rule(rule)
        self.stats.monitor_rules = len(self._tpsl)
        for _ in self._sync_predictions(prediction_ids, rules):
            pass

    def _replace(self, rules: RuleSet) -> Iterator[None]:
        """
        A full reload: swap in ``rules.tpsl`` whole, less what already fired
        here (the database may not show it closing yet), then fire what it
        holds that is new and already crossed, then sync the predictions;
        yields after each position, asset or prediction looked at, so a caller
        may checkpoint. A rule that fires on the old table while this runs may
        stay in the new one: :meth:`_fire` refuses it.
        """
        new = rules.tpsl
        if new is not self._tpsl:
            for position_id in list(self._fired_positions):
                for kind in TPSL_KINDS:
                    rule = new.get(position_id, kind)
                    if rule is not None and rule.dedupe_key in self._fired:
                        new.remove(position_id, kind)
                yield
            old, self._tpsl = self._tpsl, new
            self.stats.monitor_rules = len(new)
            for asset_id in new.asset_ids():
                if not new.same_rules(asset_id, old):
                    top = self._latest(asset_id)
                    if top is not None:  # a rule already crossed when it arrives fires at once
                        self._check_tpsl(asset_id, top)
                yield
        predictions = set(self._predictions) | {p.id for p in rules.predictions}
        yield from self._sync_predictions(predictions, rules)

    def _sync_predictions(self, prediction_ids: set[int], rules: RuleSet) -> Iterator[None]:
        """
        Make the predictions of these rows equal ``rules`` (a row absent from
        it has none any more); yields after each row, so a caller may checkpoint.
        """
        pending = {p.id: p for p in rules.predictions}
        for prediction_id in prediction_ids:
            prediction = pending.get(prediction_id)
            if prediction is None:
                self.remove_prediction(prediction_id)
            elif self._predictions.get(prediction_id) != prediction:
                self.add_prediction(prediction)
            yield
        self.stats.monitor_rules = len(self._tpsl)
        self.stats.monitor_predictions = len(self._predictions)

    def rule(self, position_id: int, kind: TpSlKind) -> TpSlRule | None:
        """The watched rule of this position and kind, or None."""
        return self._tpsl.get(position_id, kind)

    @property
    def rule_count(self) -> int:
        """TP/SL rules watched."""
        return len(self._tpsl)

    def next_decision_at(self) -> float | None:
        """Epoch seconds of the next scheduled prediction decision, or None."""
        self._drop_stale()
        return self._heap[0][0] if self._heap else None

    # ------------------------------------------------------------ prices

    def on_book(self, asset_id: str, book: AssetBook) -> None:
        """
        The router moved ``book``: check its rules (the router's listener).
        Builds a top of book only for assets that have rules.
        """
        self._books[asset_id] = book
        if asset_id in self._assets or self._tpsl.watches(asset_id):
            self.on_price(asset_id, book.top())

    def _latest(self, asset_id: str) -> TopOfBook | None:
        book = self._books.get(asset_id)
        return book.top() if book is not None else self._tops.get(asset_id)

    def on_price(self, asset_id: str, top: TopOfBook) -> None:
        """
        A new top of book for ``asset_id``: fire every rule it crosses, and
        decide the asset's deferred predictions if it brings an ask.
        """
        self._tops[asset_id] = top
        if self._tpsl.watches(asset_id):
            self._check_tpsl(asset_id, top)
        side = self._assets.get(asset_id)
        if side is None:
            return
        if side.edge:
            self._check_edge(asset_id, top)
        if side.deferred and top.best_ask is not None:
            now = self.clock()
            for prediction in list(side.deferred.values())[:DEFERRED_PER_TICK]:
                self._decide_prediction(prediction, top, now, edge_seen=False)
            if side.deferred:  # the rest: the deadline task, in slices
                self._asks_arrived.add(asset_id)
                self._wake.set()

    def _check_tpsl(self, asset_id: str, top: TopOfBook) -> None:
        price = choose_price(top, self.price_choice)
        if price is None:
            return
        # Removed with the position's other rule: it is closing, neither may fire again.
        now = self.clock()
        for index, rule in enumerate(self._tpsl.take_crossed(asset_id, price)):
            decision = Decision(
                kind=rule.kind,
                dedupe_key=rule.dedupe_key,
                price=price,
                reason=f"{self.price_choice}_{'above' if rule.kind == 'take_profit' else 'below'}",
                position_id=rule.position_id,
                decided_at=now,
            )
            if index < CROSSED_PER_TICK:
                self._fire(decision)
            else:  # the rest of a burst: the deadline task's, in slices
                self._crossed.append(decision)
                self._wake.set()

    async def _fire_crossed(self) -> None:
        """Fire the rest of TP/SL bursts (see :data:`CROSSED_PER_TICK`), in slices."""
        slices = Slices()
        while self._crossed:
            self._fire(self._crossed.popleft())
            await slices.tick()

    def _check_edge(self, asset_id: str, top: TopOfBook) -> None:
        """Decide the asset's open edge predictions that ``top``'s ask gives their edge."""
        ask = top.best_ask
        if ask is None:
            return
        now = self.clock()
        for prediction, deadline in self._assets[asset_id].with_edge_at(ask):
            if prediction.opens_at <= now < deadline:  # else not open yet, or past it
                self._decide_prediction(prediction, top, now, edge_seen=True)

    # ------------------------------------------------------------ predictions

    def _drop_stale(self) -> None:
        while self._heap and self._scheduled.get(self._heap[0][2]) != self._heap[0][1]:
            heapq.heappop(self._heap)

    def _decide_prediction(
        self,
        prediction: Prediction,
        top: TopOfBook | None,
        now: float,
        *,
        edge_seen: bool,
        on_schedule: bool = False,
    ) -> None:
        """
        Decide now (epoch s): place (``decided``) or skip, with the reason and
        the ask seen; or, for a timed prediction whose asset has no ask while
        its window is open, defer it (see :meth:`_defer`). ``on_schedule``: the
        deadline task decides at the scheduled moment, which may be up to
        :data:`ON_TIME_S` after the close and still counts as in the window.
        """
        ask = None if top is None else top.best_ask
        timed = prediction.timing != "edge"
        if ask is None and timed and now < prediction.closes_at:
            self._defer(prediction, now, "no_price")
            return
        deferral = self._deferred.get(prediction.id)
        self.remove_prediction(prediction.id)
        closed_at = prediction.closes_at + (ON_TIME_S if on_schedule else 0.0)
        kind: DecisionKind
        if now > closed_at and deferral is None:
            kind, reason = "prediction_skipped", "window_closed"
        elif not timed and not edge_seen:
            kind, reason = "prediction_skipped", "no_edge"
        elif ask is None or (deferral is not None and now >= prediction.closes_at):
            kind, reason = "prediction_skipped", "no_price"  # deferred until the window closed
        elif ask > prediction.limit_price:
            kind, reason = "prediction_skipped", "price_above_limit"
        else:
            kind, reason = "prediction", "edge" if edge_seen else prediction.timing
        if deferral is not None:
            logger.info(
                "prediction_deferral_ended",
                prediction_id=prediction.id,
                asset_id=prediction.asset_id,
                kind=kind,
                reason=reason,
                deferred_s=now - deferral.since,
                checks=deferral.checks,
            )
        self._fire(
            Decision(
                kind=kind,
                dedupe_key=_prediction_key(prediction.id),
                price=ask,
                reason=reason,
                prediction_id=prediction.id,
                decided_at=now,
            )
        )

    def _defer(self, prediction: Prediction, now: float, reason: str) -> None:
        """
        Keep a due prediction pending: look again in :data:`NO_PRICE_RETRY`
        s, or when its window closes if sooner, and at once when a price
        event of its asset brings an ask. Every deferral is counted
        (``Stats.prediction_deferrals``); only the first of each prediction
        is logged (``prediction_deferred``), the rest add to its ``checks``.
        """
        retry_in = min(NO_PRICE_RETRY, prediction.closes_at - now)
        self._schedule(prediction.id, now + retry_in)
        self.stats.prediction_deferrals[reason] += 1
        deferral = self._deferred.get(prediction.id)
        if deferral is not None:
            deferral.checks += 1
            deferral.reason = reason
            return
        self._deferred[prediction.id] = _Deferral(since=now, reason=reason)
        self._asset(prediction.asset_id).deferred[prediction.id] = prediction
        self.stats.predictions_deferred = len(self._deferred)
        logger.info(
            "prediction_deferred",
            prediction_id=prediction.id,
            asset_id=prediction.asset_id,
            reason=reason,
            retry_in_s=retry_in,
            due_at=decision_time(prediction),
            closes_at=prediction.closes_at,
        )

    async def _decide_deferred(self) -> None:
        """
        Decide the deferred predictions :meth:`on_price` left to this task
        (beyond :data:`DEFERRED_PER_TICK` of an asset whose ask arrived), on
        the asset's latest quote, in slices (:class:`~polystream.timing.Slices`).
        """
        slices = Slices()
        while self._asks_arrived:
            asset_id = self._asks_arrived.pop()
            side, top = self._assets.get(asset_id), self._latest(asset_id)
            if side is None or top is None or top.best_ask is None:
                continue  # decided meanwhile, or the ask is gone again: deferred as before
            for prediction in list(side.deferred.values()):
                self._decide_prediction(prediction, top, self.clock(), edge_seen=False)
                if await slices.tick():
                    top = self._latest(asset_id) or top

    def due(self, now: float) -> list[Prediction]:
        """Take the predictions whose decision time is at or before ``now``."""
        due: list[Prediction] = []
        while True:
            self._drop_stale()
            if not self._heap or self._heap[0][0] > now:
                return due
            _, _, prediction_id = heapq.heappop(self._heap)
            self._scheduled.pop(prediction_id, None)
            prediction = self._predictions.get(prediction_id)
            if prediction is None:
                continue
            if self.serves is not None and not self.serves(prediction.asset_id):
                self._elsewhere[prediction_id] = prediction  # its owner decides it
                continue
            due.append(prediction)

    def ownership_changed(self) -> None:
        """
        The partitions served here changed: the due predictions left to
        another daemon whose asset is now served here are decided at once.
        """
        if self.serves is None:
            return
        for prediction_id, prediction in list(self._elsewhere.items()):
            if self._predictions.get(prediction_id) is not prediction:
                del self._elsewhere[prediction_id]  # decided, replaced or removed meanwhile
            elif self.serves(prediction.asset_id):
                del self._elsewhere[prediction_id]
                self._schedule(prediction_id, self.clock())
        self._wake.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The one deadline task: sleep until the next decision, decide, repeat."""
        task_status.started()
        try:
            await self._run_deadlines()
        finally:  # decided already: handed to the executor, which flushes at shutdown
            while self._crossed:
                self._fire(self._crossed.popleft())

    async def _run_deadlines(self) -> None:
        while True:
            self._wake = trio.Event()
            await self._fire_crossed()
            await self._decide_deferred()
            head = self.next_decision_at()
            self.stats.next_decision_at = head
            self.stats.monitor_rules = len(self._tpsl)
            self.stats.monitor_predictions = len(self._predictions)
            if head is None:
                await self._wake.wait()
                continue
            delay = head - self.clock()
            if delay > 0:
                with trio.move_on_after(delay):
                    await self._wake.wait()
                continue
            now = self.clock()
            slices = Slices()
            for prediction in self.due(now):
                self._decide_prediction(
                    prediction,
                    self._latest(prediction.asset_id),
                    now,
                    edge_seen=False,
                    on_schedule=True,
                )
                await slices.tick()

    def _fire(self, decision: Decision) -> None:
        if decision.dedupe_key in self._fired:
            return
        self._fired.add(decision.dedupe_key)
        if decision.position_id is not None:
            self._fired_positions.add(decision.position_id)
        self.stats.triggers[decision.kind] += 1
        self.decide(decision)
