"""
Closing orders on the CLOB (``execute.mode = "clob"``; docs/execution.md):
each TP/SL trigger, and with ``execute.predictions`` each decided
prediction, becomes one signed order, placed exactly once across crashes,
restarts and daemons.

The trigger row is the order's record (migrations ``0003_orders``,
``0004_claim_orders``). Each worker has a database session of its own
(:class:`~polystream.store.direct.DirectLink`: statements run on the event
loop, no worker-thread hop) whose session advisory locks mark the triggers
it works on (no other task or daemon touches them):

1. **facts**: the decision statement that wrote the trigger returned its
   order's facts (position: token, size in shares; prediction: stake in
   USDC, limit; market: tick size, neg risk; ``executor.OrderColumns``),
   so a new order reads nothing. A trigger taken up later is locked and
   read in one statement. :func:`plan_order` turns the facts into side,
   size and limit.
2. **sign**: py-clob-client-v2 builds and signs the orders on the loop
   (CPU only, about 0.6 ms each; :class:`OrderSigner`). An order's id is
   the signed order's EIP-712 hash, known before anything is sent.
3. **claim**: one statement (``polystream_claim_orders``) locks the rows not
   yet held, checks the daily notional cap (serialised by a transaction
   advisory lock) and moves the rows ``pending -> signed`` (or ``dry_run`` /
   ``refused``) with their order ids and bodies (compare-and-set: of two
   daemons one wins, the other's signatures are thrown away unsent). The
   commit is synchronous: an order is on disk before its first byte goes to
   the venue.
4. **send**: ``POST /order``, or ``POST /orders`` for a batch, with L2
   headers, at most ``execute.orders_per_second``.
5. **record**: the answers on the rows (``placed`` / ``filled`` /
   ``rejected``, the venue's order status, filled shares, error); a filled
   order closes its position; the locks are released.

A row left ``signed`` (a crash after the claim, an answer lost, the venue
down), or left ``pending`` (a crash before it; not when older than
``execute.retry_window``), is taken up by whichever daemon gets its lock
(:meth:`OrderPlacer.scan`). For a ``signed`` one, it asks the venue first
(``GET /data/order/{id}``) and sends the **stored** body again only when the
venue does not know the order (never signed anew: a new signature is a new
order), with backoff (429: ``Retry-After``), until ``execute.retry_window``
after signing; then the row is ``failed``.
Resting orders (``GTC``) are followed (``GET /data/order/{id}``) until filled
or cancelled, and the CLOB's order heartbeat (``POST /v1/heartbeats``) is
kept while any rests: if polystream stops, the venue cancels them.

Sources: CLOB V2 order and heartbeat API, https://docs.polymarket.com
(``/developers/CLOB/orders``, "Heartbeat"); rate limits
https://docs.polymarket.com/api-reference/rate-limits.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections import Counter
from decimal import ROUND_DOWN, ROUND_FLOOR, Decimal
from typing import TYPE_CHECKING, Any, Literal, Protocol

import attrs
import httpx
import orjson
import structlog
import trio

from polystream.config import ExecuteConfig
from polystream.errors import DatabaseError
from polystream.logs import RateLimitedLog
from polystream.monitor.executor import OrderColumns
from polystream.monitor.rules import Decision
from polystream.stats import Stats
from polystream.store.direct import DirectLink
from polystream.store.link import DbLink
from polystream.timing import Backoff, TokenBucket

if TYPE_CHECKING:  # the signing library is heavy (30 MiB): loaded only in clob mode
    from polystream.venue.orders import SignedOrder

__all__ = [
    "ORDER_LOCK",
    "ORDER_OUTCOMES",
    "OrderFacts",
    "OrderPlacer",
    "OrderPlan",
    "OrderSigner",
    "Verdict",
    "judge_answer",
    "judge_order",
    "plan_order",
]

logger = structlog.get_logger(__name__)

Side = Literal["BUY", "SELL"]

ORDER_OUTCOMES = (
    "signed", "placed", "filled", "canceled", "rejected", "failed", "refused", "dry_run",
    "retried", "recovered", "rate_limited", "heartbeats", "heartbeat_failed",
)  # fmt: skip
"""What :attr:`OrderPlacer.outcomes` counts (``polystream_orders_total{outcome}``)."""

ORDER_LOCK = 0x706F6C79  # "poly": the first key of the advisory locks of orders
SIZE_STEP = Decimal("0.01")
"""Order sizes are whole hundredths of a share (py-clob-client-v2 ``ROUNDING_CONFIG``)."""

WORKERS = 8
"""Orders worked on at once (a fixed set of tasks, never one per order)."""
SCAN_INTERVAL = 1.0
"""Seconds between looks for orders to take up (pending, unconfirmed, resting)."""
HEARTBEAT_INTERVAL = 5.0
"""Seconds between order heartbeats while an order rests (the venue cancels after 10 s)."""
RECOVER_AFTER = 2.0
"""Seconds a ``signed`` row must be old before another task or daemon takes it up."""


# ------------------------------------------------------------------ the order


@attrs.frozen
class OrderFacts:
    """
    What the database says about one trigger's order.

    Attributes:
        trigger_id: ``triggers.id``.
        kind: ``take_profit``, ``stop_loss``, ``prediction`` (others are never ordered).
        status: the row's status now.
        price: the trigger price, probability in [0, 1].
        token_id: the CLOB token (asset) id to trade, or None when unknown.
        size: the position's size in shares (TP/SL), else None.
        stake: the prediction's stake in USDC, else None.
        limit: the prediction's limit price, else None.
        tick: the market's tick size, e.g. ``Decimal("0.01")``, or None when unknown.
        neg_risk: the market is neg-risk (Gamma ``negRisk``).
        order_id, body, signed_at: what an earlier claim stored
            (``signed_at`` unix seconds).
    """

    trigger_id: int
    kind: str
    status: str
    price: Decimal | None
    token_id: str | None
    size: Decimal | None
    stake: Decimal | None
    limit: Decimal | None
    tick: Decimal | None
    neg_risk: bool
    order_id: str | None = None
    body: dict[str, Any] | None = None
    signed_at: float | None = None


@attrs.frozen
class OrderPlan:
    """One order to sign: ``side`` of ``size`` shares at ``price`` (limit, in [tick, 1 - tick])."""

    side: Side
    size: Decimal
    price: Decimal
    tick: Decimal


def _round(value: Decimal, tick: Decimal, rounding: str) -> Decimal:
    return (value / tick).to_integral_value(rounding=rounding) * tick


def plan_order(facts: OrderFacts, max_slippage: Decimal) -> OrderPlan | str:
    """
    The closing order of ``facts``, or why there is none (a short reason).

    A TP/SL sells the position (``size`` shares, rounded down to
    :data:`SIZE_STEP`) no lower than ``price - max_slippage`` rounded down to
    the tick; a prediction buys ``stake / limit`` shares (rounded down) at its
    limit, rounded to the tick. The limit stays in [tick, 1 - tick], the
    venue's price range. Sizes in shares, prices probabilities in [0, 1].
    """
    if facts.token_id is None:
        return "no token id"
    tick = facts.tick
    if tick is None or not Decimal(0) < tick < Decimal(1):
        return "no tick size for the market"
    low, high = tick, Decimal(1) - tick
    if facts.kind == "prediction":
        if facts.stake is None or facts.limit is None or facts.limit <= 0:
            return "prediction without stake or limit"
        price = min(max(_round(facts.limit, tick, ROUND_FLOOR), low), high)
        size = (facts.stake / price).quantize(SIZE_STEP, rounding=ROUND_DOWN)
        side: Side = "BUY"
    elif facts.kind in ("take_profit", "stop_loss"):
        if facts.size is None or facts.price is None:
            return "position without size or trigger price"
        price = min(max(_round(facts.price - max_slippage, tick, ROUND_FLOOR), low), high)
        size = facts.size.quantize(SIZE_STEP, rounding=ROUND_DOWN)
        side = "SELL"
    else:
        return f"{facts.kind} is not ordered"
    if size <= 0:
        return "size rounds to 0 shares"
    return OrderPlan(side=side, size=size, price=price, tick=tick)


class OrderSigner(Protocol):
    """
    Signs orders and requests with the account's key
    (:class:`polystream.venue.orders.TradingAccount`).
    """

    @property
    def owner(self) -> str:
        """The API key: the ``owner`` of every order body."""
        ...

    @property
    def max_batch(self) -> int:
        """Most orders in one ``POST /orders``."""
        ...

    def sign(
        self,
        *,
        token_id: str,
        side: Side,
        price: Decimal,
        size: Decimal,
        tick: Decimal,
        neg_risk: bool,
        order_type: Any,
    ) -> SignedOrder:
        """Build and sign one order (CPU only, about 0.6 ms; never waits)."""
        ...

    def headers(self, method: str, path: str, body: str) -> dict[str, str]:
        """The L2 authentication headers of one request (``path`` without its query)."""
        ...


# ------------------------------------------------------------------ the venue's answers


@attrs.frozen
class Verdict:
    """
    What an answer of the venue means for the row.

    ``status``: the row's next status (``placed``, ``filled``, ``canceled``,
    ``rejected``), or None when the answer settles nothing (retry, after asking).
    ``retry_after``: seconds the venue asked to wait (429), else None.
    """

    status: str | None
    order_status: str | None = None
    filled: Decimal | None = None
    error: str | None = None
    retry_after: float | None = None


def _amount(value: Any) -> Decimal | None:
    try:
        return Decimal(str(value)) if value not in (None, "") else None
    except ArithmeticError:
        return None


def judge_answer(
    status_code: int, answer: Any, side: Side, size: Decimal, retry_after: str | None = None
) -> Verdict:
    """
    The verdict of a ``POST /order`` answer: HTTP ``status_code``, parsed
    JSON ``answer`` (shapes: docs/execution.md, "What the venue answers").
    A duplicate refusal means the venue has the order: settle it by asking.
    """
    if status_code == 200 and isinstance(answer, dict):
        if not answer.get("success", False) or answer.get("errorMsg"):
            return Verdict("rejected", error=str(answer.get("errorMsg") or "success false"))
        order_status = str(answer.get("status") or "")
        # SELL: making = shares given; BUY: taking = shares received.
        filled = _amount(answer.get("makingAmount" if side == "SELL" else "takingAmount"))
        if order_status == "unmatched":
            return Verdict("rejected", order_status, filled, "unmatched")
        if order_status == "matched" and filled is not None and filled >= size:
            return Verdict("filled", order_status, filled)
        return Verdict("placed", order_status, filled)
    error = answer.get("error") if isinstance(answer, dict) else None
    text = str(error or answer or f"HTTP {status_code}")[:300]
    if status_code == 429:
        try:
            wait = float(retry_after) if retry_after else None
        except ValueError:
            wait = None
        return Verdict(None, error=f"429 {text}", retry_after=wait)
    if status_code >= 500:
        return Verdict(None, error=f"{status_code} {text}")
    if "duplicat" in text.lower():
        return Verdict(None, error="duplicate: the venue has it")
    return Verdict("rejected", error=f"{status_code} {text}")


def judge_order(order: Any, size: Decimal) -> Verdict | None:
    """
    The verdict of ``GET /data/order/{id}``'s answer ``order``, or None when
    the venue does not know the order (null, ``{}``, no ``id``).
    """
    if not isinstance(order, dict) or not order.get("id"):
        return None
    status = str(order.get("status") or "").upper().removeprefix("ORDER_STATUS_")
    matched = _amount(order.get("size_matched")) or Decimal(0)
    if status == "MATCHED" or matched >= size:
        return Verdict("filled", status.lower(), matched)
    if status.startswith("CANCEL") or status in ("INVALID", "UNMATCHED"):
        return Verdict("canceled", status.lower(), matched)
    return Verdict("placed", status.lower(), matched)


# ------------------------------------------------------------------ SQL
# Each a single statement run on the worker's DirectLink session (``$n``
# placeholders, values read back as text); the session holds the orders' locks.

_FACTS_OF_IDS = """
SELECT ids.id, t.kind, t.status, t.price, coalesce(p.token_id, r.token_id),
       p.size, r.stake_usdc, r.limit_price, m.tick_size, coalesce(m.neg_risk, false),
       t.order_id, t.order_body, extract(epoch FROM t.signed_at)::float8
FROM ids
LEFT JOIN triggers AS t ON t.id = ids.id
LEFT JOIN positions AS p ON p.id = t.position_id
LEFT JOIN predictions AS r ON r.id = t.prediction_id
LEFT JOIN markets AS m ON m.id = coalesce(p.market_id, r.market_id)
"""

_LOCKED_FACTS = (
    """
WITH ids AS (
    SELECT id FROM unnest($1::bigint[]) AS id
    WHERE pg_try_advisory_lock($2::int, mod(id, 2147483647)::int)
)"""
    + _FACTS_OF_IDS
)
"""Lock what it can of the trigger ids ``$1`` (session locks, key ``$2``) and read their facts."""

_FACTS = "WITH ids AS (SELECT id FROM unnest($1::bigint[]) AS id)" + _FACTS_OF_IDS
"""The facts of the trigger ids ``$1`` (already locked), read again."""

_UNLOCK = """
SELECT pg_advisory_unlock($1::int, mod(id, 2147483647)::int) FROM unnest($2::bigint[]) AS id
"""

_CLAIM = """
SELECT trigger_id, status, error FROM polystream_claim_orders(
    $1::bigint[], $2::text, $3::text[], $4::text[], $5::text[], $6::numeric[],
    $7::numeric[], $8::numeric, $9::text, $10::int, $11::bigint[])
"""
"""The claim (migration ``0004_claim_orders``): cap, compare-and-set, durable commit."""

_REFUSE = """
UPDATE triggers AS t SET status = 'refused', error = r.error
FROM unnest($1::bigint[], $2::text[]) AS r(id, error)
WHERE t.id = r.id AND t.status = 'pending'
"""

_RECORD = """
WITH r AS (
    SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::numeric[], $5::text[],
                         $6::int[])
        AS r(id, status, order_status, filled, error, sent)
), t AS (
    UPDATE triggers AS t SET
        status = coalesce(r.status, t.status),
        order_status = coalesce(r.order_status, t.order_status),
        filled_size = coalesce(r.filled, t.filled_size),
        error = r.error,
        attempts = t.attempts + r.sent,
        sent_at = CASE WHEN r.sent > 0 THEN coalesce(t.sent_at, now()) ELSE t.sent_at END,
        executed_at = CASE WHEN r.status IN ('placed', 'filled')
            THEN coalesce(t.executed_at, now()) ELSE t.executed_at END
    FROM r WHERE t.id = r.id
    RETURNING t.position_id, t.status
)
UPDATE positions AS p SET status = 'closed', updated_at = now()
FROM t WHERE p.id = t.position_id AND t.status = 'filled' AND p.status <> 'closed'
"""

_STATEMENTS = (_LOCKED_FACTS, _FACTS, _UNLOCK, _CLAIM, _REFUSE, _RECORD)
"""What each worker's session prepares when it connects."""

_TAKE_UP = """
SELECT id FROM triggers
WHERE status IN ('pending', 'signed', 'placed')
  AND (status <> 'signed' OR signed_at < now() - make_interval(secs => %(recover)s))
  AND (status <> 'pending' OR created_at BETWEEN now() - make_interval(secs => %(stale)s)
                                             AND now() - make_interval(secs => %(recover)s))
  AND (kind IN ('take_profit', 'stop_loss') OR (kind = 'prediction' AND %(predictions)s))
ORDER BY id
LIMIT 500
"""
"""
The rows to take up: ``signed`` ones unconfirmed for :data:`RECOVER_AFTER` s,
``placed`` ones (resting), and ``pending`` ones their decider left for
:data:`RECOVER_AFTER` s (a crash before the claim) but not older than
``execute.retry_window``: a decision that old is not acted on (its price is
old news; rows written before ``clob`` mode was enabled are the outbox's).
"""


def _decimal(text: str | None) -> Decimal | None:
    return None if text is None else Decimal(text)


def _facts_of(row: tuple[str | None, ...]) -> OrderFacts | None:
    """One row of :data:`_LOCKED_FACTS` (text values); None when the trigger is gone."""
    (tid, kind, status, price, token, size, stake, limit, tick, neg_risk) = row[:10]
    order_id, body, signed_at = row[10:]
    if kind is None or status is None or tid is None:
        return None
    return OrderFacts(
        int(tid), kind, status, _decimal(price), token, _decimal(size), _decimal(stake),
        _decimal(limit), _decimal(tick), neg_risk == "t", order_id,
        orjson.loads(body) if body else None, float(signed_at) if signed_at else None,
    )  # fmt: skip


async def _read_facts(session: DirectLink, trigger_ids: list[int]) -> list[OrderFacts]:
    """
    The facts of those of ``trigger_ids`` this session could lock (the others
    are being worked on by another task or daemon), locks kept. A row not
    ``pending`` is read again under its lock (the statement's snapshot
    predates the lock: a row settled elsewhere in between would look
    unsettled); a ``pending`` one needs not (its claim is a compare-and-set).
    """
    rows = await session.execute(_LOCKED_FACTS, [trigger_ids, ORDER_LOCK])
    found = [f for f in map(_facts_of, rows) if f is not None]
    gone = sorted({int(row[0] or 0) for row in rows} - {f.trigger_id for f in found})
    if gone:  # deleted meanwhile
        await _unlock(session, gone)
    older = [f.trigger_id for f in found if f.status != "pending"]
    if older:
        again = {
            f.trigger_id: f
            for f in map(_facts_of, await session.execute(_FACTS, [older]))
            if f is not None
        }
        found = [again.get(f.trigger_id, f) for f in found]
    return found


async def _unlock(session: DirectLink, trigger_ids: list[int]) -> None:
    """Release this session's locks of ``trigger_ids``."""
    if trigger_ids:
        await session.execute(_UNLOCK, [ORDER_LOCK, trigger_ids])


async def _warm_up(session: DirectLink, member: str) -> None:
    """
    Run each statement of an order once on ``session``, on no row (trigger id
    -1), so that the first real order does not pay for the new session's
    first look at the tables and the claim function's compilation.
    """
    await session.execute(_LOCKED_FACTS, [[], ORDER_LOCK])
    await session.execute(
        _CLAIM, [[-1], "signed", [""], ["{}"], ["SELL"], [0], [0], 0, member, ORDER_LOCK, []]
    )
    await session.execute(_RECORD, [[-1], [None], [None], [None], [None], [0]])


@attrs.frozen
class _Claim:
    """One signed order to claim: its trigger, plan, id and stored body (no ``owner``)."""

    facts: OrderFacts
    plan: OrderPlan
    order_id: str
    body: dict[str, Any]


async def _claim(
    session: DirectLink,
    claims: list[_Claim],
    status: str,
    cap: Decimal,
    member: str,
    to_lock: list[int],
) -> dict[int, tuple[str, str | None]]:
    """
    Move each ``pending`` row to ``status`` with its signed order, in one
    statement and one durable commit (``polystream_claim_orders``), first
    locking the rows of ``to_lock`` (not yet held by ``session``; one held
    elsewhere is not claimed). Orders that would pass the daily cap (``cap``
    USDC, all signed today) become ``refused``. Returns trigger id ->
    (status written, error) for the rows moved, which ``session`` holds.
    """
    rows = await session.execute(
        _CLAIM,
        [
            [c.facts.trigger_id for c in claims],
            status,
            [c.order_id for c in claims],
            [orjson.dumps(c.body).decode() for c in claims],
            [c.plan.side for c in claims],
            [c.plan.size for c in claims],
            [c.plan.price for c in claims],
            cap,
            member,
            ORDER_LOCK,
            to_lock,
        ],
    )
    return {int(tid or 0): (str(written), error) for tid, written, error in rows}


async def _record(session: DirectLink, results: list[tuple[int, Verdict, int]]) -> None:
    """
    The venue's word on each ``(trigger id, verdict, POSTs made)`` in one
    statement (a filled order closes its position); the locks stay held
    until the batch is done (:meth:`OrderPlacer._handle`).
    """
    await session.execute(
        _RECORD,
        [
            [trigger_id for trigger_id, _, _ in results],
            [verdict.status for _, verdict, _ in results],
            [verdict.order_status for _, verdict, _ in results],
            [verdict.filled for _, verdict, _ in results],
            [verdict.error for _, verdict, _ in results],
            [sent for _, _, sent in results],
        ],
    )


# ------------------------------------------------------------------ the placer

_WARM_UP = (
    OrderFacts(0, "take_profit", "pending", Decimal("0.5"), "1", Decimal(1), None, None,
               Decimal("0.01"), False),
    OrderPlan("SELL", Decimal(1), Decimal("0.5"), Decimal("0.01")),
)  # fmt: skip
"""A made-up order signed once at start-up (never stored, never sent)."""


@attrs.define(eq=False)
class OrderPlacer:
    """
    Places the orders of triggers (see the module's text): :meth:`written`
    from the executor once a trigger row is written (or :meth:`submit`),
    :meth:`scan` every :data:`SCAN_INTERVAL` s for rows to take up;
    :data:`WORKERS` tasks work on them, each with a database session of its
    own (its orders' advisory locks live in it); one task keeps the order
    heartbeat while orders rest.

    ``http`` is an :class:`httpx.AsyncClient` whose ``base_url`` is
    ``execute.clob_url``; ``link`` a :class:`DbLink` for the scan, whose DSN,
    name, stats and statement timeout the workers' sessions take.

    Attributes:
        outcomes: orders by outcome (``stats.orders``): signed, placed, filled,
            rejected, failed, refused, dry_run, retried, recovered,
            rate_limited, heartbeats, heartbeat_failed.
    """

    config: ExecuteConfig
    link: DbLink
    http: httpx.AsyncClient
    signer: OrderSigner
    stats: Stats
    member: str = "polystream"
    _todo: dict[int, OrderFacts | None] = attrs.field(factory=dict)
    _busy: set[int] = attrs.field(factory=set)
    _idle: trio.lowlevel.ParkingLot = attrs.field(factory=trio.lowlevel.ParkingLot)
    outcomes: Counter[str] = attrs.field(init=False)
    _bucket: TokenBucket = attrs.field(init=False)
    _bucket_lock: trio.Lock = attrs.field(factory=trio.Lock)
    _resting: set[int] = attrs.field(factory=set)
    _heartbeat_id: str = ""
    _refusals: RateLimitedLog = attrs.field(factory=lambda: RateLimitedLog(1.0))

    def __attrs_post_init__(self) -> None:
        rate = self.config.orders_per_second
        self._bucket = TokenBucket(rate, capacity=max(1.0, rate * 1.5), now=trio.current_time())
        self.outcomes = self.stats.orders = Counter()
        self.stats.orders_pending = lambda: self.pending
        self.stats.orders_sent = self.config.enabled

    @property
    def pending(self) -> int:
        """Triggers queued or being worked on."""
        return len(self._todo) + len(self._busy)

    def submit(self, trigger_id: int, facts: OrderFacts | None = None) -> None:
        """
        Queue ``trigger_id`` (its row is written), with its ``facts`` when
        known (then they are not read again); never blocks.
        """
        if trigger_id not in self._busy:
            if facts is not None or trigger_id not in self._todo:
                self._todo[trigger_id] = facts
            self._idle.unpark()  # one idle worker, if any (the others are busy)

    def written(self, trigger_id: int, decision: Decision, columns: OrderColumns | None) -> None:
        """
        The executor's hand-off (``Executor.on_written``): ``decision`` was
        written as trigger ``trigger_id``, with its order columns as the
        decision statement returned them (``executor.OrderColumns``, text;
        None when not read there). Queues a TP/SL, or a prediction with
        ``execute.predictions``; other kinds are not ordered.
        """
        if decision.kind not in ("take_profit", "stop_loss") and not (
            decision.kind == "prediction" and self.config.predictions
        ):
            return
        facts = None
        if columns is not None:
            token, size, stake, limit, tick, neg_risk = columns
            facts = OrderFacts(
                trigger_id, decision.kind, "pending", decision.price, token, _decimal(size),
                _decimal(stake), _decimal(limit), _decimal(tick), neg_risk == "t",
            )  # fmt: skip
        self.submit(trigger_id, facts)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Workers, the scan and the heartbeat, until cancelled."""
        # One order signed and thrown away: the library's first signature builds its
        # caches (tens of ms), which must not fall on the first real order.
        await trio.to_thread.run_sync(self._sign, *_WARM_UP)
        async with trio.open_nursery() as nursery:
            for index in range(WORKERS):
                nursery.start_soon(self._work, index)
            nursery.start_soon(self._scan_loop)
            nursery.start_soon(self._heartbeat_loop)
            task_status.started()

    # -------------------------------------------------------------- taking work

    async def scan(self) -> None:
        """Queue every trigger with an order to make, confirm or follow (see :data:`_TAKE_UP`)."""
        params = {
            "recover": RECOVER_AFTER,
            "stale": self.config.retry_window,
            "predictions": self.config.predictions,
        }
        rows = await self.link.call(lambda conn: conn.execute(_TAKE_UP, params).fetchall())
        for (trigger_id,) in rows:
            self.submit(int(trigger_id))

    async def _scan_loop(self) -> None:
        while True:
            try:
                await self.scan()
            except DatabaseError:
                pass  # counted and logged by the link; the next look retries
            await trio.sleep(SCAN_INTERVAL)

    async def _work(self, index: int) -> None:
        """
        One worker, with a database session of its own (:class:`DirectLink`:
        statements on the loop, no worker-thread hop; its orders' locks live
        in it), connected and its statements prepared before the first order.
        """
        base = self.link
        session = DirectLink(
            dsn=base.dsn,
            name=f"{base.name}-{index}",
            stats=base.stats,
            statement_timeout=base.statement_timeout,
        )
        try:
            await session.warm_up(_STATEMENTS)
            with contextlib.suppress(DatabaseError):  # counted and logged; the first order retries
                await _warm_up(session, self.member)
            await self._work_with(session)
        finally:
            session.close()

    async def _work_with(self, session: DirectLink) -> None:
        while True:
            while not self._todo:
                await self._idle.park()
            batch = list(itertools.islice(self._todo.items(), self.signer.max_batch))
            for trigger_id, _ in batch:
                del self._todo[trigger_id]
            ids = [trigger_id for trigger_id, _ in batch]
            self._busy.update(ids)
            try:
                await self._handle(batch, session)
            except DatabaseError:
                pass  # the rows keep their state; the next scan takes them up again
            finally:
                self._busy.difference_update(ids)

    async def _handle(
        self, batch: list[tuple[int, OrderFacts | None]], session: DirectLink
    ) -> None:
        """
        Work on a batch: new orders of known facts are locked by their claim;
        the others' facts are read (and their rows locked) first. Every lock
        the batch took is released once it is done.
        """
        known = [facts for _, facts in batch if facts is not None]
        unknown = [trigger_id for trigger_id, facts in batch if facts is None]
        found = await _read_facts(session, unknown) if unknown else []
        held = {f.trigger_id for f in found}  # this session's locks
        try:
            new = known + [f for f in found if f.status == "pending"]
            if new:
                await self._place(new, session, held)
            for facts in found:
                if facts.status == "signed":
                    await self._confirm(facts, session)
                elif facts.status == "placed":
                    await self._follow(facts, session)
        finally:
            if held and session.connected:  # a closed session holds no lock
                with trio.CancelScope(shield=True):
                    await _unlock(session, sorted(held))

    # -------------------------------------------------------------- new orders

    async def _place(self, new: list[OrderFacts], session: DirectLink, held: set[int]) -> None:
        """
        Plan, sign (on the loop), claim (one statement, one durable commit,
        locking the rows not in ``held``, which then holds them too) and send
        (one ``POST /order`` or ``POST /orders``) a batch of new orders.
        """
        slippage = Decimal(str(self.config.max_slippage))
        planned: list[tuple[OrderFacts, OrderPlan]] = []
        refused: list[tuple[int, str]] = []
        for facts in new:
            if facts.kind == "prediction" and not self.config.predictions:
                continue
            plan = plan_order(facts, slippage)
            if isinstance(plan, str):
                refused.append((facts.trigger_id, plan))
            else:
                planned.append((facts, plan))
        signed = self._sign_all(planned)
        claims = []
        for (facts, plan), order in zip(planned, signed, strict=True):
            if isinstance(order, str):
                refused.append((facts.trigger_id, order))
            else:  # the API key (owner) is not stored: added at each send
                body = {k: v for k, v in order.body.items() if k != "owner"}
                claims.append(_Claim(facts, plan, order.order_id, body))
        if refused:
            await session.execute(_REFUSE, [[t for t, _ in refused], [r for _, r in refused]])
            for trigger_id, reason in refused:
                self._count("refused", trigger_id, reason)
        if not claims:
            return
        status = "signed" if self.config.enabled else "dry_run"
        cap = Decimal(str(self.config.max_daily_notional))
        to_lock = [c.facts.trigger_id for c in claims if c.facts.trigger_id not in held]
        claimed = await _claim(session, claims, status, cap, self.member, to_lock)
        held.update(claimed)
        sending = []
        for claim in claims:
            written, error = claimed.get(claim.facts.trigger_id, (None, None))
            if written == "signed":
                self.outcomes["signed"] += 1
                sending.append(claim)
            elif written is not None:  # dry_run, refused; None: decided elsewhere, never sent
                plan = claim.plan
                self._count(
                    written,
                    claim.facts.trigger_id,
                    error or f"{plan.side} {plan.size} @ {plan.price}",
                )
        if sending:
            await self._send_batch(sending, session)

    def _sign_all(self, planned: list[tuple[OrderFacts, OrderPlan]]) -> list[SignedOrder | str]:
        """
        Sign each planned order on the loop, at once: about 0.6 ms each, and
        at most ``signer.max_batch`` in a batch (a worker thread would first
        have to win the GIL back from the busy loop, several ms; letting
        frames in between signatures delays the whole batch by their work).
        """
        return [self._sign(facts, plan) for facts, plan in planned]

    def _sign(self, facts: OrderFacts, plan: OrderPlan) -> SignedOrder | str:
        """One signed order, or why it cannot be signed (never the key)."""
        assert facts.token_id is not None
        try:
            return self.signer.sign(
                token_id=facts.token_id,
                side=plan.side,
                price=plan.price,
                size=plan.size,
                tick=plan.tick,
                neg_risk=facts.neg_risk,
                order_type=self.config.order_type,
            )
        except (ValueError, RuntimeError) as exc:  # their messages never hold the key
            return f"cannot sign: {exc}"[:300]

    async def _send_batch(self, sending: list[_Claim], session: DirectLink) -> None:
        """One request for the batch; settled answers recorded together, the rest retried."""
        now = time.time()
        orders = [(c.body, c.plan.side, c.plan.size) for c in sending]
        verdicts = await self._post(orders)
        settled = [
            (c.facts.trigger_id, v, 1) for c, v in zip(sending, verdicts, strict=True) if v.status
        ]
        if settled:
            await _record(session, settled)
        for claim, verdict in zip(sending, verdicts, strict=True):
            facts = attrs.evolve(
                claim.facts, status="signed", order_id=claim.order_id, body=claim.body,
                signed_at=now,
            )  # fmt: skip
            if verdict.status is not None:
                self._told(facts, verdict, claim.plan.side)
            else:
                await self._send_until_settled(
                    facts, claim.plan.side, claim.plan.size, session, first=verdict
                )

    # -------------------------------------------------------------- an unconfirmed order

    async def _confirm(self, facts: OrderFacts, session: DirectLink) -> None:
        """A ``signed`` row of an earlier try or life: ask the venue before anything is sent."""
        assert facts.order_id is not None and facts.body is not None
        side, size = self._side_size(facts)
        verdict = await self._ask(facts.order_id, size)
        if verdict is not None:
            self.outcomes["recovered"] += 1
            await self._settle(facts, verdict, session, sent=0, side=side)
            return
        await self._send_until_settled(facts, side, size, session)

    @staticmethod
    def _side_size(facts: OrderFacts) -> tuple[Side, Decimal]:
        assert facts.body is not None
        order = facts.body["order"]
        side: Side = "BUY" if order["side"] == "BUY" else "SELL"
        shares = Decimal(order["takerAmount" if side == "BUY" else "makerAmount"]) / 1_000_000
        return side, shares

    async def _send_until_settled(
        self,
        facts: OrderFacts,
        side: Side,
        size: Decimal,
        session: DirectLink,
        first: Verdict | None = None,
    ) -> None:
        """
        POST the stored body (unless ``first`` is the answer to a POST just
        made); when the answer settles nothing, wait (backoff or
        ``Retry-After``), ask the venue, and send the same body again, until
        ``execute.retry_window`` after signing.
        """
        assert facts.order_id is not None and facts.body is not None
        backoff = Backoff(0.2, 5.0)
        deadline = (facts.signed_at or time.time()) + self.config.retry_window
        while True:
            if first is None:
                (verdict,) = await self._post([(facts.body, side, size)])
            else:
                verdict, first = first, None
            if verdict.status is not None:
                await self._settle(facts, verdict, session, sent=1, side=side)
                return
            await _record(session, [(facts.trigger_id, verdict, 1)])
            self.outcomes["retried"] += 1
            self._log_refusal(facts.trigger_id, verdict.error)
            wait = verdict.retry_after if verdict.retry_after is not None else backoff.next_delay()
            if time.time() + wait > deadline:
                failed = Verdict("failed", error=f"not confirmed: {verdict.error}")
                await self._settle(facts, failed, session, sent=0, side=side)
                return
            await trio.sleep(wait)
            asked_now = await self._ask(facts.order_id, size)
            if asked_now is not None:
                await self._settle(facts, asked_now, session, sent=0, side=side)
                return

    async def _post(self, orders: list[tuple[dict[str, Any], Side, Decimal]]) -> list[Verdict]:
        """
        ``POST /order`` of one stored body, or ``POST /orders`` of several (at
        most ``signer.max_batch``), each ``(body, side, size in shares)`` with
        ``owner`` added; a verdict per order.
        """
        await self._take_token(len(orders))
        owner = self.signer.owner
        texts = [orjson.dumps({**body, "owner": owner}).decode() for body, _, _ in orders]
        path, text = (
            ("/order", texts[0]) if len(texts) == 1 else ("/orders", f"[{','.join(texts)}]")
        )
        try:
            response = await self._request("POST", path, text)
        except httpx.HTTPError as exc:
            return [Verdict(None, error=f"{type(exc).__name__}: {exc}"[:300])] * len(orders)
        try:
            answer = orjson.loads(response.content) if response.content else None
        except orjson.JSONDecodeError:
            answer = response.text[:300]
        if response.status_code == 429:
            self.outcomes["rate_limited"] += 1
        after = response.headers.get("retry-after")
        code = response.status_code
        # One answer per order from a batch; else the whole answer (an error) for each.
        answers: list[Any] = [answer] * len(orders)
        if path == "/orders" and code == 200 and isinstance(answer, list):
            answers = answer if len(answer) == len(orders) else answers
        return [
            judge_answer(code, item, side, size, after)
            for item, (_, side, size) in zip(answers, orders, strict=True)
        ]

    async def _request(self, method: str, path: str, text: str = "") -> httpx.Response:
        """
        One L2-authenticated request to the CLOB (``text``: the JSON body).

        Raises:
            httpx.HTTPError: the request failed or timed out (``execute.request_timeout``).
        """
        headers = self.signer.headers(method, path, text)
        if text:
            headers["content-type"] = "application/json"
        return await self.http.request(method, path, content=text or None, headers=headers)

    async def _take_token(self, cost: int) -> None:
        """
        Wait for ``cost`` orders' room in the order bucket (one worker at a
        time). When there is room and no worker waits, taken at once: no
        scheduling round, in which the feed's next frame would go first.
        """
        if not self._bucket_lock.locked() and self._bucket.try_take(cost, trio.current_time()):
            return
        async with self._bucket_lock:
            ready = self._bucket.ready_at(cost, trio.current_time())
            await trio.sleep_until(ready)
            self._bucket.try_take(cost, max(ready, trio.current_time()))

    async def _ask(self, order_id: str, size: Decimal) -> Verdict | None:
        """The venue's word on ``order_id`` (None: unknown to it, or it cannot be asked)."""
        try:
            response = await self._request("GET", f"/data/order/{order_id}")
        except httpx.HTTPError:
            return None
        if response.status_code != 200 or not response.content:
            return None
        try:
            return judge_order(orjson.loads(response.content), size)
        except orjson.JSONDecodeError:
            return None

    async def _settle(
        self, facts: OrderFacts, verdict: Verdict, session: DirectLink, *, sent: int, side: Side
    ) -> None:
        await _record(session, [(facts.trigger_id, verdict, sent)])
        self._told(facts, verdict, side)

    def _told(self, facts: OrderFacts, verdict: Verdict, side: Side) -> None:
        """Count and log a settled order; remember it while it rests."""
        status = verdict.status or "placed"
        if status == "placed" and verdict.order_status in ("live", "delayed", ""):
            self._resting.add(facts.trigger_id)
        else:
            self._resting.discard(facts.trigger_id)
        self._count(status, facts.trigger_id, verdict.error, order_id=facts.order_id, side=side)

    # -------------------------------------------------------------- a resting order

    async def _follow(self, facts: OrderFacts, session: DirectLink) -> None:
        if facts.order_id is None or facts.body is None:
            return
        side, size = self._side_size(facts)
        verdict = await self._ask(facts.order_id, size)
        if verdict is None:
            return
        if verdict.status == "placed":
            self._resting.add(facts.trigger_id)
            await _record(session, [(facts.trigger_id, verdict, 0)])
            return
        await self._settle(facts, verdict, session, sent=0, side=side)

    async def _heartbeat_loop(self) -> None:
        """``POST /v1/heartbeats`` every :data:`HEARTBEAT_INTERVAL` s while an order rests."""
        while True:
            await trio.sleep(HEARTBEAT_INTERVAL)
            if self._resting and self.config.enabled:
                await self.heartbeat()

    async def heartbeat(self) -> bool:
        """
        One order heartbeat, chained by ``heartbeat_id`` (a stale id is
        answered 400 with the expected one: sent again once with it).
        Returns whether the venue accepted it.
        """
        for _ in range(2):
            text = orjson.dumps({"heartbeat_id": self._heartbeat_id}).decode()
            try:
                response = await self._request("POST", "/v1/heartbeats", text)
                answer = orjson.loads(response.content) if response.content else {}
            except (httpx.HTTPError, orjson.JSONDecodeError) as exc:
                self.outcomes["heartbeat_failed"] += 1
                self._log_refusal(None, f"heartbeat: {type(exc).__name__}")
                return False
            expected = answer.get("heartbeat_id") if isinstance(answer, dict) else None
            if response.status_code == 200:
                self._heartbeat_id = str(expected or self._heartbeat_id)
                self.outcomes["heartbeats"] += 1
                return True
            if response.status_code == 400 and expected:
                self._heartbeat_id = str(expected)
                continue
            break
        self.outcomes["heartbeat_failed"] += 1
        return False

    # -------------------------------------------------------------- telling

    def _count(self, outcome: str, trigger_id: int, detail: str | None, **fields: Any) -> None:
        self.outcomes[outcome] += 1
        if outcome in ("rejected", "failed", "refused"):
            logger.warning("order_" + outcome, trigger_id=trigger_id, reason=detail, **fields)
        else:
            logger.info("order_" + outcome, trigger_id=trigger_id, detail=detail, **fields)

    def _log_refusal(self, trigger_id: int | None, error: str | None) -> None:
        suppressed = self._refusals.allow(str(error)[:40], time.monotonic())
        if suppressed is not None:
            logger.warning("order_retry", trigger_id=trigger_id, error=error, suppressed=suppressed)
