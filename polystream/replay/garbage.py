"""
The bad-input catalogue: frames a correct client refuses and counts.

Each kind (:data:`GARBAGE_KINDS`) is built from the tape's current state
about one asset a client holds, so it is bad in exactly one way: invalid
JSON, a JSON value that is no event, a binary frame, an unknown
``event_type``, a missing or mistyped field, a price outside [0, 1]
(docs/protocol.md, "Server messages"), a NaN or negative size, a price
change that crosses the book (followed by the venue's corrective
snapshot), an event older than the asset's last one, an asset nobody
subscribed, and a text frame that is not UTF-8 (RFC 6455, section 8.1).
The value of each kind is the counter a correct client bumps: a
``parse_errors`` kind of polystream (:data:`polystream.errors.BAD_INPUT_KINDS`)
or ``foreign_events``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import partial

import attrs
import orjson

from polystream.errors import ReplayError
from polystream.replay.books import Event, ReplayBook
from polystream.replay.capture import encode
from polystream.replay.tape import Tape
from polystream.replay.wire import RawFrame, ws_frame

__all__ = ["FOREIGN_ASSET", "GARBAGE_KINDS", "Garbage", "chosen_kinds", "garbage_frames"]

GARBAGE_KINDS: dict[str, str] = {
    "truncated_json": "invalid_json",
    "not_an_object": "not_an_object",
    "binary_frame": "binary_frame",
    "unknown_event_type": "unknown_event_type",
    "missing_field": "missing_field",
    "bad_field": "bad_field",
    "price_out_of_range": "price_out_of_range",
    "nan_size": "bad_number",
    "negative_size": "negative_size",
    "crossed_book": "crossed_book",
    "stale_event": "stale_event",
    "foreign_asset": "foreign_events",
    "not_utf8_text": "not_utf8",
}
"""
The bad-input catalogue: garbage kind -> the counter a correct client bumps
(a ``parse_errors`` kind of polystream, or ``foreign_events``).
"""

FOREIGN_ASSET = "1" * 77
"""An asset id no capture has: the ``foreign_asset`` garbage names it."""

_Sent = tuple[str | bytes | RawFrame, ...]
_PriceChange = Callable[[str, str, str, int], str]
"""``(price, size, side, timestamp_ms)`` -> the text of a one-entry ``price_change``."""


@attrs.frozen
class Garbage:
    """
    One bad input as sent: ``frames`` go out back to back between two tape frames.

    Attributes:
        kind: a key of :data:`GARBAGE_KINDS`.
        counts_as: its value: what a client should count it under.
        asset_id: the asset it names ("" when none).
        frames: text (``str``), binary (``bytes``) or raw wire bytes
            (:class:`RawFrame`). ``crossed_book`` is a crossed price change
            followed by the venue's corrective ``book`` snapshot of that
            asset (the tape's current book), so a client that repairs the
            crossed book ends in the true state; the others change nothing
            in a client that refuses them.
    """

    kind: str
    counts_as: str
    asset_id: str
    frames: _Sent


def chosen_kinds(kinds: Iterable[str] | None) -> list[str]:
    """
    ``kinds`` as a list, or by default every kind but ``not_utf8_text``.

    Raises:
        ReplayError: a kind not in :data:`GARBAGE_KINDS`.
    """
    chosen = list(GARBAGE_KINDS if kinds is None else kinds)
    if kinds is None:
        chosen.remove("not_utf8_text")
    unknown = [k for k in chosen if k not in GARBAGE_KINDS]
    if unknown:
        raise ReplayError(f"garbage: unknown kinds {unknown}")
    return chosen


def garbage_frames(
    tape: Tape, asset_ids: Iterable[str], kinds: Iterable[str] | None = None
) -> list[Garbage]:
    """
    One :class:`Garbage` of each of ``kinds`` (default: every kind but
    ``not_utf8_text``) about the first of ``asset_ids`` (sorted) with a
    two-sided book on the tape and a timestamp; built from the tape's
    current state, so ``stale_event`` is older than the asset's last event
    and ``crossed_book`` crosses its current best price.

    ``not_utf8_text`` is a *text* frame whose payload is not UTF-8: wsproto
    cannot send it, so it is a :class:`RawFrame`. A conforming WebSocket
    client fails the connection with 1007 (RFC 6455, section 8.1) rather
    than handing the frame to the application.

    Raises:
        ReplayError: an unknown kind, or no such asset among ``asset_ids``.
    """
    chosen = chosen_kinds(kinds)
    asset, book = _garbage_asset(tape, asset_ids)
    stamp = int(book.timestamp or 0)
    change: _PriceChange = partial(_price_change, book.market, asset)
    built = {
        **_bad_trades(_trade(asset, book, stamp)),
        **_bad_changes(change, book, stamp, encode(tape.snapshot(asset))),
        "not_utf8_text": (RawFrame(ws_frame(b'{"event_type": "book", "asset_id": "\xff\xfe"}')),),
    }
    return [Garbage(kind, GARBAGE_KINDS[kind], asset, built[kind]) for kind in chosen]


def _garbage_asset(tape: Tape, asset_ids: Iterable[str]) -> tuple[str, ReplayBook]:
    for asset_id in sorted(asset_ids):
        book = tape.book(asset_id)
        if book is not None and book.bids and book.asks and book.timestamp:
            return asset_id, book
    raise ReplayError("garbage: no asset with a two-sided, timestamped book among those given")


def _trade(asset: str, book: ReplayBook, stamp: int) -> Event:
    """A plausible ``last_trade_price`` of ``asset``, the base the bad trades spoil."""
    return {
        "event_type": "last_trade_price",
        "asset_id": asset,
        "market": book.market,
        "price": book.last_trade_price or "0.5",
        "size": "1",
        "side": "BUY",
        "timestamp": str(stamp),
    }


def _bad_trades(trade: Event) -> dict[str, _Sent]:
    """The kinds that spoil one field of ``trade``, or the whole frame."""
    return {
        "not_an_object": ("[42]",),
        "binary_frame": (orjson.dumps(trade),),
        "unknown_event_type": (encode({**trade, "event_type": "price_surprise"}),),
        "missing_field": (encode({k: v for k, v in trade.items() if k != "price"}),),
        "bad_field": (encode({**trade, "asset_id": 12345}),),
        "price_out_of_range": (encode({**trade, "price": "1.5"}),),
        "foreign_asset": (encode({**trade, "asset_id": FOREIGN_ASSET}),),
    }


def _bad_changes(
    change: _PriceChange, book: ReplayBook, stamp: int, snapshot: str
) -> dict[str, _Sent]:
    """
    The kinds that are a bad price change of the asset of ``book``;
    ``snapshot`` (its current ``book``) repairs the crossed one.
    """
    low_bid = "0.001"
    bid_text = book.bids[max(book.bids)][0]
    ask_text = book.asks[min(book.asks)][0]
    return {
        "truncated_json": (change(low_bid, "5", "BUY", stamp)[:40],),
        "nan_size": (change(low_bid, "NaN", "BUY", stamp),),
        "negative_size": (change(low_bid, "-5", "BUY", stamp),),
        "crossed_book": (change(ask_text, "1", "BUY", stamp), snapshot),
        # removes the best bid, if it were applied
        "stale_event": (change(bid_text, "0", "BUY", max(stamp - 60_000, 1)),),
    }


def _price_change(market: str, asset: str, price: str, size: str, side: str, timestamp: int) -> str:
    """The text of a ``price_change`` with one entry."""
    entry = {"asset_id": asset, "price": price, "size": size, "side": side}
    return encode(
        {
            "event_type": "price_change",
            "market": market,
            "timestamp": str(timestamp),
            "price_changes": [entry],
        }
    )
