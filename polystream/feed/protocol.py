"""
The Polymarket market channel: typed events, the frame parser, and the
messages a client sends.

Facts used here (docs/protocol.md, "Subscribing", "Heartbeat", "Server messages"; AsyncAPI spec
at https://docs.polymarket.com/api-reference/wss/market):

* A text frame is one JSON object or a JSON array of objects, each with
  ``event_type``: ``book``, ``price_change``, ``last_trade_price``,
  ``tick_size_change``, and with ``custom_feature_enabled`` also
  ``best_bid_ask``, ``new_market`` and ``market_resolved``.
* Numbers arrive as strings (``".48"``); timestamps are Unix milliseconds as
  strings. Prices are probabilities in [0, 1] and are kept as ``Decimal``.
* ``PONG``, ``INVALID OPERATION`` and ``NO NEW ASSETS`` are plain text.
* Legacy shapes (before 2025-09-15) are accepted: ``price_change`` with a
  top-level ``asset_id`` and ``changes[]``; ``book`` with ``buys``/``sells``;
  objects without ``event_type`` whose shape is unambiguous (recorded in
  tests/data/real/aaimek-polymarket-data-collection/book_message_example.json
  and nautilus_trader/rust_test_data/ws_quotes.json).
"""

from __future__ import annotations

import hashlib
import sys
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from decimal import Decimal
from typing import Any, Literal, overload

import attrs
import orjson

from polystream.errors import MalformedFrame
from polystream.numbers import (
    NotANumber,
    OutOfRange,
    ask_or_none,
    bid_or_none,
    finite_decimal,
    probability,
)

__all__ = [
    "CONTROL_FRAMES",
    "KNOWN_EVENT_TYPES",
    "BestBidAsk",
    "BookSnapshot",
    "Control",
    "FeedEvent",
    "FrameParser",
    "Integrity",
    "LastTradePrice",
    "Level",
    "LevelChange",
    "Levels",
    "MarketResolved",
    "NewMarket",
    "ParsedFrame",
    "PriceChange",
    "Problems",
    "Side",
    "TickSizeChange",
    "book_hash",
    "chunk_asset_ids",
    "encode_operation",
    "encode_subscribe",
    "parse_frame",
]

Side = Literal["BUY", "SELL"]
Integrity = Literal["verified", "mismatched", "unverifiable"]
"""Outcome of a ``book`` hash check (docs/protocol.md, "Book hash")."""

CONTROL_FRAMES = frozenset({"PONG", "INVALID OPERATION", "NO NEW ASSETS"})
"""Non-JSON text frames the server sends (docs/protocol.md, "Heartbeat")."""

_ZERO = Decimal(0)
_ONE = Decimal(1)


@attrs.frozen(slots=True)
class Level:
    """One aggregated price level: ``price`` in [0, 1], ``size`` in shares."""

    price: Decimal
    size: Decimal


class Levels(Sequence[Level]):
    """
    The levels of one side of a book, in the order received, kept as two
    parallel tuples: ``prices`` (probabilities in [0, 1]) and ``sizes``
    (shares). A :class:`Level` is made only when one is asked for (indexing,
    iteration): the daemon's book path reads the two tuples and makes none
    (an initial dump holds millions of levels).

    Equal to another ``Levels`` with the same levels, and to a tuple of the
    same :class:`Level` objects; ``+`` gives a tuple of levels.
    """

    __slots__ = ("prices", "sizes")

    prices: tuple[Decimal, ...]
    sizes: tuple[Decimal, ...]

    def __init__(self, prices: Sequence[Decimal] = (), sizes: Sequence[Decimal] = ()) -> None:
        if len(prices) != len(sizes):
            raise ValueError(f"{len(prices)} prices and {len(sizes)} sizes")
        self.prices = tuple(prices)
        self.sizes = tuple(sizes)

    @classmethod
    def of(cls, levels: Iterable[Level]) -> Levels:
        """``levels`` as :class:`Levels` (itself when it is one already)."""
        if isinstance(levels, Levels):
            return levels
        pairs = [(lv.price, lv.size) for lv in levels]
        return cls([p for p, _ in pairs], [s for _, s in pairs])

    def __len__(self) -> int:
        return len(self.prices)

    @overload
    def __getitem__(self, index: int) -> Level: ...

    @overload
    def __getitem__(self, index: slice) -> Levels: ...

    def __getitem__(self, index: int | slice) -> Level | Levels:
        if isinstance(index, slice):
            return Levels(self.prices[index], self.sizes[index])
        return Level(self.prices[index], self.sizes[index])

    def __iter__(self) -> Iterator[Level]:
        return map(Level, self.prices, self.sizes)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Levels):
            return self.prices == other.prices and self.sizes == other.sizes
        if isinstance(other, tuple):
            return tuple(self) == other
        return NotImplemented

    def __hash__(self) -> int:
        return hash((self.prices, self.sizes))

    def __add__(self, other: Iterable[Level]) -> tuple[Level, ...]:
        return (*self, *other)

    def __repr__(self) -> str:
        return f"Levels({list(zip(self.prices, self.sizes, strict=True))!r})"


_NO_LEVELS = Levels()


def _as_levels(levels: Iterable[Level]) -> Levels:
    """:meth:`Levels.of`, for attrs (converters must be named functions)."""
    return Levels.of(levels)


@attrs.frozen(slots=True)
class BookSnapshot:
    """
    ``book``: the full order book of one asset, replacing what was known.

    ``bids``/``asks`` are in the order received (not trusted to be sorted),
    as :class:`Levels` (any iterable of :class:`Level` is converted).
    ``tick_size`` and ``last_trade_price`` appear in initial dumps only.
    ``condition_id`` is the wire's ``market`` field (every event names the
    market by its condition id). ``integrity`` is the outcome of checking
    ``hash`` against the levels (:func:`book_hash`): ``verified``,
    ``mismatched`` or ``unverifiable`` (no hash, or a preimage field absent).
    """

    asset_id: str
    condition_id: str
    bids: Levels = attrs.field(converter=_as_levels)
    asks: Levels = attrs.field(converter=_as_levels)
    timestamp_ms: int
    hash: str
    tick_size: Decimal | None = None
    last_trade_price: Decimal | None = None
    integrity: Integrity = "unverifiable"


@attrs.define(slots=True)
class LevelChange:
    """
    One ``price_changes[]`` entry: the new aggregate ``size`` (shares) at
    ``price`` on ``side`` (``BUY`` = bid level, ``SELL`` = ask level); size 0
    removes the level.

    ``has_top`` says the entry carried the venue's own top of book after the
    change (``best_bid`` and ``best_ask`` both present): then ``best_bid`` /
    ``best_ask`` are that top, None for an empty side (``""``, a bid <= 0 or an
    ask >= 1: docs/protocol.md, "Empty sides").
    Without it both are None and the local book is the only source.

    Events built per frame (this, :class:`PriceChange`, :class:`LastTradePrice`,
    :class:`ParsedFrame`) are plain slotted classes, not frozen ones: a frozen
    attrs class costs about 0.5 µs more per instance (measured: 0.68 against
    0.18 µs), a tenth of a frame's parse. Nothing changes them after parsing.
    """

    asset_id: str
    price: Decimal
    size: Decimal
    side: Side
    best_bid: Decimal | None = None
    best_ask: Decimal | None = None
    has_top: bool = False


@attrs.define(slots=True)
class PriceChange:
    """``price_change``: level changes of one market, in order."""

    condition_id: str
    timestamp_ms: int
    changes: tuple[LevelChange, ...]


@attrs.define(slots=True)
class LastTradePrice:
    """``last_trade_price``: a trade; ``side`` is the taker's, ``size`` in shares."""

    asset_id: str
    condition_id: str
    price: Decimal
    size: Decimal
    side: Side | None
    timestamp_ms: int


@attrs.frozen(slots=True)
class TickSizeChange:
    """``tick_size_change``: the asset's minimum price increment changed."""

    asset_id: str
    condition_id: str
    old_tick_size: Decimal | None
    new_tick_size: Decimal
    timestamp_ms: int


@attrs.frozen(slots=True)
class BestBidAsk:
    """``best_bid_ask`` (custom feature): the top of book moved; None = empty side."""

    asset_id: str
    condition_id: str
    best_bid: Decimal | None
    best_ask: Decimal | None
    timestamp_ms: int


@attrs.frozen(slots=True)
class NewMarket:
    """
    ``new_market`` (custom feature, venue-wide): a market was listed.
    ``market_id`` is the Gamma id (wire ``id``), ``condition_id`` the wire ``market``.
    """

    market_id: str
    condition_id: str
    question: str
    slug: str
    assets_ids: tuple[str, ...]
    outcomes: tuple[str, ...]
    timestamp_ms: int


@attrs.frozen(slots=True)
class MarketResolved:
    """
    ``market_resolved`` (custom feature): the market's outcome is known.
    ``market_id`` is the Gamma id (wire ``id``), ``condition_id`` the wire ``market``.
    """

    market_id: str
    condition_id: str
    assets_ids: tuple[str, ...]
    winning_asset_id: str
    winning_outcome: str
    timestamp_ms: int


@attrs.frozen(slots=True)
class Control:
    """A non-JSON text frame: ``PONG``, ``INVALID OPERATION`` or ``NO NEW ASSETS``."""

    text: str


FeedEvent = (
    BookSnapshot
    | PriceChange
    | LastTradePrice
    | TickSizeChange
    | BestBidAsk
    | NewMarket
    | MarketResolved
)


@attrs.define(slots=True)
class ParsedFrame:
    """
    What one frame held.

    Attributes:
        events: the usable events, in frame order.
        control: the control text when the frame was one (``PONG``...), else None.
        problems: one :class:`MalformedFrame` per event or ``price_changes``
            entry that was skipped (missing or mistyped field, price outside
            [0, 1], an object whose type cannot be told).
        event_types: the ``event_type`` of every object seen, skipped ones included.
        ignored: event types the market channel does not define (e.g.
            ``settlement_preview``): normal input beside known events, not used.
    """

    events: list[FeedEvent]
    control: str | None = None
    problems: list[MalformedFrame] = attrs.field(factory=list)
    event_types: list[str] = attrs.field(factory=list)
    ignored: list[str] = attrs.field(factory=list)


# ------------------------------------------------------------------ fields


def _field(obj: dict[str, Any], name: str) -> Any:
    try:
        return obj[name]
    except KeyError:
        raise MalformedFrame("missing_field", f"no {name!r}") from None


def _text(obj: dict[str, Any], name: str) -> str:
    value = _field(obj, name)
    if not isinstance(value, str):
        raise MalformedFrame("bad_field", f"{name!r} is {type(value).__name__}, not a string")
    return value


def _asset_id(obj: dict[str, Any]) -> str:
    """
    ``obj["asset_id"]``, interned (``sys.intern``): the books, the coverage
    sets, the catalog and the rules keep each asset id (77 digits, 126 bytes)
    as a key, and share this one string instead of a copy each.
    """
    return sys.intern(_text(obj, "asset_id"))


def _decimal(value: Any, name: str) -> Decimal:
    try:
        return finite_decimal(value)
    except NotANumber:
        raise MalformedFrame("bad_number", f"{name!r} = {value!r}") from None


def _price(value: Any, name: str) -> Decimal:
    try:
        return probability(value)
    except NotANumber:
        raise MalformedFrame("bad_number", f"{name!r} = {value!r}") from None
    except OutOfRange:
        raise MalformedFrame("price_out_of_range", f"{name!r} = {value!r}") from None


def _optional_price(obj: dict[str, Any], name: str, p: FrameParser) -> Decimal | None:
    value = obj.get(name)
    if value is None or value == "":
        return None
    return p.price(value, name)


def _bid_top(obj: dict[str, Any], p: FrameParser) -> Decimal | None:
    """The venue's ``best_bid``: None for ``""`` or a price <= 0 (no bid)."""
    return bid_or_none(_optional_price(obj, "best_bid", p))


def _ask_top(obj: dict[str, Any], p: FrameParser) -> Decimal | None:
    """The venue's ``best_ask``: None for ``""`` or a price >= 1 (no ask)."""
    return ask_or_none(_optional_price(obj, "best_ask", p))


def _size(value: Any, name: str) -> Decimal:
    size = _decimal(value, name)
    if size < 0:
        raise MalformedFrame("negative_size", f"{name!r} = {value!r}")
    return size


def _timestamp(obj: dict[str, Any]) -> int:
    value = obj.get("timestamp")
    if value.__class__ is str and value.isdigit() and value.isascii():  # the wire's form
        return int(value)
    if value is None or value == "":
        return 0
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.isascii() and value.isdigit():
        return int(value)
    raise MalformedFrame("bad_field", f"'timestamp' = {value!r}")


def _side(value: Any) -> Side:
    if isinstance(value, str):
        upper = value.upper()
        if upper == "BUY":
            return "BUY"
        if upper == "SELL":
            return "SELL"
    raise MalformedFrame("bad_field", f"'side' = {value!r}")


def _ids(obj: dict[str, Any], name: str) -> tuple[str, ...]:
    value = obj.get(name) or ()
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise MalformedFrame("bad_field", f"{name!r} is not a list of strings")
    return tuple(value)


# ------------------------------------------------------------------ events

Problems = list[MalformedFrame]
"""Where an event parser reports the parts of an event it skipped."""


class _NothingUsable(Exception):
    """An event whose every part was skipped and reported already."""


_BOOK_HASH_DEFAULTS = {"min_order_size": "5", "neg_risk": False}
"""What the venue hashes for the two fields a WebSocket ``book`` lacks (section 11)."""


def book_hash(obj: dict[str, Any]) -> str | None:
    """
    The venue's hash of a ``book`` object (WebSocket or REST), or None when a
    field of the preimage is absent (``tick_size`` or ``last_trade_price``).

    SHA-1 hex of the compact JSON ``{"market", "asset_id", "timestamp",
    "hash": "", "bids", "asks", "min_order_size", "tick_size", "neg_risk",
    "last_trade_price"}`` in that key order, levels as ``{"price", "size"}``
    strings in the order received; ``min_order_size`` ``"5"`` and
    ``neg_risk`` ``false`` where the object lacks them (the WebSocket never
    sends them). A CLOB V2 book's ``version`` (``"v2"``) follows
    ``last_trade_price`` in the preimage: that is what reproduces the
    recorded V2 hash (tests/data/replay/adriancova-session-2026-10-05.jsonl).
    Sources: py-clob-client-v2 ``utilities.py``
    (``generate_orderbook_summary_hash``), NautilusTrader
    ``verify_book_snapshot_hash``; docs/protocol.md, "Book hash".
    """
    return _hash_of(obj, rebuild_levels=True)


def _hash_of(obj: dict[str, Any], *, rebuild_levels: bool) -> str | None:
    """
    :func:`book_hash`; with ``rebuild_levels`` False the level lists go into
    the preimage as received, not rebuilt as ``{"price", "size"}`` objects:
    the same bytes whenever every level is exactly ``{"price": ..., "size":
    ...}`` in that order (the venue's own shape), and no copy of each level.
    """
    if "tick_size" not in obj or "last_trade_price" not in obj:
        return None
    try:
        bids, asks = obj["bids"], obj["asks"]
        if rebuild_levels:
            bids = [{"price": lv["price"], "size": lv["size"]} for lv in bids]
            asks = [{"price": lv["price"], "size": lv["size"]} for lv in asks]
        preimage = {
            "market": obj["market"],
            "asset_id": obj["asset_id"],
            "timestamp": obj["timestamp"],
            "hash": "",
            "bids": bids,
            "asks": asks,
            "min_order_size": obj.get("min_order_size", _BOOK_HASH_DEFAULTS["min_order_size"]),
            "tick_size": obj["tick_size"],
            "neg_risk": obj.get("neg_risk", _BOOK_HASH_DEFAULTS["neg_risk"]),
            "last_trade_price": obj["last_trade_price"],
        }
        if "version" in obj:  # CLOB V2 books hash their version too (recorded 2026-10-05)
            preimage["version"] = obj["version"]
        return hashlib.sha1(orjson.dumps(preimage), usedforsecurity=False).hexdigest()
    except (KeyError, TypeError, orjson.JSONEncodeError):
        return None


def _integrity(obj: dict[str, Any]) -> Integrity:
    """
    ``verified`` when :func:`book_hash` equals the object's ``hash``. The
    level lists are first hashed as received (:func:`_hash_of`): a match there
    is the venue's preimage (anything else would be a SHA-1 collision); only
    when it does not match is the canonical preimage rebuilt and compared.
    """
    expected = obj.get("hash")
    if not isinstance(expected, str) or not expected:
        return "unverifiable"
    expected = expected.lower()
    if _hash_of(obj, rebuild_levels=False) == expected:
        return "verified"
    computed = book_hash(obj)
    if computed is None:
        return "unverifiable"
    return "verified" if computed == expected else "mismatched"


def _book(obj: dict[str, Any], p: FrameParser, problems: Problems) -> BookSnapshot:
    bids = obj["bids"] if "bids" in obj else obj.get("buys")
    asks = obj["asks"] if "asks" in obj else obj.get("sells")
    tick = obj.get("tick_size")
    return BookSnapshot(
        asset_id=_asset_id(obj),
        condition_id=str(obj.get("market") or ""),
        bids=p.levels(bids, "bids"),
        asks=p.levels(asks, "asks"),
        timestamp_ms=_timestamp(obj),
        hash=str(obj.get("hash") or ""),
        tick_size=None if tick in (None, "") else p.price(tick, "tick_size"),
        last_trade_price=_optional_price(obj, "last_trade_price", p),
        # the hash is checked last: a malformed level or field is reported first
        integrity=_integrity(obj) if "bids" in obj and "asks" in obj else "unverifiable",
    )


def _change(entry: Any, asset_id: str | None, p: FrameParser) -> LevelChange:
    if not isinstance(entry, dict):
        raise MalformedFrame("bad_field", "price change entry is not an object")
    has_top = "best_bid" in entry and "best_ask" in entry
    return LevelChange(
        asset_id=asset_id if asset_id is not None else _asset_id(entry),
        price=p.price(_field(entry, "price"), "price"),
        size=p.size(_field(entry, "size"), "size"),
        side=_side(_field(entry, "side")),
        best_bid=_bid_top(entry, p) if has_top else None,
        best_ask=_ask_top(entry, p) if has_top else None,
        has_top=has_top,
    )


def _price_change(obj: dict[str, Any], p: FrameParser, problems: Problems) -> PriceChange:
    """
    A ``price_change``; an entry that cannot be used (missing or malformed
    field: rs-clob-client's ``parses_batch_price_changes`` has entries
    without ``size``) is reported in ``problems`` and skipped, its good
    siblings are kept (section 11, "price_change entries can lack fields").
    """
    if "price_changes" in obj:
        entries, asset_id = obj["price_changes"], None
    elif "changes" in obj:  # legacy: one asset, changes[]
        entries, asset_id = obj["changes"], _asset_id(obj)
    elif "price" in obj and "side" in obj:  # legacy single-level message
        entries, asset_id = [obj], _asset_id(obj)
    else:
        raise MalformedFrame("missing_field", "no 'price_changes'")
    if not isinstance(entries, list):
        raise MalformedFrame("bad_field", "'price_changes' is not a list")
    changes = p.level_changes(entries, asset_id, problems)
    if not changes:
        if problems:  # every entry was reported: nothing more to say
            raise _NothingUsable
        raise MalformedFrame("missing_field", "'price_changes' is empty")
    return PriceChange(str(obj.get("market") or ""), _timestamp(obj), tuple(changes))


def _last_trade(obj: dict[str, Any], p: FrameParser, problems: Problems) -> LastTradePrice:
    return p.last_trade(obj)


def _checked_trade(obj: dict[str, Any], p: FrameParser) -> LastTradePrice:
    """A ``last_trade_price`` with every field checked (see :meth:`FrameParser.last_trade`)."""
    side = obj.get("side")
    return LastTradePrice(
        asset_id=_asset_id(obj),
        condition_id=str(obj.get("market") or ""),
        price=p.price(_field(obj, "price"), "price"),
        size=p.size(obj.get("size", "0"), "size"),
        side=None if side in (None, "") else _side(side),
        timestamp_ms=_timestamp(obj),
    )


def _tick_size_change(obj: dict[str, Any], p: FrameParser, problems: Problems) -> TickSizeChange:
    old = obj.get("old_tick_size")
    return TickSizeChange(
        asset_id=_asset_id(obj),
        condition_id=str(obj.get("market") or ""),
        old_tick_size=None if old in (None, "") else p.price(old, "old_tick_size"),
        new_tick_size=p.price(_field(obj, "new_tick_size"), "new_tick_size"),
        timestamp_ms=_timestamp(obj),
    )


def _best_bid_ask(obj: dict[str, Any], p: FrameParser, problems: Problems) -> BestBidAsk:
    return BestBidAsk(
        asset_id=_asset_id(obj),
        condition_id=str(obj.get("market") or ""),
        best_bid=_bid_top(obj, p),
        best_ask=_ask_top(obj, p),
        timestamp_ms=_timestamp(obj),
    )


def _new_market(obj: dict[str, Any], p: FrameParser, problems: Problems) -> NewMarket:
    assets = _ids(obj, "assets_ids") or _ids(obj, "clob_token_ids")
    return NewMarket(
        market_id=str(_field(obj, "id")),
        condition_id=_text(obj, "market"),
        question=str(obj.get("question") or ""),
        slug=str(obj.get("slug") or ""),
        assets_ids=assets,
        outcomes=_ids(obj, "outcomes"),
        timestamp_ms=_timestamp(obj),
    )


def _market_resolved(obj: dict[str, Any], p: FrameParser, problems: Problems) -> MarketResolved:
    return MarketResolved(
        market_id=str(_field(obj, "id")),
        condition_id=_text(obj, "market"),
        assets_ids=_ids(obj, "assets_ids"),
        winning_asset_id=_text(obj, "winning_asset_id"),
        winning_outcome=str(obj.get("winning_outcome") or ""),
        timestamp_ms=_timestamp(obj),
    )


_PARSERS: dict[str, Callable[[dict[str, Any], FrameParser, Problems], FeedEvent]] = {
    "book": _book,
    "price_change": _price_change,
    "last_trade_price": _last_trade,
    "tick_size_change": _tick_size_change,
    "best_bid_ask": _best_bid_ask,
    "new_market": _new_market,
    "market_resolved": _market_resolved,
}

KNOWN_EVENT_TYPES = frozenset(_PARSERS)
"""The market channel's event types (AsyncAPI spec, docs/protocol.md, "Server messages")."""


def _event_type(obj: dict[str, Any]) -> str:
    """
    The object's ``event_type``, inferred where a legacy object without it
    has an unambiguous shape (``price_changes[]``, ``bids``/``buys`` with
    ``asset_id``, ``new_tick_size``). A trade-like object (``asset_id``,
    ``price``, ``side``) could be a last trade or a legacy one-level price
    change: counted as ``ambiguous_event``, never guessed (section 11).
    """
    kind = obj.get("event_type")
    if isinstance(kind, str):
        return kind
    if kind is not None:
        raise MalformedFrame("bad_field", f"'event_type' = {kind!r}")
    if "price_changes" in obj:
        return "price_change"
    if "asset_id" in obj and ("bids" in obj or "buys" in obj):
        return "book"
    if "new_tick_size" in obj and "asset_id" in obj:
        return "tick_size_change"
    if "asset_id" in obj and "price" in obj and "side" in obj:
        raise MalformedFrame("ambiguous_event", "no 'event_type': last trade or price change")
    raise MalformedFrame("missing_field", "no 'event_type'")


_SIDES: dict[str, Side] = {"BUY": "BUY", "SELL": "SELL"}
"""The wire's sides as they usually arrive; other spellings take the checked path."""

_CONTROL_BYTES = {text.encode(): text for text in CONTROL_FRAMES}


def _control(raw: str | bytes | bytearray | memoryview) -> str | None:
    """The control text a short frame holds (``PONG``...), else None."""
    if isinstance(raw, str):
        stripped = raw.strip()
        return stripped if stripped in CONTROL_FRAMES else None
    return _CONTROL_BYTES.get(bytes(raw).strip())


def _unreadable(raw: str | bytes | bytearray | memoryview, exc: Exception) -> MalformedFrame:
    """Why orjson refused a frame: not UTF-8, or not JSON."""
    if not isinstance(raw, str):
        try:
            raw = bytes(raw).decode("utf-8")
        except UnicodeDecodeError as error:
            return MalformedFrame("not_utf8", str(error))
    return MalformedFrame("invalid_json", f"{exc} in {raw[:60]!r}")


class FrameParser:
    """
    Parses market-channel frames (see :meth:`parse`), remembering the
    decimal strings it has converted: prices repeat constantly (a market has
    at most 100 to 10,000 price levels), so a bounded memo of validated
    ``Decimal`` values saves most of the conversion cost. One parser per
    owner (the feed pool); not shared between threads.
    """

    __slots__ = ("_asks", "_bids", "_limit", "_prices", "_sizes")

    def __init__(self, memo_limit: int = 65_536) -> None:
        self._limit = memo_limit
        self._prices: dict[str, Decimal] = {}
        self._sizes: dict[str, Decimal] = {}
        self._bids: dict[str, Decimal | None] = {}  # a best_bid string: its bid, None = no bid
        self._asks: dict[str, Decimal | None] = {}  # a best_ask string: its ask, None = no ask

    def price(self, value: Any, name: str) -> Decimal:
        """A probability in [0, 1]; raises MalformedFrame otherwise."""
        if value.__class__ is str:
            known = self._prices.get(value)
            if known is not None:
                return known
            price = _price(value, name)
            if len(self._prices) >= self._limit:
                self._prices.clear()
            self._prices[value] = price
            return price
        return _price(value, name)

    def size(self, value: Any, name: str) -> Decimal:
        """A size in shares >= 0; raises MalformedFrame otherwise."""
        if value.__class__ is str:
            known = self._sizes.get(value)
            if known is not None:
                return known
            size = _size(value, name)
            if len(self._sizes) >= self._limit:
                self._sizes.clear()
            self._sizes[value] = size
            return size
        return _size(value, name)

    def level_changes(
        self, entries: list[Any], asset_id: str | None, problems: Problems
    ) -> list[LevelChange]:
        """
        A ``price_change``'s entries as :class:`LevelChange` (``asset_id``:
        the legacy shape's one asset, else None: each entry names its own);
        an entry that cannot be used is reported in ``problems`` as
        ``price_changes[i]: ...`` and skipped.

        The common entry (every field a string seen before: its price, size
        and top already converted, ``side`` ``BUY``/``SELL``) is built from the
        memos in one step; any other entry takes the checked path
        (:func:`_change`), which raises what is wrong with it. Both give the
        same result for the same entry.
        """
        prices, sizes, bids, asks = self._prices, self._sizes, self._bids, self._asks
        intern = sys.intern
        changes: list[LevelChange] = []
        for index, entry in enumerate(entries):
            try:
                if asset_id is not None:
                    raise KeyError(asset_id)  # the legacy shape: the checked path
                change = LevelChange(
                    intern(entry["asset_id"]),
                    prices[entry["price"]],
                    sizes[entry["size"]],
                    _SIDES[entry["side"]],
                    bids[entry["best_bid"]],
                    asks[entry["best_ask"]],
                    True,
                )
            except (KeyError, TypeError):
                try:
                    change = _change(entry, asset_id, self)
                except MalformedFrame as exc:
                    problems.append(
                        MalformedFrame(exc.kind, f"price_changes[{index}]: {exc.detail}")
                    )
                    continue
                if change.has_top:
                    self._remember(self._bids, entry["best_bid"], change.best_bid)
                    self._remember(self._asks, entry["best_ask"], change.best_ask)
            changes.append(change)
        return changes

    def last_trade(self, obj: dict[str, Any]) -> LastTradePrice:
        """
        A ``last_trade_price`` object as :class:`LastTradePrice`. The common
        object (string fields, price and size seen before, ``side``
        ``BUY``/``SELL``) is built from the memos; any other is checked field
        by field.

        Raises:
            MalformedFrame: a field is missing or malformed.
        """
        try:
            market = obj["market"]
            timestamp = obj["timestamp"]
            if market.__class__ is not str or not market or timestamp.__class__ is not str:
                raise TypeError(market)
            return LastTradePrice(
                sys.intern(obj["asset_id"]),
                market,
                self._prices[obj["price"]],
                self._sizes[obj["size"]],
                _SIDES[obj["side"]],
                _timestamp(obj),
            )
        except (KeyError, TypeError):
            return _checked_trade(obj, self)

    def _remember(self, memo: dict[str, Decimal | None], key: Any, value: Decimal | None) -> None:
        """Keep a converted top-of-book string (strings only: ``1`` and ``True`` hash alike)."""
        if key.__class__ is str:
            if len(memo) >= self._limit:
                memo.clear()
            memo[key] = value

    def levels(self, value: Any, name: str) -> Levels:
        """
        A ``bids``/``asks`` list of ``{"price", "size"}`` objects as
        :class:`Levels`, in the order received (``None``: no levels).

        Raises:
            MalformedFrame: not a list, a level not an object, a price or
                size missing or malformed (price outside [0, 1], size < 0).
        """
        if value is None:
            return _NO_LEVELS
        if not isinstance(value, list):
            raise MalformedFrame("bad_field", f"{name!r} is not a list")
        known_prices, known_sizes = self._prices, self._sizes
        prices: list[Decimal] = []
        sizes: list[Decimal] = []
        add_price, add_size = prices.append, sizes.append
        for item in value:
            try:  # the common case: both strings already converted (the memo)
                price = known_prices[item["price"]]
                size = known_sizes[item["size"]]
            except (KeyError, TypeError, IndexError):
                if not isinstance(item, dict):
                    raise MalformedFrame("bad_field", f"{name!r} level is not an object") from None
                price = self.price(_field(item, "price"), "price")
                size = self.size(_field(item, "size"), "size")
            add_price(price)
            add_size(size)
        return Levels(prices, sizes)

    def _object(self, obj: Any, parsed: ParsedFrame) -> None:
        if not isinstance(obj, dict):
            parsed.problems.append(
                MalformedFrame("not_an_object", f"{type(obj).__name__} in frame")
            )
            return
        kind = obj.get("event_type")
        if kind.__class__ is not str:  # absent or mistyped: inferred, or reported
            try:
                kind = _event_type(obj)
            except MalformedFrame as exc:
                parsed.problems.append(exc)
                return
        parsed.event_types.append(kind)
        parser = _PARSERS.get(kind)
        if parser is None:  # e.g. settlement_preview: normal input, not ours
            parsed.ignored.append(kind[:80])
            return
        problems: Problems = []
        try:
            parsed.events.append(parser(obj, self, problems))
        except MalformedFrame as exc:
            problems.append(exc)
        except _NothingUsable:
            pass
        if problems:  # (no generator per event on the common path)
            parsed.problems.extend(MalformedFrame(e.kind, f"{kind}: {e.detail}") for e in problems)

    def book(self, obj: Any) -> BookSnapshot:
        """
        One book object outside a frame (a CLOB REST ``GET /book`` /
        ``POST /books`` answer item), parsed like a ``book`` event.

        Raises:
            MalformedFrame: not an object, or a field is missing or malformed.
        """
        if not isinstance(obj, dict):
            raise MalformedFrame("not_an_object", f"{type(obj).__name__} as book")
        return _book(obj, self, [])

    def parse(self, raw: str | bytes) -> ParsedFrame:
        """
        Parse one market-channel text frame into events.

        A frame is a JSON object or array of objects with ``event_type``;
        prices are decimal strings in [0, 1]; timestamps are milliseconds.
        Source: docs/protocol.md, "Server messages". An event (or a
        ``price_changes`` entry) that cannot be used is skipped and reported
        in ``problems``; the other events and entries of the frame are kept.
        Event types the channel does not define are listed in ``ignored``.

        Args:
            raw: the frame as received (``str`` for text frames; ``bytes``
                must be UTF-8).

        Returns:
            A :class:`ParsedFrame`; ``control`` is set for ``PONG`` and the
            other non-JSON text frames.

        Raises:
            MalformedFrame: the whole frame is unusable: not UTF-8, not JSON,
                or JSON that is neither an object nor an array.
        """
        if len(raw) < 24:
            control = _control(raw)
            if control is not None:
                return ParsedFrame(events=[], control=control)
        parsed = ParsedFrame([])
        data = _decode(raw)
        if data.__class__ is dict:  # the common frame: one object
            self._object(data, parsed)
        else:
            for obj in _objects(data):
                self._object(obj, parsed)
        return parsed

    def parse_in_slices(
        self, raw: str | bytes, budget: float = 0.002
    ) -> Generator[None, None, ParsedFrame]:
        """
        :meth:`parse` in slices of about ``budget`` seconds of CPU, for big
        frames (an initial dump: a JSON array of hundreds of books, MBs):
        a generator that yields (None) between slices and returns the
        :class:`ParsedFrame`; the caller checkpoints at each yield (trio:
        ``await trio.sleep(0)``). Same result and errors as :meth:`parse`.

        A top-level array of objects that share their first key (the venue's
        dumps) is decoded element by element: ``orjson.loads`` of a whole
        1.5 MB dump is one C call of 12 to 30 ms, and its 40,000 objects alive
        at once make each full pass of the cyclic collector scan them all. The
        array is cut where ``},{"<first key>"`` occurs; each piece must decode
        to an object by itself, and is parsed and dropped at once. When a piece
        does not decode (a cut inside a string or a nested object, mixed
        shapes, bad JSON) what it gave is dropped and the frame is decoded
        whole, as :meth:`parse` does, with its errors: nothing of a frame is
        returned before all of it decoded. A wrong cut cannot decode: the
        piece before it starts at an element's start and ends inside that
        element.

        Raises:
            MalformedFrame: as :meth:`parse`, when the first value is
                asked for.
        """
        if len(raw) < 24:
            return self.parse(raw)
        try:  # a str frame is ASCII in practice: its bytes are one copy
            data = raw.encode() if isinstance(raw, str) else raw
        except UnicodeEncodeError:  # lone surrogates: not JSON, say so as parse() does
            return self.parse(raw)
        started = time.perf_counter()
        cuts = _array_cuts(data)
        if cuts is not None:
            parsed = ParsedFrame(events=[])
            for start, end in cuts:
                try:
                    obj = orjson.loads(data[start:end])
                except orjson.JSONDecodeError:
                    break
                self._object(obj, parsed)
                del obj
                if time.perf_counter() - started > budget:
                    yield
                    started = time.perf_counter()
            else:
                return parsed
        objects = _objects(_decode(raw))
        parsed = ParsedFrame(events=[])
        for index, obj in enumerate(objects):
            self._object(obj, parsed)
            objects[index] = None  # freed as we go, not all at the end in one step
            if time.perf_counter() - started > budget:
                yield
                started = time.perf_counter()
        return parsed


def _decode(raw: str | bytes) -> Any:
    """The frame's JSON value. Raises MalformedFrame: not UTF-8, or not JSON."""
    try:
        return orjson.loads(raw)  # UTF-8 bytes are parsed as they are, no decode
    except orjson.JSONDecodeError as exc:
        raise _unreadable(raw, exc) from None


def _objects(data: Any) -> list[Any]:
    """A frame's values: the array's items, or the one object. Raises MalformedFrame."""
    if isinstance(data, list):
        return data
    if isinstance(data, dict):
        return [data]
    raise MalformedFrame("not_an_object", f"JSON {type(data).__name__}")


def _array_cuts(data: bytes) -> list[tuple[int, int]] | None:
    """
    Where the items of a compact top-level array of objects sharing their
    first key seem to lie in ``data``, ``[(start, end), ...]``, or None when
    the frame does not look like one (see :meth:`FrameParser.parse_in_slices`:
    every piece is checked by decoding it).
    """
    if not data.startswith(b'[{"') or not data.endswith(b"}]"):
        return None
    key_end = data.find(b'"', 3)
    if key_end < 0:
        return None
    separator = b"}," + data[1 : key_end + 1]  # '},{"<first key>"'
    cuts = []
    start = 1
    while True:
        found = data.find(separator, start)
        if found < 0:
            cuts.append((start, len(data) - 1))
            return cuts
        cuts.append((start, found + 1))
        start = found + 2


def parse_frame(raw: str | bytes) -> ParsedFrame:
    """
    Parse one frame with a fresh :class:`FrameParser` (see :meth:`FrameParser.parse`).

    Long-running readers keep one ``FrameParser`` instead, for its memo.

    Raises:
        MalformedFrame: the whole frame is unusable: not UTF-8, not JSON, or
            JSON that is neither an object nor an array.
    """
    return FrameParser().parse(raw)


# ------------------------------------------------------------------ client messages


def encode_subscribe(asset_ids: Sequence[str], *, custom_feature_enabled: bool = False) -> str:
    """
    The first message on a new connection: ``{"assets_ids": [...], "type": "market"}``.

    Sent once per connection; a second ``type`` message is answered
    ``INVALID OPERATION`` (docs/protocol.md, "Subscribing"). An empty list is accepted.
    """
    message: dict[str, Any] = {"assets_ids": list(asset_ids), "type": "market"}
    if custom_feature_enabled:
        message["custom_feature_enabled"] = True
    return orjson.dumps(message).decode()


def encode_operation(
    operation: Literal["subscribe", "unsubscribe"],
    asset_ids: Iterable[str],
    *,
    custom_feature_enabled: bool = False,
) -> str:
    """
    Add or remove assets on an open connection (no acknowledgement comes back).

    ``{"operation": "subscribe" | "unsubscribe", "assets_ids": [...]}``;
    docs/protocol.md, "Subscribing".
    """
    message: dict[str, Any] = {"operation": operation, "assets_ids": list(asset_ids)}
    if custom_feature_enabled and operation == "subscribe":
        message["custom_feature_enabled"] = True
    return orjson.dumps(message).decode()


def chunk_asset_ids(asset_ids: Sequence[str], max_bytes: int) -> list[list[str]]:
    """
    Split ``asset_ids`` into lists whose subscribe message stays under ``max_bytes``.

    The budget counts each id's JSON form plus a comma, and 96 bytes of
    envelope (observed frame-size cliff near 56 KiB; polystream caps at
    ``feed.max_subscribe_bytes``, 40 KiB by default: docs/protocol.md, "Limits").
    """
    chunks: list[list[str]] = []
    current: list[str] = []
    used = 96
    for asset_id in asset_ids:
        cost = len(asset_id) + 3
        if current and used + cost > max_bytes:
            chunks.append(current)
            current, used = [], 96
        current.append(asset_id)
        used += cost
    if current:
        chunks.append(current)
    return chunks
