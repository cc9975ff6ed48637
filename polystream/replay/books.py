"""
The replay server's books, and the venue's book hash.

One L2 book per asset, kept from the events applied so far: ``book``
replaces the levels, ``price_change`` sets one level (size ``"0"`` removes
it; the current ``price_changes[]`` shape and the legacy ``changes[]`` one),
``last_trade_price`` and ``tick_size_change`` set those fields
(docs/protocol.md, "Server messages"). They are the server's own, apart from
the daemon's (:mod:`polystream.book`), so a test compares two models.

A snapshot is the ``book`` event the venue sends on subscribe: bids by
ascending and asks by descending price, ``tick_size`` and
``last_trade_price``, and the venue's ``hash`` (:func:`book_hash`;
docs/protocol.md, "Book hash"). Copies of one book under other labels share
the hash preimage after the labels (:func:`hash_tail`), so a copy costs one
SHA-1 (:func:`hash_with_tail`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from decimal import Decimal, InvalidOperation
from typing import Any

import attrs
import orjson

from polystream.errors import ReplayError

__all__ = [
    "Event",
    "Level",
    "ReplayBook",
    "ReplayBooks",
    "book_hash",
    "hash_tail",
    "hash_with_tail",
]

Event = dict[str, Any]
"""One market-channel event object, as parsed from JSON."""

Level = Mapping[str, str]
"""One book level as sent: ``{"price": "0.45", "size": "100"}`` (decimal strings)."""

_TICK_SIZES = {2: "0.01", 3: "0.001", 4: "0.0001"}


def book_hash(
    market: str,
    asset_id: str,
    timestamp: str,
    bids: Iterable[Level],
    asks: Iterable[Level],
    tick_size: str,
    last_trade_price: str,
    min_order_size: str = "5",
    neg_risk: bool = False,
) -> str:
    """
    The venue's ``hash`` of a book snapshot: 40 lower-case hex digits (no ``0x``).

    SHA-1 of the compact JSON (no spaces, UTF-8, this key order)
    ``{"market", "asset_id", "timestamp", "hash": "", "bids", "asks",
    "min_order_size", "tick_size", "neg_risk", "last_trade_price"}``, each
    level ``{"price", "size"}`` (strings) in the order given: for a snapshot
    as sent, bids by ascending and asks by descending price. ``timestamp`` is
    unix milliseconds as a string; ``last_trade_price`` may be ``""``. The
    WebSocket ``book`` carries neither ``min_order_size`` nor ``neg_risk``: the
    venue hashes it with ``"5"`` and ``false``, the defaults; a REST book
    (``GET /book``) carries both.

    Source: py-clob-client-v2 ``utilities.py``
    ``generate_orderbook_summary_hash`` (the Go server's struct order);
    nautilus_trader ``verify_book_snapshot_hash``; docs/protocol.md, "Book
    hash". It reproduces the real snapshots of ``enricobignozzi-2026-09-24``
    and nautilus ``ws_book_snapshot_captured.json``.
    A pure function: no state, no I/O.
    """
    tail = hash_tail(bids, asks, tick_size, last_trade_price, min_order_size, neg_risk)
    return hash_with_tail(market, asset_id, timestamp, tail)


def hash_tail(
    bids: Iterable[Level],
    asks: Iterable[Level],
    tick_size: str,
    last_trade_price: str,
    min_order_size: str = "5",
    neg_risk: bool = False,
) -> bytes:
    """The part of :func:`book_hash`'s preimage after ``"hash":""``, from ``,"bids"`` on."""
    payload = {
        "bids": [{"price": level["price"], "size": level["size"]} for level in bids],
        "asks": [{"price": level["price"], "size": level["size"]} for level in asks],
        "min_order_size": min_order_size,
        "tick_size": tick_size,
        "neg_risk": neg_risk,
        "last_trade_price": last_trade_price,
    }
    return b"," + orjson.dumps(payload)[1:]


def hash_with_tail(market: str, asset_id: str, timestamp: str, tail: bytes) -> str:
    """:func:`book_hash` from the labels and a :func:`hash_tail` (shared by copies of a book)."""
    head = orjson.dumps(
        {"market": market, "asset_id": asset_id, "timestamp": timestamp, "hash": ""}
    )
    return hashlib.sha1(head[:-1] + tail).hexdigest()


@attrs.define
class ReplayBook:
    """
    One asset's L2 book: price -> (price text, size text) per side.

    Attributes:
        market: the asset's condition id (``""`` when its events name none).
        bids, asks: the levels, keyed by price; texts kept as received.
        tick_size: the recorded (or changed) tick, None when never given.
        last_trade_price: the last trade's price text, ``""`` before any trade.
        timestamp: the ``timestamp`` (ms string) of the last event that
            changed the levels, None before any.
    """

    market: str
    bids: dict[Decimal, tuple[str, str]] = attrs.Factory(dict)
    asks: dict[Decimal, tuple[str, str]] = attrs.Factory(dict)
    tick_size: str | None = None
    last_trade_price: str = ""
    timestamp: str | None = None

    def replace(self, event: Event) -> None:
        """Take the levels (and ``tick_size`` / ``last_trade_price``, if set) of a ``book``."""
        self.bids = _levels(event.get("bids", event.get("buys")))
        self.asks = _levels(event.get("asks", event.get("sells")))
        tick = event.get("tick_size")
        if isinstance(tick, str) and tick:
            self.tick_size = tick
        last = event.get("last_trade_price")
        if isinstance(last, str) and last:
            self.last_trade_price = last

    def change(self, price: str, size: str, side: str) -> None:
        """Set one level: ``side`` ``BUY`` (any case) a bid, else an ask; size 0 removes it."""
        levels = self.bids if side.upper() == "BUY" else self.asks
        key = Decimal(price)
        if Decimal(size) == 0:
            levels.pop(key, None)
        else:
            levels[key] = (price, size)

    def snapshot(self, asset_id: str, timestamp: str) -> tuple[Event, bytes]:
        """
        The book as the real server's initial dump shows it (bids ascending, asks
        descending), labelled ``asset_id``, stamped with its own ``timestamp``
        or else ``timestamp``, with the venue's hash (:func:`book_hash`); and
        that hash's :func:`hash_tail`, which copies of the book under other
        labels share.
        """
        bids = [{"price": p, "size": s} for _, (p, s) in sorted(self.bids.items())]
        asks = [{"price": p, "size": s} for _, (p, s) in sorted(self.asks.items(), reverse=True)]
        stamp = self.timestamp or timestamp
        tick_size = self.current_tick_size()
        tail = hash_tail(bids, asks, tick_size, self.last_trade_price)
        event = {
            "market": self.market,
            "asset_id": asset_id,
            "timestamp": stamp,
            "hash": hash_with_tail(self.market, asset_id, stamp, tail),
            "bids": bids,
            "asks": asks,
            "tick_size": tick_size,
            "event_type": "book",
            "last_trade_price": self.last_trade_price,
        }
        return event, tail

    def top(self) -> tuple[Decimal | None, Decimal | None]:
        """Best bid (highest) and best ask (lowest) price; None for an empty side."""
        return (max(self.bids) if self.bids else None, min(self.asks) if self.asks else None)

    def current_tick_size(self) -> str:
        """The recorded (or changed) tick size, else one inferred from the prices."""
        return self.tick_size or self._inferred_tick_size()

    def _inferred_tick_size(self) -> str:
        places = 2
        for key in (*self.bids, *self.asks):
            exponent = key.as_tuple().exponent
            if isinstance(exponent, int):
                places = max(places, -exponent)
        return _TICK_SIZES.get(min(places, 4), "0.01")


def _levels(raw: Any) -> dict[Decimal, tuple[str, str]]:
    levels: dict[Decimal, tuple[str, str]] = {}
    for level in raw or ():
        price, size = level["price"], level["size"]
        if Decimal(size) != 0:
            levels[Decimal(price)] = (str(price), str(size))
    return levels


@attrs.define
class ReplayBooks:
    """Books of all assets, kept from the events applied so far (asset id -> book)."""

    books: dict[str, ReplayBook] = attrs.Factory(dict)

    def book(self, asset_id: str, market: Any) -> ReplayBook:
        """The book of ``asset_id``, created empty (under ``market``) if new."""
        book = self.books.get(asset_id)
        if book is None:
            book = self.books[asset_id] = ReplayBook(market=str(market or ""))
        return book

    def apply(self, events: Iterable[Event]) -> None:
        """
        Apply the events of one frame, in order; other event types change nothing.

        Raises:
            KeyError, TypeError, ValueError, AttributeError, InvalidOperation:
                an event lacks a field or holds a value a book cannot take.
        """
        for event in events:
            kind = event["event_type"]
            if kind == "book":
                book = self.book(event["asset_id"], event.get("market"))
                book.replace(event)
                book.timestamp = event.get("timestamp", book.timestamp)
            elif kind == "price_change":
                self._price_change(event)
            elif kind == "last_trade_price":
                book = self.book(event["asset_id"], event.get("market"))
                book.last_trade_price = str(event["price"])
            elif kind == "tick_size_change":
                book = self.book(event["asset_id"], event.get("market"))
                book.tick_size = str(event["new_tick_size"])
            elif kind == "best_bid_ask":
                self.book(event["asset_id"], event.get("market"))

    def _price_change(self, event: Event) -> None:
        stamp = event.get("timestamp")
        changes = event.get("price_changes")
        if changes is None:  # legacy shape: one asset, ``changes[]``
            entries = [{"asset_id": event["asset_id"], **c} for c in event["changes"]]
        else:
            entries = changes
        for entry in entries:
            book = self.book(entry["asset_id"], event.get("market"))
            book.change(entry["price"], entry["size"], entry["side"])
            if stamp is not None:
                book.timestamp = stamp

    def apply_checked(self, events: Iterable[Event], source: str) -> None:
        """
        :meth:`apply`, for loading a capture.

        Raises:
            ReplayError: an event cannot be applied (named by ``source``, ``path:line``).
        """
        try:
            self.apply(events)
        except (KeyError, TypeError, ValueError, AttributeError, InvalidOperation) as exc:
            reason = f"{type(exc).__name__}: {exc}"
            message = f"{source}: event cannot be applied to a book: {reason}"
            raise ReplayError(message) from exc
