"""
The CLOB REST API, answered from the tape.

:class:`ClobRest` is an ASGI app answering ``GET /book``, ``POST /books``,
``POST /prices`` and ``POST /midpoints`` like the CLOB (docs/protocol.md,
"CLOB REST") from the same books the WebSocket snapshots come from,
synthetic copies included, so the daemon's REST resync and HTTP fallback
have a peer consistent with the feed. A REST book has the WebSocket
snapshot's fields plus ``min_order_size`` ``"5"`` and ``neg_risk`` false, and
the same ``hash`` (docs/protocol.md, "Book hash"). Each request is recorded
(:class:`RestRequest`); ``fail_next`` injects error statuses (429 with
``Retry-After: 0``, docs/protocol.md, "Rate limits").
"""

from __future__ import annotations

import time
from collections.abc import Callable
from decimal import Decimal
from typing import Any
from urllib.parse import parse_qs

import attrs
import orjson
import trio

from polystream.ops.health import Receive, Scope, Send, answer_lifespan
from polystream.replay.books import Event
from polystream.replay.stats import ReplayStats

__all__ = ["MAX_BOOKS_PER_REQUEST", "ClobRest", "RestRequest", "read_body", "rest_book"]

MAX_BOOKS_PER_REQUEST = 500
"""Most items in one ``POST /books`` body; more is answered 400 (docs/protocol.md, "CLOB REST")."""

_INVALID = object()
"""A request body that is not JSON."""

_Answer = tuple[int, Any]
"""An HTTP status and the JSON value answered."""


@attrs.frozen
class RestRequest:
    """
    One HTTP request the CLOB REST app answered (:attr:`ReplayServer.rest_requests`).

    Attributes:
        method: ``GET``, ``POST``, ...
        path: e.g. ``/books``.
        query: the raw query string (``token_id=123``; ``""`` when none).
        body: the JSON body, parsed (None when empty or not JSON).
        at: ``time.monotonic()`` when it was answered.
        status: the HTTP status answered (an injected one included).
    """

    method: str
    path: str
    query: str
    body: Any
    at: float
    status: int


def rest_book(snapshot: Event) -> Event:
    """
    The CLOB's ``GET /book`` answer for the book of a WebSocket ``snapshot``
    (:meth:`Tape.snapshot`).

    Shape (docs/protocol.md, "CLOB REST"): ``{market, asset_id, timestamp (ms
    string), hash, bids (ascending price), asks (descending price),
    min_order_size "5", tick_size, neg_risk false, last_trade_price}``;
    ``hash`` is :func:`book_hash` of those fields, so it equals the
    snapshot's.
    """
    return {
        "market": snapshot["market"],
        "asset_id": snapshot["asset_id"],
        "timestamp": snapshot["timestamp"],
        "hash": snapshot["hash"],
        "bids": snapshot["bids"],
        "asks": snapshot["asks"],
        "min_order_size": "5",
        "tick_size": snapshot["tick_size"],
        "neg_risk": False,
        "last_trade_price": snapshot["last_trade_price"],
    }


@attrs.define(eq=False)
class ClobRest:
    """
    An ASGI app answering like the CLOB REST API from a server's books.

    Attributes:
        snapshot: asset id -> its current ``book`` snapshot (a synthetic
            copy's from its original), None for an unknown asset.
        top: asset id -> best bid and ask price texts, None for an empty side.
        stats: the server's counters (``rest_requests``).
        requests: every request answered, in order.
        fail_next: HTTP statuses the next requests are answered with, one
            each, popped from the front (body ``{"error": "injected"}``).
    """

    snapshot: Callable[[str], Event | None]
    top: Callable[[str], tuple[str | None, str | None]]
    stats: ReplayStats
    requests: list[RestRequest] = attrs.Factory(list)
    fail_next: list[int] = attrs.Factory(list)
    _arrived: trio.lowlevel.ParkingLot = attrs.field(
        factory=trio.lowlevel.ParkingLot, alias="_arrived"
    )

    def book(self, token_id: str) -> Event | None:
        """The ``GET /book`` answer for ``token_id`` (:func:`rest_book`), None if unknown."""
        snapshot = self.snapshot(token_id)
        return None if snapshot is None else rest_book(snapshot)

    async def app(self, scope: Scope, receive: Receive, send: Send) -> None:
        """
        The ASGI app (serve it with :func:`polystream.ops.health.serve_asgi`):

        * ``GET /book?token_id=T``: :meth:`book`; 404 ``{"error": ...}``
          for an unknown token, 400 without ``token_id``;
        * ``POST /books`` ``[{"token_id": T}, ...]`` (at most
          :data:`MAX_BOOKS_PER_REQUEST` items, else 400): a JSON array of those
          books, in request order, unknown tokens left out;
        * ``POST /prices`` ``[{"token_id": T, "side": "BUY" | "SELL"}, ...]``:
          ``{T: {"BUY": best bid, "SELL": best ask}}``, prices as strings; an
          empty side, and a token with neither, are left out;
        * ``POST /midpoints`` ``[{"token_id": T}, ...]``: ``{T: "0.455"}``, the
          mean of best bid and ask; tokens without both sides left out.

        A body that is not a JSON array of such objects is answered 400, an
        unknown path 404, a wrong method 405; every answer is JSON. Each request
        is recorded (:attr:`requests`); :attr:`fail_next` injects failures.
        """
        if scope["type"] == "lifespan":
            await answer_lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        body, parsed = _parse_json(await read_body(receive))
        method, path = str(scope["method"]), str(scope["path"])
        query = bytes(scope.get("query_string", b"")).decode("latin-1")
        if self.fail_next:
            status, answer = self.fail_next.pop(0), {"error": "injected"}
        else:
            status, answer = self._answer(method, path, query, body if parsed else _INVALID)
        self.requests.append(RestRequest(method, path, query, body, time.monotonic(), status))
        self.stats.rest_requests += 1
        self._arrived.unpark_all()
        await _respond(send, status, answer)

    async def wait_requests(self, count: int = 1, *, path: str | None = None) -> list[RestRequest]:
        """
        Wait until at least ``count`` requests (to ``path``, when given) were
        answered; returns those requests, in order.
        """
        while len(done := [r for r in self.requests if path in (None, r.path)]) < count:
            await self._arrived.park()
        return done

    def _answer(self, method: str, path: str, query: str, body: Any) -> _Answer:
        """Status and JSON answer of one request (``body`` is :data:`_INVALID` if not JSON)."""
        routes = {
            "/book": ("GET", self._get_book),
            "/books": ("POST", self._post_books),
            "/prices": ("POST", self._post_prices),
            "/midpoints": ("POST", self._post_midpoints),
        }
        route = routes.get(path.rstrip("/") or "/")
        if route is None:
            return 404, {"error": "not found"}
        allowed, handler = route
        if method != allowed:
            return 405, {"error": f"method not allowed: {method} {path}"}
        return handler(query, body)

    def _get_book(self, query: str, body: Any) -> _Answer:
        token_id = parse_qs(query).get("token_id", [""])[0]
        if not token_id:
            return 400, {"error": "token_id is required"}
        book = self.book(token_id)
        if book is None:
            return 404, {"error": "No orderbook exists for the requested token id"}
        return 200, book

    def _post_books(self, query: str, body: Any) -> _Answer:
        items = _rest_items(body)
        if isinstance(items, str):
            return 400, {"error": items}
        if len(items) > MAX_BOOKS_PER_REQUEST:
            return 400, {"error": f"too many token ids: {len(items)} > {MAX_BOOKS_PER_REQUEST}"}
        books = (self.book(item["token_id"]) for item in items)
        return 200, [book for book in books if book is not None]

    def _post_prices(self, query: str, body: Any) -> _Answer:
        items = _rest_items(body, sides=True)
        if isinstance(items, str):
            return 400, {"error": items}
        answer: dict[str, dict[str, str]] = {}
        for item in items:
            token_id, side = item["token_id"], item["side"]
            bid, ask = self.top(token_id)
            price = bid if side == "BUY" else ask
            if price is not None:
                answer.setdefault(token_id, {})[side] = price
        return 200, answer

    def _post_midpoints(self, query: str, body: Any) -> _Answer:
        items = _rest_items(body)
        if isinstance(items, str):
            return 400, {"error": items}
        answer: dict[str, str] = {}
        for item in items:
            bid, ask = self.top(item["token_id"])
            if bid is not None and ask is not None:
                answer[item["token_id"]] = _decimal_text((Decimal(bid) + Decimal(ask)) / 2)
        return 200, answer


async def _respond(send: Send, status: int, answer: Any) -> None:
    """Send a JSON answer; a 429 carries ``Retry-After: 0``."""
    headers = [(b"content-type", b"application/json")]
    if status == 429:
        headers.append((b"retry-after", b"0"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": orjson.dumps(answer)})


async def read_body(receive: Receive) -> bytes:
    """The whole body of an ASGI HTTP request."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break  # http.disconnect
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            break
    return b"".join(chunks)


def _parse_json(data: bytes) -> tuple[Any, bool]:
    """``(value, True)``, or ``(None, True)`` for an empty body, ``(None, False)`` if not JSON."""
    if not data.strip():
        return None, True
    try:
        return orjson.loads(data), True
    except orjson.JSONDecodeError:
        return None, False


def _rest_items(body: Any, *, sides: bool = False) -> list[dict[str, str]] | str:
    """
    The items of a CLOB batch body (``[{"token_id": ...}, ...]``, with
    ``side`` ``BUY`` / ``SELL`` when ``sides``), or what is wrong with it.
    """
    if body is _INVALID:
        return "Invalid payload: not JSON"
    if not isinstance(body, list):
        return "Invalid payload: expected a JSON array of objects"
    items: list[dict[str, str]] = []
    for item in body:
        token_id = item.get("token_id") if isinstance(item, dict) else None
        if not isinstance(token_id, str) or not token_id:
            return "Invalid payload: every item needs a token_id string"
        if sides:
            side = item.get("side")
            if side not in ("BUY", "SELL"):
                return f"Invalid payload: side must be BUY or SELL, got {side!r}"
            items.append({"token_id": token_id, "side": side})
        else:
            items.append({"token_id": token_id})
    return items


def _decimal_text(value: Decimal) -> str:
    """``value`` as a plain decimal string without trailing zeros (``"0.455"``, ``"0.5"``)."""
    text = format(value, "f")
    return text.rstrip("0").rstrip(".") if "." in text else text
