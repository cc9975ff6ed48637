"""
A fake of the CLOB V2 trading API, in memory: the peer of order execution in
tests, the demo and benches.

:class:`FakeClob` is an ASGI app (served by hypercorn through
:func:`polystream.ops.health.serve_asgi`, like :class:`ClobRest`) answering
what a trading client calls (docs/execution.md; docs.polymarket.com
"Error Codes", https://docs.polymarket.com/api-reference/trade/send-heartbeat,
https://docs.polymarket.com/api-reference/trade/cancel-orders-for-a-market,
https://docs.polymarket.com/v2-migration):

* public: ``GET /version`` ``{"version": 2}``, ``GET /time`` (unix s),
  ``GET /tick-size?token_id=`` ``{"minimum_tick_size": 0.01}``,
  ``GET /neg-risk?token_id=`` ``{"neg_risk": false}``;
* L2-authenticated (401 ``{"error": "Unauthorized/Invalid api key"}`` unless
  ``POLY_API_KEY`` and ``POLY_PASSPHRASE`` name an account, ``POLY_ADDRESS``
  is its address, ``POLY_TIMESTAMP`` is within :attr:`FakeClob.max_clock_skew`
  of now and ``POLY_SIGNATURE`` is the URL-safe base64 HMAC-SHA256 of
  ``timestamp + METHOD + path (no query) + raw body`` keyed by the
  base64-decoded secret):

  - ``POST /order`` (one body) and ``POST /orders`` (a list of at most 15):
    each order's EIP-712 signature is checked by recovering its signer
    (``eth_account`` over the library's typed data, the domain's exchange
    chosen by the token's neg-risk flag); the orderID is the EIP-712 digest;
  - ``GET /data/order/{id}`` (and ``/order/{id}``), ``GET /data/orders``
    (open orders; ``id``, ``market``, ``asset_id``), ``GET /data/trades``
    (and ``/trades``; ``id``, ``maker_address``, ``market``, ``asset_id``,
    ``before``, ``after``): pages end with ``next_cursor`` ``"LTE="``;
  - ``DELETE /order`` ``{"orderID"}``, ``DELETE /orders`` ``[ids]``,
    ``DELETE /cancel-all``, ``DELETE /cancel-market-orders``
    ``{"market"?, "asset_id"?}``: ``{"canceled": [...], "not_canceled": {id: reason}}``;
  - ``POST /v1/heartbeats`` (and ``/heartbeats``) ``{"heartbeat_id"}``: the
    dead-man switch (:meth:`FakeClob.run_dead_man`).

What the venue does with a valid order is scripted (:class:`Outcome`,
:attr:`FakeClob.script`); every request is recorded (:class:`OrderRequest`)
and counted (:attr:`FakeClob.counts`).

Guesses where the venue's behaviour is undocumented (docs/execution.md,
"Open or unverified points"), so tests must not lean on their exact text:

* duplicates: an order that reached matching (filled, resting, or killed as
  FOK/FAK) is indexed by its id and a re-POST is 400
  ``order {id} is invalid. Duplicated.`` (docs "Error Codes"); orders
  refused before that (auth, payload, signature, tick, a scripted
  ``reject``, 429, 503, ``timeout``) are not indexed;
* a killed FOK, and a FAK that matched nothing, answer 400 with the docs'
  messages; a partly matched GTC/GTD answers ``status`` ``"matched"`` with
  the matched amounts and rests the rest;
* ``GET /data/order/{unknown}`` answers 200 ``null``;
* a heartbeat with a non-empty id while none is armed (e.g. after the
  dead-man fired) is 400 ``Invalid Heartbeat ID`` with ``heartbeat_id`` ``""``;
* POLY_1271 (deposit-wallet) signatures are not verified: refused as
  ``invalid signature``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import math
import time
import uuid
from collections import Counter, deque
from collections.abc import Iterable
from decimal import ROUND_DOWN, Decimal
from typing import Any, Final, Literal, get_args
from urllib.parse import parse_qs

import attrs
import orjson
import trio
from eth_account import Account
from eth_account.messages import SignableMessage, encode_typed_data
from eth_keys.exceptions import BadSignature
from eth_utils.crypto import keccak
from eth_utils.exceptions import ValidationError

from polystream.ops.health import Receive, Scope, Send, answer_lifespan, serve_asgi
from polystream.replay.rest import read_body
from polystream.venue.orders import (
    MAX_BATCH_ORDERS,
    ORDER_TYPES,
    POLYGON,
    ApiCredentials,
    order_typed_data,
)

__all__ = [
    "DEAD_MAN_AFTER",
    "OUTCOME_KINDS",
    "DeadManFiring",
    "FakeAccount",
    "FakeClob",
    "FakeOrder",
    "FakeTrade",
    "OrderRequest",
    "Outcome",
    "OutcomeKind",
]

DEAD_MAN_AFTER: Final = 10.0
"""Seconds without an accepted heartbeat before the venue cancels every open order (docs/execution.md)."""

OutcomeKind = Literal[
    "fill",
    "partial",
    "live",
    "reject",
    "rate_limited",
    "timeout",
    "accept_then_drop",
    "unavailable",
]
OUTCOME_KINDS: Final = get_args(OutcomeKind)
_REQUEST_LEVEL: Final = frozenset({"rate_limited", "timeout", "unavailable"})

UNAUTHORIZED: Final = "Unauthorized/Invalid api key"
INVALID_PAYLOAD: Final = "Invalid order payload"
INVALID_SIGNATURE: Final = "invalid signature"
BALANCE: Final = "not enough balance / allowance"
DISABLED: Final = "Trading is currently disabled. Check polymarket.com for updates"
FOK_KILLED: Final = "order couldn't be fully filled. FOK orders are fully filled or killed."
FAK_KILLED: Final = (
    "no orders found to match with FAK order. FAK orders are partially filled or killed"
    " if no match is found."
)
CROSSES: Final = "invalid post-only order: order crosses book"
NOT_CANCELED: Final = "order can't be found - already canceled or matched"
END_CURSOR: Final = "LTE="

_CENT: Final = Decimal("0.01")
_MICRO: Final = Decimal(1_000_000)


@attrs.frozen
class Outcome:
    """
    What the fake venue does with one order (or, for the request-level
    kinds, one ``POST /order(s)`` request). Build with the class methods.

    Attributes:
        kind: one of :data:`OUTCOME_KINDS`.
        fraction: the share of the order's size matched at once, in [0, 1]
            (fill 1, live 0; rounded down to 0.01 share).
        reason: the error message of ``reject``.
        status: the HTTP status of ``reject``.
        retry_after: seconds, the ``Retry-After`` of ``rate_limited``.
        close: for ``accept_then_drop``: cut the connection after the status
            line instead of holding the request open.
    """

    kind: OutcomeKind
    fraction: Decimal = Decimal(1)
    reason: str = ""
    status: int = 200
    retry_after: float = 1.0
    close: bool = False

    @classmethod
    def fill(cls) -> Outcome:
        """Matched in full at once: ``status`` ``matched``, one trade (the default)."""
        return cls("fill")

    @classmethod
    def partial(cls, fraction: Decimal | str = "0.5") -> Outcome:
        """
        ``fraction`` (in (0, 1)) of the size matched at once; a GTC/GTD rests
        the rest as an open order, a FAK cancels it, a FOK is killed.
        """
        share = Decimal(fraction)
        if not 0 < share < 1:
            raise ValueError(f"partial fraction must be in (0, 1), got {fraction}")
        return cls("partial", share)

    @classmethod
    def live(cls) -> Outcome:
        """Rests on the book unmatched: ``status`` ``live`` (a FOK/FAK is killed)."""
        return cls("live", Decimal(0))

    @classmethod
    def reject(cls, reason: str = BALANCE, status: int = 400) -> Outcome:
        """Refused with ``status`` ``{"error": reason}``; the order is not kept."""
        return cls("reject", Decimal(0), reason=reason, status=status)

    @classmethod
    def rate_limited(cls, retry_after: float = 1.0) -> Outcome:
        """The request answered 429 ``Too Many Requests`` with ``Retry-After``; nothing kept."""
        return cls("rate_limited", Decimal(0), retry_after=retry_after)

    @classmethod
    def timeout(cls) -> Outcome:
        """The request held open, unanswered, until the client leaves; nothing kept."""
        return cls("timeout", Decimal(0))

    @classmethod
    def accept_then_drop(cls, fraction: Decimal | str = "1", *, close: bool = False) -> Outcome:
        """
        The order kept and ``fraction`` of it matched (1: in full, 0: resting),
        but never answered: held open until the client leaves, or with
        ``close`` cut after the status line. A crash after send, seen from
        the client.
        """
        share = Decimal(fraction)
        if not 0 <= share <= 1:
            raise ValueError(f"fraction must be in [0, 1], got {fraction}")
        return cls("accept_then_drop", share, close=close)

    @classmethod
    def unavailable(cls) -> Outcome:
        """The request answered 503 ``Trading is currently disabled...``; nothing kept."""
        return cls("unavailable", Decimal(0), reason=DISABLED, status=503)

    @property
    def request_level(self) -> bool:
        """Whether it applies to a whole request, before authentication (429, 503, timeout)."""
        return self.kind in _REQUEST_LEVEL


@attrs.frozen
class FakeAccount:
    """
    One API key of the fake venue and the address it belongs to.

    Attributes:
        credentials: the API key, secret and passphrase.
        address: the EOA the key was derived for (``POLY_ADDRESS``, the orders' signer).
    """

    credentials: ApiCredentials
    address: str

    @property
    def api_key(self) -> str:
        """The account's API key."""
        return self.credentials.api_key


@attrs.define(eq=False)
class FakeOrder:
    """
    An order the fake venue kept.

    Attributes:
        order_id: its EIP-712 digest.
        api_key: the owner.
        maker: the funder address (``order.maker``).
        token_id: the asset (``tokenId``).
        market: the condition id of its market.
        side: ``BUY`` or ``SELL``.
        price: USDC per share (takerAmount / makerAmount or the inverse).
        original_size: shares signed.
        size_matched: shares matched so far.
        status: ``LIVE``, ``MATCHED`` or ``CANCELED``.
        order_type: ``GTC``, ``GTD``, ``FOK`` or ``FAK``.
        expiration: unix seconds as text, as sent (not signed; ``"0"``: none).
        created_at: unix seconds (wall clock).
        trade_ids: its trades, in order.
        body: the ``POST`` body it came in.
    """

    order_id: str
    api_key: str
    maker: str
    token_id: str
    market: str
    side: str
    price: Decimal
    original_size: Decimal
    size_matched: Decimal
    status: str
    order_type: str
    expiration: str
    created_at: int
    trade_ids: list[str]
    body: dict[str, Any]

    @property
    def remaining(self) -> Decimal:
        """Shares not matched yet."""
        return self.original_size - self.size_matched

    def to_json(self) -> dict[str, Any]:
        """The venue's open-order object (``/data/orders`` items, ``/data/order/{id}``)."""
        return {
            "id": self.order_id,
            "status": self.status,
            "owner": self.api_key,
            "maker_address": self.maker,
            "market": self.market,
            "asset_id": self.token_id,
            "side": self.side,
            "original_size": _text(self.original_size),
            "size_matched": _text(self.size_matched),
            "price": _text(self.price),
            "outcome": "",
            "expiration": self.expiration,
            "order_type": self.order_type,
            "associate_trades": list(self.trade_ids),
            "created_at": self.created_at,
        }


@attrs.frozen
class FakeTrade:
    """
    One match of a kept order.

    Attributes:
        trade_id: a UUID.
        order_id: the order matched.
        api_key: its owner.
        maker_address: its maker.
        market: condition id.
        token_id: asset id.
        side: the order's side.
        size: shares matched.
        price: USDC per share.
        match_time: unix seconds (wall clock).
        trader_side: ``TAKER`` when matched on arrival, ``MAKER`` when resting.
        transaction_hash: a fake settlement hash (status is ``MINED``).
    """

    trade_id: str
    order_id: str
    api_key: str
    maker_address: str
    market: str
    token_id: str
    side: str
    size: Decimal
    price: Decimal
    match_time: int
    trader_side: str
    transaction_hash: str

    def to_json(self) -> dict[str, Any]:
        """The venue's trade object (``/data/trades`` items)."""
        taker = self.trader_side == "TAKER"
        maker_orders = (
            []
            if taker
            else [
                {
                    "order_id": self.order_id,
                    "owner": self.api_key,
                    "maker_address": self.maker_address,
                    "matched_amount": _text(self.size),
                    "price": _text(self.price),
                    "fee_rate_bps": "0",
                    "asset_id": self.token_id,
                    "outcome": "",
                    "side": self.side,
                }
            ]
        )
        return {
            "id": self.trade_id,
            "taker_order_id": self.order_id if taker else "",
            "market": self.market,
            "asset_id": self.token_id,
            "side": self.side,
            "size": _text(self.size),
            "fee_rate_bps": "0",
            "price": _text(self.price),
            "status": "MINED",
            "match_time": str(self.match_time),
            "last_update": str(self.match_time),
            "outcome": "",
            "bucket_index": 0,
            "owner": self.api_key,
            "maker_address": self.maker_address,
            "maker_orders": maker_orders,
            "transaction_hash": self.transaction_hash,
            "trader_side": self.trader_side,
        }


@attrs.frozen
class OrderRequest:
    """
    One HTTP request the fake answered (or held), in arrival order.

    Attributes:
        method: ``GET``, ``POST``, ``DELETE``.
        path: e.g. ``/order``.
        query: the raw query string.
        body: the JSON body, parsed (None when empty or not JSON).
        status: the HTTP status answered; 0 when never answered (held or cut).
        outcomes: per order: the :class:`Outcome` kind applied, or what
            refused it (``unauthorized``, ``invalid``, ``invalid_signature``,
            ``duplicate``, ``killed``, ``crosses``); the request-level kind
            for 429/503/timeout; empty for other routes.
        signers: per order, the address recovered from its signature ("" if none).
        order_ids: per order, its id ("" when the body could not be hashed).
        at: ``trio.current_time()`` on arrival.
    """

    method: str
    path: str
    query: str
    body: Any
    status: int
    outcomes: tuple[str, ...]
    signers: tuple[str, ...]
    order_ids: tuple[str, ...]
    at: float

    @property
    def outcome(self) -> str | None:
        """The first of :attr:`outcomes` (a single ``POST /order``'s), or None."""
        return self.outcomes[0] if self.outcomes else None

    @property
    def signer(self) -> str | None:
        """The first recovered signer, or None."""
        return self.signers[0] if self.signers else None

    @property
    def order_id(self) -> str | None:
        """The first order id, or None."""
        return self.order_ids[0] if self.order_ids else None


@attrs.frozen
class DeadManFiring:
    """The dead-man switch fired: at ``at`` (trio time) for ``api_key``, cancelling ``order_ids``."""

    at: float
    api_key: str
    order_ids: tuple[str, ...]


@attrs.define
class _Heartbeat:
    """An armed dead-man switch: the id the next heartbeat must carry, and when it fires."""

    expected_id: str
    deadline: float


@attrs.frozen
class _Placement:
    """One order's fate: HTTP status, answer object, and what to record."""

    status: int
    answer: dict[str, Any]
    outcome: str
    order_id: str = ""
    signer: str = ""
    drop: Outcome | None = None

    @property
    def error(self) -> str:
        """The error message of a refusal."""
        return str(self.answer.get("error", ""))


@attrs.frozen
class _Answer:
    """What to answer one request, and what to record of it."""

    status: int
    body: Any
    outcomes: tuple[str, ...] = ()
    signers: tuple[str, ...] = ()
    order_ids: tuple[str, ...] = ()
    retry_after: float | None = None
    hold: bool = False
    close: bool = False


def _error(status: int, message: str, outcome: str = "invalid") -> _Placement:
    return _Placement(status, {"error": message}, outcome)


@attrs.define(eq=False)
class FakeClob:
    """
    An ASGI app answering like the CLOB V2 trading API, from memory.

    Build it with :meth:`for_account`, start it with
    ``fake = await nursery.start(fake.serve)`` (real HTTP on loopback, the
    dead-man task included), or call :attr:`app` in-process and run
    :meth:`run_dead_man` yourself.

    Attributes:
        accounts: API key -> :class:`FakeAccount`.
        script: outcomes consumed front first: a request-level one (429, 503,
            timeout) by the next ``POST /order(s)`` before authentication; any
            other by the next valid, new order (a batch takes one per order
            while the front is order-level).
        default: the outcome when :attr:`script` is empty or its front does
            not apply (fill in full).
        tick_sizes: token id -> tick size text; others :attr:`default_tick_size`.
        neg_risk: token id -> neg-risk flag (selects the EIP-712 exchange); others false.
        markets: token id -> condition id; others get a stable made-up one.
        min_order_size: shares; a smaller GTC/GTD is refused (0: no minimum).
        dead_man_after: seconds without an accepted heartbeat before the
            dead-man switch cancels an API key's open orders.
        max_clock_skew: seconds ``POLY_TIMESTAMP`` may be off the wall clock.
        terminal_orders_visible: False makes ``GET /data/order/{id}`` answer
            ``null`` for orders no longer LIVE (py-clob-client issue #217
            reports that for a matched FAK).
        hold: seconds at most a held request (``timeout``,
            ``accept_then_drop``) stays open; then 504.
        chain_id: the chain orders are signed for.
        url: ``http://host:port`` once :meth:`serve` listens.
        requests: every request, in order (:class:`OrderRequest`).
        counts: outcome label -> how many (the labels of ``OrderRequest.outcomes``,
            plus ``heartbeat`` and ``dead_man``).
        orders: order id -> :class:`FakeOrder`, every order kept.
        trades: every trade, in order.
        dead_man_log: every firing of the dead-man switch.
    """

    accounts: dict[str, FakeAccount]
    script: deque[Outcome] = attrs.Factory(deque)
    default: Outcome = attrs.Factory(Outcome.fill)
    tick_sizes: dict[str, str] = attrs.Factory(dict)
    default_tick_size: str = "0.01"
    neg_risk: dict[str, bool] = attrs.Factory(dict)
    markets: dict[str, str] = attrs.Factory(dict)
    min_order_size: Decimal = Decimal(0)
    dead_man_after: float = DEAD_MAN_AFTER
    max_clock_skew: float = 30.0
    terminal_orders_visible: bool = True
    hold: float = 3600.0
    chain_id: int = POLYGON
    url: str = ""
    requests: list[OrderRequest] = attrs.Factory(list)
    counts: Counter[str] = attrs.Factory(Counter)
    orders: dict[str, FakeOrder] = attrs.Factory(dict)
    trades: list[FakeTrade] = attrs.Factory(list)
    dead_man_log: list[DeadManFiring] = attrs.Factory(list)
    _heartbeats: dict[str, _Heartbeat] = attrs.field(factory=dict, init=False)
    _dead_man_scope: trio.CancelScope | None = attrs.field(default=None, init=False)
    _arrived: trio.lowlevel.ParkingLot = attrs.field(factory=trio.lowlevel.ParkingLot, init=False)

    @classmethod
    def for_account(cls, credentials: ApiCredentials, address: str, **options: Any) -> FakeClob:
        """A fake venue knowing one API key (``credentials``) of ``address``; ``options`` as attributes."""
        return cls({credentials.api_key: FakeAccount(credentials, address)}, **options)

    def add_account(self, credentials: ApiCredentials, address: str) -> None:
        """Know one more API key, of ``address``."""
        self.accounts[credentials.api_key] = FakeAccount(credentials, address)

    # --- serving ---

    async def serve(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        task_status: trio.TaskStatus[FakeClob] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """
        Serve :attr:`app` on ``host:port`` (0: a free port) with hypercorn and
        run the dead-man switch, until cancelled; ``task_status.started(self)``
        once listening, with :attr:`url` set.

        Raises:
            OSError: the address cannot be bound.
        """
        async with trio.open_nursery() as nursery:
            await nursery.start(self.run_dead_man)
            listen = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            urls: list[str] = await nursery.start(serve_asgi, self.app, listen)
            self.url = urls[0]
            task_status.started(self)

    async def run_dead_man(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """
        The dead-man switch, until cancelled: when an armed API key's deadline
        (its last accepted heartbeat + :attr:`dead_man_after`, on trio's
        clock) passes, cancel every LIVE order of that key, log a
        :class:`DeadManFiring` and disarm it (a heartbeat with id ``""``
        re-arms). Requests also apply overdue firings on arrival.
        """
        task_status.started()
        try:
            while True:
                with trio.CancelScope(deadline=self._next_deadline()) as scope:
                    self._dead_man_scope = scope
                    await trio.sleep_forever()
                self._expire(trio.current_time())
        finally:
            self._dead_man_scope = None

    async def wait_requests(self, count: int = 1, *, path: str | None = None) -> list[OrderRequest]:
        """
        Wait until at least ``count`` requests (to ``path``, when given)
        arrived; returns them, in order. A held request counts on arrival.
        """
        while len(done := [r for r in self.requests if path in (None, r.path)]) < count:
            await self._arrived.park()
        return done

    # --- inspection and test hooks ---

    def open_orders(self, api_key: str | None = None) -> list[FakeOrder]:
        """The LIVE orders (of ``api_key``, when given), in arrival order."""
        return [
            o for o in self.orders.values() if o.status == "LIVE" and api_key in (None, o.api_key)
        ]

    def match(self, order_id: str, size: Decimal | None = None) -> FakeTrade:
        """
        A counterparty takes ``size`` shares (default: all remaining) of a
        LIVE order: a MAKER trade is recorded, the order is MATCHED once full.

        Raises:
            KeyError: no such order.
            ValueError: not LIVE, or ``size`` not in (0, remaining].
        """
        order = self.orders[order_id]
        size = order.remaining if size is None else size
        if order.status != "LIVE" or not 0 < size <= order.remaining:
            raise ValueError(f"cannot match {size} of {order.status} order {order_id}")
        return self._trade(order, size, "MAKER")

    def cancel_all(self, api_key: str | None = None) -> list[str]:
        """Cancel the LIVE orders (of ``api_key``, when given); their ids."""
        return self._cancel([o.order_id for o in self.open_orders(api_key)], api_key)[0]

    # --- the ASGI app ---

    async def app(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The ASGI app (see the module docstring for the routes)."""
        if scope["type"] == "lifespan":
            await answer_lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        raw = await read_body(receive)
        arrived = trio.current_time()
        self._expire(arrived)
        method, path = str(scope["method"]), str(scope["path"])
        query = bytes(scope.get("query_string", b"")).decode("latin-1")
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        answer = self._answer(method, path, query, headers, raw)
        record = OrderRequest(
            method,
            path,
            query,
            _parse(raw),
            0 if answer.hold or answer.close else answer.status,
            answer.outcomes,
            answer.signers,
            answer.order_ids,
            arrived,
        )
        self.requests.append(record)
        self.counts.update(answer.outcomes)
        self._arrived.unpark_all()
        await self._deliver(answer, receive, send)

    async def _deliver(self, answer: _Answer, receive: Receive, send: Send) -> None:
        """Send ``answer``; or hold the request until the client leaves; or cut it."""
        if answer.hold:
            with trio.move_on_after(self.hold):
                while (await receive())["type"] != "http.disconnect":
                    pass
                return
            answer = _Answer(504, {"error": "held past FakeClob.hold"})
        if answer.close:  # the status line, then the app returns: hypercorn closes mid-body
            await send({"type": "http.response.start", "status": 200, "headers": []})
            return
        headers = [(b"content-type", b"application/json")]
        if answer.retry_after is not None:
            headers.append((b"retry-after", f"{answer.retry_after:g}".encode()))
        await send({"type": "http.response.start", "status": answer.status, "headers": headers})
        await send({"type": "http.response.body", "body": orjson.dumps(answer.body)})

    def _answer(
        self, method: str, path: str, query: str, headers: dict[str, str], raw: bytes
    ) -> _Answer:
        """The answer to one request (no checkpoint: atomic with other requests)."""
        params = {k: v[0] for k, v in parse_qs(query).items()}
        public = self._public(method, path, params)
        if public is not None:
            return public
        route = _route(method, path)
        if route is None:
            return _Answer(404, {"error": "not found"})
        if route in ("post_order", "post_orders"):
            if self.script and self.script[0].request_level:
                return self._request_level(self.script.popleft())
            if not self.script and self.default.request_level:  # e.g. down for good
                return self._request_level(self.default)
        account = self._authenticate(method, path, headers, raw)
        if account is None:
            return _Answer(401, {"error": UNAUTHORIZED}, ("unauthorized",))
        body = _parse(raw)
        if raw.strip() and body is None:
            body = _INVALID
        return self._authenticated(route, path, account, body, params)

    def _authenticated(
        self, route: str, path: str, account: FakeAccount, body: Any, params: dict[str, str]
    ) -> _Answer:
        """Dispatch an authenticated request to its route."""
        if route == "post_order":
            placement = self._place(account, body)
            return _single(placement)
        if route == "post_orders":
            return self._place_batch(account, body)
        if route == "get_order":
            return _Answer(200, self._get_order(account, path.rsplit("/", 1)[1]))
        if route == "open_orders":
            rows = [o.to_json() for o in self._open_matching(account, params)]
            return _Answer(200, _page(rows))
        if route == "trades":
            trades = self._trades_matching(account, params)
            if trades is None:
                return _Answer(400, {"error": "Invalid trade params payload"})
            return _Answer(200, _page([t.to_json() for t in trades]))
        if route == "heartbeat":
            return self._heartbeat(account, body)
        return self._cancel_route(route, account, body)

    # --- public routes ---

    def _public(self, method: str, path: str, params: dict[str, str]) -> _Answer | None:
        """The answer of an unauthenticated route, or None if ``path`` is not one."""
        if method != "GET" or path not in ("/version", "/time", "/tick-size", "/neg-risk"):
            return None
        if path == "/version":
            return _Answer(200, {"version": 2})
        if path == "/time":
            return _Answer(200, int(time.time()))
        token_id = params.get("token_id", "")
        if not token_id:
            return _Answer(400, {"error": "Invalid token id"})
        if path == "/tick-size":
            return _Answer(200, {"minimum_tick_size": float(self._tick(token_id))})
        return _Answer(200, {"neg_risk": self.neg_risk.get(token_id, False)})

    def _tick(self, token_id: str) -> str:
        return self.tick_sizes.get(token_id, self.default_tick_size)

    def _market(self, token_id: str) -> str:
        made_up = "0x" + hashlib.sha256(token_id.encode()).hexdigest()
        return self.markets.get(token_id, made_up)

    # --- authentication ---

    def _authenticate(
        self, method: str, path: str, headers: dict[str, str], raw: bytes
    ) -> FakeAccount | None:
        """The account the L2 headers prove, or None (answered 401)."""
        account = self.accounts.get(headers.get("poly_api_key", ""))
        if account is None:
            return None
        passphrase = headers.get("poly_passphrase", "")
        if not hmac.compare_digest(passphrase, account.credentials.api_passphrase):
            return None
        if headers.get("poly_address", "").lower() != account.address.lower():
            return None
        stamp = headers.get("poly_timestamp", "")
        if not stamp.isdigit() or abs(int(stamp) - time.time()) > self.max_clock_skew:
            return None
        try:
            text = raw.decode("utf-8")
            key = base64.urlsafe_b64decode(account.credentials.api_secret)
        except (UnicodeDecodeError, binascii.Error, ValueError):
            return None
        message = (stamp + method + path + text).encode("utf-8")
        expected = base64.urlsafe_b64encode(hmac.new(key, message, hashlib.sha256).digest())
        if not hmac.compare_digest(expected.decode(), headers.get("poly_signature", "")):
            return None
        return account

    # --- placing orders ---

    def _request_level(self, outcome: Outcome) -> _Answer:
        """A 429, 503 or held request, before authentication; nothing kept."""
        kinds = (outcome.kind,)
        if outcome.kind == "rate_limited":
            return _Answer(
                429, {"error": "Too Many Requests"}, kinds, retry_after=outcome.retry_after
            )
        if outcome.kind == "unavailable":
            return _Answer(503, {"error": outcome.reason}, kinds)
        return _Answer(504, {"error": "timeout"}, kinds, hold=True)

    def _place_batch(self, account: FakeAccount, body: Any) -> _Answer:
        """``POST /orders``: each order placed; per-order failures as ``success: false`` items."""
        if not isinstance(body, list) or not body:
            return _Answer(400, {"error": INVALID_PAYLOAD}, ("invalid",))
        if len(body) > MAX_BATCH_ORDERS:
            message = f"Too many orders in payload: {len(body)}, max allowed: {MAX_BATCH_ORDERS}"
            return _Answer(400, {"error": message}, ("invalid",))
        placements = [self._place(account, item) for item in body]
        items = [
            p.answer
            if p.status == 200
            else {**_response(p.order_id, "", "", "", []), "success": False, "errorMsg": p.error}
            for p in placements
        ]
        drop = next((p.drop for p in placements if p.drop is not None), None)
        return _Answer(
            200,
            items,
            tuple(p.outcome for p in placements),
            tuple(p.signer for p in placements),
            tuple(p.order_id for p in placements),
            hold=drop is not None and not drop.close,
            close=drop is not None and drop.close,
        )

    def _place(self, account: FakeAccount, body: Any) -> _Placement:
        """Validate one order body, then apply the next outcome to it."""
        order = body.get("order") if isinstance(body, dict) else None
        if not isinstance(order, dict) or body.get("orderType") not in ORDER_TYPES:
            return _error(400, INVALID_PAYLOAD)
        if body.get("owner") != account.api_key:
            return _error(400, "the order owner has to be the owner of the API KEY")
        if str(order.get("signer", "")).lower() != account.address.lower():
            return _error(400, "the order signer address has to be the address of the API KEY")
        checked = self._verify(order)
        if isinstance(checked, _Placement):
            return checked
        order_id, signer = checked
        refused = self._refusal(body, order, order_id)
        if refused is not None:
            return attrs.evolve(refused, order_id=order_id, signer=signer)
        outcome = self.default
        if self.script and not self.script[0].request_level:
            outcome = self.script.popleft()
        placed = self._apply(account, body, order_id, outcome)
        return attrs.evolve(placed, order_id=order_id, signer=signer)

    def _verify(self, order: dict[str, Any]) -> tuple[str, str] | _Placement:
        """``(order id, recovered signer)`` of a signed order, or its refusal."""
        neg_risk = self.neg_risk.get(str(order.get("tokenId", "")), False)
        try:
            typed = order_typed_data(order, neg_risk=neg_risk, chain_id=self.chain_id)
            message = encode_typed_data(full_message=typed)
            order_id = _digest(message)
        except (KeyError, ValueError, TypeError, AttributeError):
            return _error(400, INVALID_PAYLOAD)
        refused = attrs.evolve(
            _error(400, INVALID_SIGNATURE, "invalid_signature"), order_id=order_id
        )
        if int(order["signatureType"]) == 3:  # POLY_1271: not emulated
            return refused
        try:
            signer = str(Account.recover_message(message, signature=order.get("signature")))
        except (BadSignature, ValidationError, ValueError, TypeError):  # malformed signatures
            return refused
        maker_ok = int(order["signatureType"]) != 0 or str(order["maker"]).lower() == signer.lower()
        if str(order["signer"]).lower() != signer.lower() or not maker_ok:
            return attrs.evolve(refused, signer=signer)
        return order_id, signer

    def _refusal(
        self, body: dict[str, Any], order: dict[str, Any], order_id: str
    ) -> _Placement | None:
        """A valid signed order's refusal for amounts, tick, minimum size or duplication."""
        shares, usdc = _shares_usdc(order)
        if shares <= 0 or usdc <= 0:
            return _error(400, INVALID_PAYLOAD)
        price = usdc / shares
        tick = self._tick(str(order["tokenId"]))
        if price % Decimal(tick) != 0:
            message = f"order {order_id} is invalid. Price ({_text(price)}) breaks minimum tick size rule: {tick}"
            return _error(400, message)
        if body["orderType"] in ("GTC", "GTD") and shares < self.min_order_size:
            message = f"order {order_id} is invalid. Size ({_text(shares)}) lower than the minimum: {_text(self.min_order_size)}"
            return _error(400, message)
        if order_id in self.orders:
            return _error(400, f"order {order_id} is invalid. Duplicated.", "duplicate")
        return None

    def _apply(
        self, account: FakeAccount, body: dict[str, Any], order_id: str, outcome: Outcome
    ) -> _Placement:
        """Apply a scripted ``outcome`` to a valid new order: keep, match, answer."""
        if outcome.kind == "reject":
            return _error(outcome.status, outcome.reason, "reject")
        order_type = body["orderType"]
        kept = self._keep(account, body, order_id)
        filled = (kept.original_size * outcome.fraction).quantize(_CENT, rounding=ROUND_DOWN)
        if filled > 0 and body.get("postOnly") is True:
            del self.orders[order_id]  # refused before matching: not kept
            return _error(400, CROSSES, "crosses")
        if (order_type == "FOK" and filled < kept.original_size) or (
            order_type == "FAK" and filled == 0
        ):
            kept.status = "CANCELED"
            return _error(400, FOK_KILLED if order_type == "FOK" else FAK_KILLED, "killed")
        trade = self._trade(kept, filled, "TAKER") if filled > 0 else None
        if order_type == "FAK" and kept.status == "LIVE":
            kept.status = "CANCELED"  # the rest of a fill-and-kill
        making, taking = _amounts_text(kept.side, filled, kept.price)
        trades = [trade] if trade is not None else []
        answer = _response(order_id, "matched" if trades else "live", making, taking, trades)
        drop = outcome if outcome.kind == "accept_then_drop" else None
        return _Placement(200, answer, outcome.kind, drop=drop)

    def _keep(self, account: FakeAccount, body: dict[str, Any], order_id: str) -> FakeOrder:
        """Record a new LIVE order."""
        order = body["order"]
        shares, usdc = _shares_usdc(order)
        token_id = str(order["tokenId"])
        kept = FakeOrder(
            order_id=order_id,
            api_key=account.api_key,
            maker=str(order["maker"]),
            token_id=token_id,
            market=self._market(token_id),
            side=str(order["side"]),
            price=usdc / shares,
            original_size=shares,
            size_matched=Decimal(0),
            status="LIVE",
            order_type=str(body["orderType"]),
            expiration=str(order.get("expiration", "0")),
            created_at=int(time.time()),
            trade_ids=[],
            body=body,
        )
        self.orders[order_id] = kept
        return kept

    def _trade(self, order: FakeOrder, size: Decimal, trader_side: str) -> FakeTrade:
        """Match ``size`` shares of ``order``; MATCHED once full."""
        trade_id = str(uuid.uuid4())
        trade = FakeTrade(
            trade_id=trade_id,
            order_id=order.order_id,
            api_key=order.api_key,
            maker_address=order.maker,
            market=order.market,
            token_id=order.token_id,
            side=order.side,
            size=size,
            price=order.price,
            match_time=int(time.time()),
            trader_side=trader_side,
            transaction_hash="0x" + hashlib.sha256(trade_id.encode()).hexdigest(),
        )
        self.trades.append(trade)
        order.trade_ids.append(trade_id)
        order.size_matched += size
        if order.remaining == 0:
            order.status = "MATCHED"
        return trade

    # --- queries ---

    def _get_order(self, account: FakeAccount, order_id: str) -> dict[str, Any] | None:
        order = self.orders.get(order_id)
        if order is None or order.api_key != account.api_key:
            return None
        if order.status != "LIVE" and not self.terminal_orders_visible:
            return None
        return order.to_json()

    def _open_matching(self, account: FakeAccount, params: dict[str, str]) -> list[FakeOrder]:
        wanted = {
            "id": params.get("id"),
            "market": params.get("market"),
            "asset_id": params.get("asset_id"),
        }
        return [
            o
            for o in self.open_orders(account.api_key)
            if wanted["id"] in (None, o.order_id)
            and wanted["market"] in (None, o.market)
            and wanted["asset_id"] in (None, o.token_id)
        ]

    def _trades_matching(
        self, account: FakeAccount, params: dict[str, str]
    ) -> list[FakeTrade] | None:
        """
        Trades of the account; ``before``/``after`` bound ``match_time`` (unix s,
        inclusive). None when a bound is not an integer.
        """
        try:
            after = int(params.get("after") or 0)
            before: float = int(params.get("before") or 0) or math.inf
        except ValueError:
            return None
        maker = params.get("maker_address", "").lower()
        return [
            t
            for t in self.trades
            if t.api_key == account.api_key
            and params.get("id") in (None, t.trade_id)
            and params.get("market") in (None, t.market)
            and params.get("asset_id") in (None, t.token_id)
            and maker in ("", t.maker_address.lower())
            and after <= t.match_time <= before
        ]

    # --- cancels ---

    def _cancel_route(self, route: str, account: FakeAccount, body: Any) -> _Answer:
        """``DELETE /order``, ``/orders``, ``/cancel-all``, ``/cancel-market-orders``."""
        if route == "cancel_one":
            if not isinstance(body, dict) or not isinstance(body.get("orderID"), str):
                return _Answer(400, {"error": INVALID_PAYLOAD})
            ids = [body["orderID"]]
        elif route == "cancel_many":
            if not isinstance(body, list) or not all(isinstance(i, str) for i in body):
                return _Answer(400, {"error": INVALID_PAYLOAD})
            ids = list(body)
        elif route == "cancel_all":
            ids = [o.order_id for o in self.open_orders(account.api_key)]
        else:
            if body is not None and not isinstance(body, dict):
                return _Answer(400, {"error": INVALID_PAYLOAD})
            params = {k: str(v) for k, v in (body or {}).items() if k in ("market", "asset_id")}
            ids = [o.order_id for o in self._open_matching(account, params)]
        canceled, not_canceled = self._cancel(ids, account.api_key)
        return _Answer(200, {"canceled": canceled, "not_canceled": not_canceled})

    def _cancel(
        self, order_ids: Iterable[str], api_key: str | None
    ) -> tuple[list[str], dict[str, str]]:
        canceled: list[str] = []
        not_canceled: dict[str, str] = {}
        for order_id in order_ids:
            order = self.orders.get(order_id)
            if order is None or order.status != "LIVE" or api_key not in (None, order.api_key):
                not_canceled[order_id] = NOT_CANCELED
                continue
            order.status = "CANCELED"
            canceled.append(order_id)
        return canceled, not_canceled

    # --- heartbeats and the dead-man switch ---

    def _heartbeat(self, account: FakeAccount, body: Any) -> _Answer:
        """``POST /v1/heartbeats``: arm or refresh the dead-man switch, chaining ids."""
        sent = body.get("heartbeat_id", "") if isinstance(body, dict) else None
        if not isinstance(sent, str):
            return _Answer(400, {"error": INVALID_PAYLOAD})
        armed = self._heartbeats.get(account.api_key)
        expected = armed.expected_id if armed is not None else ""
        if sent != expected:  # a rejected send does not refresh the deadline
            invalid = "Invalid Heartbeat ID"
            return _Answer(400, {"error": invalid, "error_msg": invalid, "heartbeat_id": expected})
        new_id = str(uuid.uuid4())
        deadline = trio.current_time() + self.dead_man_after
        self._heartbeats[account.api_key] = _Heartbeat(new_id, deadline)
        self._reschedule()
        return _Answer(200, {"status": "ok", "heartbeat_id": new_id}, ("heartbeat",))

    def _next_deadline(self) -> float:
        return min((h.deadline for h in self._heartbeats.values()), default=math.inf)

    def _reschedule(self) -> None:
        if self._dead_man_scope is not None:
            self._dead_man_scope.deadline = self._next_deadline()

    def _expire(self, now: float) -> None:
        """Fire the dead-man switch of every key whose deadline passed."""
        for api_key, armed in list(self._heartbeats.items()):
            if armed.deadline <= now:
                del self._heartbeats[api_key]
                canceled = self.cancel_all(api_key)
                self.dead_man_log.append(DeadManFiring(now, api_key, tuple(canceled)))
                self.counts["dead_man"] += 1
        self._reschedule()


_INVALID = object()
"""A request body that is not JSON."""

_ROUTES: Final = {
    ("POST", "/order"): "post_order",
    ("POST", "/orders"): "post_orders",
    ("GET", "/data/orders"): "open_orders",
    ("GET", "/data/trades"): "trades",
    ("GET", "/trades"): "trades",
    ("DELETE", "/order"): "cancel_one",
    ("DELETE", "/orders"): "cancel_many",
    ("DELETE", "/cancel-all"): "cancel_all",
    ("DELETE", "/cancel-market-orders"): "cancel_market",
    ("POST", "/v1/heartbeats"): "heartbeat",
    ("POST", "/heartbeats"): "heartbeat",
}


def _route(method: str, path: str) -> str | None:
    """The route name of an authenticated request, or None (404)."""
    if method == "GET" and path.startswith(("/data/order/", "/order/")) and path.count("/") <= 3:
        return "get_order"
    return _ROUTES.get((method, path.rstrip("/") or "/"))


def _single(placement: _Placement) -> _Answer:
    """The ``POST /order`` answer of one placement."""
    drop = placement.drop
    return _Answer(
        placement.status,
        placement.answer,
        (placement.outcome,),
        (placement.signer,),
        (placement.order_id,),
        hold=drop is not None and not drop.close,
        close=drop is not None and drop.close,
    )


def _response(
    order_id: str, status: str, making: str, taking: str, trades: list[FakeTrade]
) -> dict[str, Any]:
    """The venue's post-order response object (docs/execution.md)."""
    return {
        "success": True,
        "errorMsg": "",
        "orderID": order_id,
        "status": status,
        "makingAmount": making,
        "takingAmount": taking,
        "tradeIDs": [t.trade_id for t in trades],
        "transactionsHashes": [t.transaction_hash for t in trades],
    }


def _page(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One (the last) page of a paginated answer."""
    return {"limit": 500, "count": len(rows), "next_cursor": END_CURSOR, "data": rows}


def _shares_usdc(order: dict[str, Any]) -> tuple[Decimal, Decimal]:
    """Shares and USDC of a signed order (its amounts are 1e-6 units)."""
    maker, taker = Decimal(int(order["makerAmount"])), Decimal(int(order["takerAmount"]))
    usdc, shares = (maker, taker) if order["side"] == "BUY" else (taker, maker)
    return shares / _MICRO, usdc / _MICRO


def _amounts_text(side: str, shares: Decimal, price: Decimal) -> tuple[str, str]:
    """``makingAmount``/``takingAmount`` of ``shares`` matched at ``price``; ``""`` when none."""
    if shares == 0:
        return "", ""
    usdc = shares * price
    return (_text(usdc), _text(shares)) if side == "BUY" else (_text(shares), _text(usdc))


def _digest(message: SignableMessage) -> str:
    """The EIP-712 digest of an encoded typed-data message, ``0x`` + hex (the orderID)."""
    return "0x" + keccak(b"\x19" + message.version + message.header + message.body).hex()


def _text(value: Decimal) -> str:
    """``value`` as a plain decimal string without trailing zeros (``"5.8881"``, ``"10"``)."""
    text = format(value, "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def _parse(raw: bytes) -> Any:
    """The JSON of a body; None when empty or not JSON."""
    if not raw.strip():
        return None
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
