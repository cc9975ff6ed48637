"""
What happens to a decision: written exactly once, or only logged.

``execute.mode = "outbox"``: a decision moves its row (``positions.status``
``active -> closing``, ``predictions.status`` ``pending -> decided|skipped``)
with a compare-and-set and inserts a ``triggers`` row with a unique
``dedupe_key``, in one statement per kind of row, rows locked in id order so
that concurrent writers never deadlock; then ``NOTIFY polystream_triggers``
with the trigger id (delivered on commit). Duplicate ticks, reconnect replays,
two daemons and restarts never decide twice. ``"log"``: dry run.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import attrs
import psycopg
import structlog
import trio

from polystream.errors import DatabaseError
from polystream.monitor.rules import Decision
from polystream.stats import Stats
from polystream.store.direct import DirectLink, numbered
from polystream.timing import Slices

__all__ = [
    "POLL_INTERVAL",
    "TRIGGERS_CHANNEL",
    "TRIGGER_STATEMENTS",
    "Executor",
    "OrderColumns",
    "write_decisions",
    "write_decisions_direct",
]

logger = structlog.get_logger(__name__)

TRIGGERS_CHANNEL = "polystream_triggers"


# ------------------------------------------------------------------ executor

_WRITE_POSITION_TRIGGERS = """
WITH d AS (
    SELECT * FROM unnest(%(position_id)s::bigint[], %(kind)s::text[], %(dedupe_key)s::text[],
                         %(price)s::numeric[], %(reason)s::text[])
        AS d(position_id, kind, dedupe_key, price, reason)
), locked AS (
    SELECT id FROM positions
    WHERE id IN (SELECT position_id FROM d) AND status = 'active'
    ORDER BY id
    FOR NO KEY UPDATE
), moved AS (
    UPDATE positions AS p SET status = 'closing', updated_at = now()
    FROM locked WHERE p.id = locked.id
    RETURNING p.id
), inserted AS (
    INSERT INTO triggers (kind, position_id, dedupe_key, price, reason)
    SELECT d.kind, d.position_id, d.dedupe_key, d.price, d.reason
    FROM d JOIN moved ON moved.id = d.position_id
    ON CONFLICT (dedupe_key) DO NOTHING
    RETURNING id, dedupe_key, position_id
)
SELECT i.dedupe_key, i.id, pg_notify('polystream_triggers', i.id::text),
       p.token_id, p.size, NULL::numeric, NULL::numeric, m.tick_size, coalesce(m.neg_risk, false)
FROM inserted AS i
LEFT JOIN positions AS p ON p.id = i.position_id
LEFT JOIN markets AS m ON m.id = p.market_id
"""

_WRITE_PREDICTION_TRIGGERS = """
WITH d AS (
    SELECT * FROM unnest(%(prediction_id)s::bigint[], %(kind)s::text[], %(dedupe_key)s::text[],
                         %(price)s::numeric[], %(reason)s::text[], %(status)s::text[],
                         %(decided_at)s::float8[])
        AS d(prediction_id, kind, dedupe_key, price, reason, status, decided_at)
), locked AS (
    SELECT id FROM predictions
    WHERE id IN (SELECT prediction_id FROM d) AND status = 'pending'
    ORDER BY id
    FOR NO KEY UPDATE
), moved AS (
    UPDATE predictions AS p SET status = d.status, decided_at = to_timestamp(d.decided_at),
        decision_price = d.price, decision_reason = d.reason, updated_at = now()
    FROM locked JOIN d ON d.prediction_id = locked.id
    WHERE p.id = locked.id
    RETURNING p.id
), inserted AS (
    INSERT INTO triggers (kind, prediction_id, dedupe_key, price, reason)
    SELECT d.kind, d.prediction_id, d.dedupe_key, d.price, d.reason
    FROM d JOIN moved ON moved.id = d.prediction_id
    ON CONFLICT (dedupe_key) DO NOTHING
    RETURNING id, dedupe_key, prediction_id
)
SELECT i.dedupe_key, i.id, pg_notify('polystream_triggers', i.id::text),
       r.token_id, NULL::numeric, r.stake_usdc, r.limit_price, m.tick_size,
       coalesce(m.neg_risk, false)
FROM inserted AS i
LEFT JOIN predictions AS r ON r.id = i.prediction_id
LEFT JOIN markets AS m ON m.id = r.market_id
"""

OrderColumns = tuple[str | None, ...]
"""
What the decision statements return of each trigger written, after its
dedupe key, id and NOTIFY, for a closing order (text values, as a
:class:`~polystream.store.direct.DirectLink` reads them): ``(token_id,
size, stake, limit, tick_size, neg_risk)``: the token (asset) id, the
position's size in shares, the prediction's stake in USDC and limit price,
the market's tick size and neg-risk flag (``t``/``f``); None where unknown
or not that kind's.
"""


def _columns(decisions: list[Decision], names: list[str]) -> dict[str, list[Any]]:
    return {name: [getattr(d, name) for d in decisions] for name in names}


_POSITION_COLUMNS = ["position_id", "kind", "dedupe_key", "price", "reason"]
_PREDICTION_COLUMNS = ["prediction_id", "kind", "dedupe_key", "price", "reason", "decided_at"]


def _statements(decisions: list[Decision]) -> list[tuple[str, dict[str, list[Any]]]]:
    """The one or two statements (and their array parameters) that write ``decisions``."""
    statements = []
    on_positions = [d for d in decisions if d.position_id is not None]
    on_predictions = [d for d in decisions if d.position_id is None]
    if on_positions:
        statements.append((_WRITE_POSITION_TRIGGERS, _columns(on_positions, _POSITION_COLUMNS)))
    if on_predictions:
        params = _columns(on_predictions, _PREDICTION_COLUMNS)
        params["status"] = [
            "decided" if d.kind == "prediction" else "skipped" for d in on_predictions
        ]
        statements.append((_WRITE_PREDICTION_TRIGGERS, params))
    return statements


_NUMBERED = {sql: numbered(sql) for sql in (_WRITE_POSITION_TRIGGERS, _WRITE_PREDICTION_TRIGGERS)}

TRIGGER_STATEMENTS = tuple(text for text, _ in _NUMBERED.values())
"""The decision statements in ``$n`` form: what the trigger link prepares at start-up."""


async def write_decisions_direct(link: DirectLink, decisions: list[Decision]) -> list[int | None]:
    """
    :func:`write_decisions` on the event loop, without a worker thread
    (:class:`~polystream.store.direct.DirectLink`: prepared statements, one
    autocommit round trip each): the TP/SL path waits behind nothing.

    Raises:
        DatabaseError: PostgreSQL is unreachable or a statement failed.
    """
    found: dict[str, int] = {}
    for sql, params in _statements(decisions):
        text, names = _NUMBERED[sql]
        for key, trigger_id, *_ in await link.execute(text, [params[n] for n in names]):
            assert key is not None and trigger_id is not None
            found[key] = int(trigger_id)
    return [found.get(d.dedupe_key) for d in decisions]


def write_decisions(conn: psycopg.Connection[Any], decisions: list[Decision]) -> list[int | None]:
    """
    Write decisions exactly once, as sets: compare-and-set of the rows'
    status (``active -> closing`` or ``pending -> decided|skipped``, rows
    locked in id order so that concurrent writers never deadlock) and a
    ``triggers`` row with a unique ``dedupe_key`` each, in one statement per
    kind of row, then ``NOTIFY polystream_triggers`` with each trigger id
    (delivered on commit).

    Returns:
        Per decision, the trigger id, or None when another writer (a second
        daemon, a restart) already decided that rule.
    """
    found: dict[str, int] = {}
    for sql, params in _statements(decisions):
        for key, trigger_id, *_ in conn.execute(sql, params).fetchall():
            found[key] = int(trigger_id)
    return [found.get(d.dedupe_key) for d in decisions]


POLL_INTERVAL = 0.0005
"""
Seconds between two looks, from the router's task (:meth:`Executor.pump`), at
whether the statement on the wire has its answer: one ``recv`` per look, not
one per frame.
"""


@attrs.define(eq=False)
class Executor:
    """
    Hands decisions on. ``mode = "outbox"``: the trigger row and its
    NOTIFY are the hand-off to the service that trades. ``mode = "log"``: dry
    run, decisions are only logged. ``mode = "clob"``: as ``outbox``, and each
    trigger written goes to ``on_written`` (the order placer:
    polystream.monitor.orders) as ``(trigger id, decision, order columns or
    None)`` (:data:`OrderColumns`).

    With ``link`` (the trigger path's own :class:`DirectLink`, statements
    prepared by its ``warm_up``), a decision goes out without waiting behind
    other work: the router calls :meth:`pump` after each frame, which sends
    what the frame decided at once (one statement per kind of row, positions
    first) and, later, takes the answer; the executor's task waits for an
    answer only when the router is idle. Decisions made while a statement is
    on the wire go out together with the next one: batched only under bursts.
    ``sink`` writes a batch when ``link`` cannot send at once (not connected
    yet, statements not prepared) and is the only path without ``link``
    (``write_decisions`` through a :class:`~polystream.store.link.DbLink`).
    A database error keeps the decisions and retries, so none is lost; the
    compare-and-set makes retries safe.
    """

    mode: str
    sink: Callable[[list[Decision]], Any]
    stats: Stats
    retry: float = 1.0
    link: DirectLink | None = None
    on_written: Callable[[int, Decision, OrderColumns | None], None] | None = None
    _pending: list[Decision] = attrs.field(factory=list)
    _in_flight: list[Decision] = attrs.field(factory=list)  # sent by link.send_now, unanswered
    _in_sink: int = 0  # decisions being written through sink
    _polled_at: float = 0.0
    _written: deque[tuple[int, Decision]] = attrs.field(factory=deque)  # to log
    _wake: trio.Event = attrs.field(factory=trio.Event)

    @property
    def pending(self) -> int:
        """Decisions not yet written (queued, on the wire or being written)."""
        return len(self._pending) + len(self._in_flight) + self._in_sink

    def submit(self, decision: Decision) -> None:
        """Queue a decision (never blocks)."""
        self._pending.append(decision)
        self._wake.set()

    # ------------------------------------------------------------ prompt path

    def pump(self) -> None:
        """
        Called between frames by the router's task (never waits): take the
        answer of the statement on the wire if it has come (at most every
        :data:`POLL_INTERVAL` s), then send what is pending if the link is
        free.
        """
        if self.link is None or self.mode == "log":
            return
        if self._in_flight:
            now = time.perf_counter()
            if now - self._polled_at < POLL_INTERVAL:
                return
            self._polled_at = now
            try:
                rows = self.link.poll()
            except DatabaseError:
                self._lost()
                return
            if rows is None:
                return
            self._answered(rows)
        self._send()

    def _send(self) -> bool:
        """Send the next decisions of one kind through ``link`` now; False if it cannot."""
        if self._in_flight or not self._pending or self.link is None:
            return False
        predictions_first = self._pending[0].position_id is None
        sql = _WRITE_PREDICTION_TRIGGERS if predictions_first else _WRITE_POSITION_TRIGGERS
        text, names = _NUMBERED[sql]
        if not self.link.can_send_now(text):
            return False
        unit: list[Decision] = []
        rest: list[Decision] = []
        for decision in self._pending:
            (unit if (decision.position_id is None) == predictions_first else rest).append(decision)
        _, params = _statements(unit)[0]
        try:
            sent = self.link.send_now(text, [params[n] for n in names])
        except DatabaseError:
            sent = False  # counted and logged by the link; sink reconnects
        if not sent:
            return False
        self._pending, self._in_flight = rest, unit
        self._wake.set()  # the executor's task reads the answer if the router does not
        return True

    def _answered(self, rows: list[tuple[str | None, ...]]) -> None:
        found = {row[0]: row for row in rows if row[0] and row[1]}
        batch, self._in_flight = self._in_flight, []
        written = [found.get(d.dedupe_key) for d in batch]
        self._record(
            batch,
            [None if row is None else int(row[1] or 0) for row in written],
            [None if row is None else row[3:] for row in written],
        )

    def _lost(self) -> None:
        """The statement on the wire failed or its connection broke: its decisions go again."""
        self._pending = self._in_flight + self._pending
        self._in_flight = []
        self._wake.set()

    # ------------------------------------------------------------ the executor's task

    def _record(
        self,
        batch: list[Decision],
        ids: list[int | None],
        columns: list[OrderColumns | None] | None = None,
    ) -> None:
        """
        Count what was written now, and hand each trigger written to
        ``on_written`` (with its :data:`OrderColumns` when the statement's
        answer was read here, else None); its ``trigger_written`` lines are the
        executor's task's to write (:meth:`_log_written`), not the router's: a
        burst of a hundred lines is a few milliseconds the next frame would wait.
        """
        for index, (decision, trigger_id) in enumerate(zip(batch, ids, strict=True)):
            if trigger_id is None:
                self.stats.triggers_duplicate += 1
            else:
                self.stats.triggers_written += 1
                self._written.append((trigger_id, decision))
                if self.on_written is not None:
                    self.on_written(trigger_id, decision, columns[index] if columns else None)
        if self._written:
            self._wake.set()

    async def _log_written(self) -> None:
        """One ``trigger_written`` line per trigger row, in slices (:class:`~polystream.timing.Slices`)."""
        slices = Slices()
        while self._written:
            trigger_id, decision = self._written.popleft()
            logger.info(
                "trigger_written",
                trigger_id=trigger_id,
                **attrs.asdict(decision, value_serializer=_plain),
            )
            await slices.tick()

    async def flush(self) -> bool:
        """Write what is queued or on the wire; False when the database failed (kept for later)."""
        if self.mode == "log":
            batch, self._pending = self._pending, []
            for decision in batch:
                logger.info("trigger_dry_run", **attrs.asdict(decision, value_serializer=_plain))
            return True
        while self._in_flight or self._pending:
            if self._in_flight and self.link is not None:
                try:
                    rows = await self.link.finish()
                except DatabaseError:
                    self._lost()
                    return False
                if rows is not None:
                    self._answered(rows)
                elif self._in_flight and not self.link.in_flight:
                    self._lost()  # the connection was closed under it
                    return False
            elif not self._send() and not await self._write_through_sink():
                return False
        return True

    async def _write_through_sink(self) -> bool:
        batch, self._pending = self._pending, []
        self._in_sink = len(batch)
        ids = None
        try:
            ids = await self.sink(batch)
        except DatabaseError:
            return False
        finally:
            self._in_sink = 0
            if ids is None:
                self._pending = batch + self._pending
        self._record(batch, ids)
        return True

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Write decisions as they come; on cancel, write what is left."""
        try:
            task_status.started()
            while True:
                await self._wake.wait()
                self._wake = trio.Event()
                flushed = await self.flush()
                await self._log_written()
                if not flushed:
                    self._wake.set()
                    await trio.sleep(self.retry)
        finally:
            with trio.move_on_after(5, shield=True):
                await self.flush()
                await self._log_written()


def _plain(_inst: Any, _field: Any, value: Any) -> Any:
    return str(value) if isinstance(value, Decimal) else value
