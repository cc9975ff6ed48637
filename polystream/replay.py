"""
``polystream replay``: a local server speaking Polymarket's market channel from captures.

It is the test and demo peer of the daemon. A capture is a file of recorded
WebSocket text frames, one a line (``../shared/data/replay/README.md``, "File
format"), optionally gzip-compressed (``.gz``). Several captures are merged by
frame time (the largest event ``timestamp`` of a frame, milliseconds).

One shared :class:`Tape` walks the frames in order: the first at once, frame
*i* ``(t_i - t_0) / speed`` seconds later, or as fast as the clients take them
(``max_speed``). It keeps the current L2 book and last trade price of every
asset of the capture, subscribed or not, so a client that subscribes late gets
the book as it stands, as from the real server.

The protocol served (``../shared/protocol.md``, sections 2-6):

* any path (``/ws/market``); many connections, each with its own subscription set;
* the first message ``{"assets_ids": [...], "type": "market"}`` subscribes and,
  unless ``"initial_dump": false``, is answered by ONE JSON array frame holding a
  ``book`` of each newly subscribed asset the capture knows, with ``tick_size``
  and ``last_trade_price`` (``""`` when nothing traded yet); unknown ids get
  nothing. A second message with ``type`` (and no ``operation``) is answered
  with the text ``INVALID OPERATION``;
* ``{"operation": "subscribe" | "unsubscribe", "assets_ids": [...]}`` changes the
  set with no acknowledgement; a subscribe sends the books of the new assets
  as one array frame too (``initial_dump`` honoured). A message carrying both
  ``type`` and ``operation`` (Polymarket's rs-clob-client sends those) counts
  as an operation;
* the text ``PING`` is answered ``PONG``; other text, binary frames and
  invalid JSON are counted and ignored;
* a client receives only events of its assets: a frame whose assets are all
  subscribed is sent byte for byte as recorded, any other frame is filtered
  (events of other assets dropped, ``price_changes[]`` entries too) and
  skipped when nothing is left. ``best_bid_ask`` events go only to clients
  that set ``custom_feature_enabled``; ``new_market`` and ``market_resolved``
  go to all of those (venue-wide, as on the real feed).

Everything a client receives goes through its own bounded outbox, in order:
snapshots, answers (``PONG``) and frames. The tape never drops a frame for a
connected client: it waits until every outbox has room. A client that
disconnects is forgotten and the tape goes on.

With ``start_when_subscribed`` (the default) the tape waits until some client
subscribed to at least one asset, so the replay can be started first and the
daemon second without missing anything.

Synthetic assets (``synthesize=N``, for scale tests and benchmarks): the
server also knows N extra asset ids, each a re-labelled copy of a recorded
asset (:class:`Synthetic`). Synthetic asset *k* copies recorded asset
``k mod n`` (recorded assets ordered by condition id, then asset id, so the
copies of one recorded market form one synthetic market, "copy"
``k // n``). Its id is a 77-digit decimal derived from *k* and the original
id, its condition id a ``0x`` + 64-hex string derived from the copy number and
the original condition id; :meth:`Synthetic.gamma_markets` gives Gamma-like
market objects for them. The cost model:

* the tape keeps books of the recorded assets only; a synthetic snapshot is
  the original's current book with ``asset_id``, ``market`` and ``hash``
  replaced, its levels and the hash preimage after the labels built once
  per original and tape position (a copy costs one SHA-1 of that preimage);
* a frame costs nothing extra for a client without synthetic subscriptions
  (one truth test), and for a client with some, one set intersection unless
  the frame names an original it holds copies of;
* with ``synthetic_events`` (the default) the events of such a frame are
  re-encoded once per copy held by that client, ids rewritten in the JSON
  text, and all copies go out as ONE array frame. This is a real fan-out
  (10,000 copies of 12 recorded assets turn one event into ~830), so paced
  replays (``speed``) suit it better than ``max_speed``. With
  ``synthetic_events=False`` synthetic assets get their snapshots only.

Book hashes. Every ``book`` the server builds (subscribe snapshots, the
books of synthetic copies, ``crossed_book`` garbage, REST books) carries the
venue's ``hash`` (:func:`book_hash`, protocol.md section 11), so a consumer
verifying hashes accepts them; the snapshot of a book that has not changed
since a recorded snapshot with ``tick_size`` and ``last_trade_price`` has
that snapshot's hash. Recorded frames are sent as recorded, ``hash``
included (the ``updown`` and ``aaimek`` captures carry assigned ones).

Tick sizes (``tick_changes``). The venue changes a book's tick from 0.01 to
0.001 when its price passes 0.96 or 0.04 and back, sends
``tick_size_change`` (``old_tick_size``, ``new_tick_size``), and then no
fresh ``book``: ``price_change`` frames keep coming with its own
``best_bid`` / ``best_ask`` (protocol.md, sections 6 and 11). In this mode
the tape, after applying each frame, checks the books of the frame's
assets: a 0.01 book whose best bid went above :data:`TICK_HIGH` or best ask
below :data:`TICK_LOW` goes to 0.001, and a book it lowered goes back to 0.01
once both sides are present within [0.04, 0.96]. The change is recorded in
the tape's book (later snapshots and REST books carry the new tick), logged
in :attr:`ReplayServer.tick_change_log` (:class:`TickChange`: asset, ticks,
index of the frame it preceded) and sent, as one object frame, to every
client holding the asset (relabelled for synthetic copies) just before that
frame. Books recorded on another tick are left alone.

CLOB REST (``rest_port``). :meth:`ReplayServer.rest_app` is an ASGI app
answering ``GET /book``, ``POST /books``, ``POST /prices`` and
``POST /midpoints`` like the CLOB (protocol.md, section 8) from the same
books the snapshots come from, synthetic copies included, so the daemon's
REST resync and HTTP fallback have a peer consistent with the feed. Each
request is recorded (:class:`RestRequest`); ``rest_fail_next`` injects
error statuses (429 with ``Retry-After: 0``).

With ``record`` the server also keeps, per connection, every subscription
request received (time, size in bytes, ids) and when each snapshot was
written to the socket (:class:`ConnectionLog`), plus the latest of those
times per asset; :class:`ReplayStats` always counts message sizes and
subscription peaks.

Faults (for the fault tests and ``bench/recovery.py``). Each is a method to
call at a chosen moment, a :class:`ScheduledFault` the tape fires by itself
after frame N or every N frames (``--fault ACTION:after=N``), or a policy:

* :meth:`ReplayServer.drop`: end connections abruptly, by a TCP FIN or RST
  without a close frame, or by a close frame;
* :meth:`ReplayServer.half_open`: the socket stays open, nothing comes back
  (no ``PONG``, no data);
* :meth:`ReplayServer.silence`: ``PONG`` keeps coming, data does not;
* :meth:`ReplayServer.stall`: half of one frame's bytes, then nothing;
* :meth:`ReplayServer.inject` / :meth:`ReplayServer.inject_garbage`: bad
  input between two real frames, from the catalogue :data:`GARBAGE_KINDS`
  (:func:`garbage_frames`);
* :meth:`ReplayServer.pause`: a quiet market (the tape holds, links stay up);
* ``max_subscribe_bytes`` / ``max_subscribe_ids``: an oversized subscribe
  closes the connection ``oversize_close_delay`` (0.15) s later, unserved;
* ``storm_limit`` / ``storm_window``: handshakes beyond K accepted in T s get
  HTTP 429.

A faulted connection is taken off the tape (the tape neither sends to it nor
waits for it) and a new connection is served normally, with the books as they
stand, so a client that reconnects converges on the undisturbed final state.
Raw bytes (a partial frame, a text frame that is not UTF-8) go through
trio-websocket's own stream and send lock (:func:`_write_raw`): it has no
public API for them. With no fault configured, the tape's per-frame cost is
two truth tests.
"""

from __future__ import annotations

import gzip
import hashlib
import heapq
import re
import socket
import struct
import time
import zlib
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping, Sequence
from decimal import Decimal, InvalidOperation
from functools import partial
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qs

import attrs
import orjson
import structlog
import trio
from trio_websocket import (
    ConnectionClosed,
    Endpoint,
    WebSocketConnection,
    WebSocketRequest,
    serve_websocket,
)

from polystream.errors import ReplayError
from polystream.health import answer_lifespan, serve_asgi

__all__ = [
    "DROP_MODES",
    "FAULT_ACTIONS",
    "GARBAGE_KINDS",
    "MAX_BOOKS_PER_REQUEST",
    "TICK_HIGH",
    "TICK_LOW",
    "Capture",
    "ConnectionLog",
    "FaultRecord",
    "Frame",
    "Garbage",
    "RawFrame",
    "ReplayServer",
    "ReplayStats",
    "RequestRecord",
    "RestRequest",
    "ScheduledFault",
    "Synthetic",
    "SyntheticAsset",
    "Tape",
    "TickChange",
    "book_hash",
    "garbage_frames",
    "run_replay_cli",
    "serve_replay",
    "synthetic_asset_id",
]

logger = structlog.get_logger(__name__)

Event = dict[str, Any]

MAX_MESSAGE_SIZE = 16 * 2**20
"""Largest message the server accepts, bytes (subscribe frames of thousands of ids)."""

_CUSTOM_EVENTS = frozenset({"best_bid_ask", "new_market", "market_resolved"})
_VENUE_WIDE_EVENTS = frozenset({"new_market", "market_resolved"})
_TICK_SIZES = {2: "0.01", 3: "0.001", 4: "0.0001"}


@attrs.frozen
class Frame:
    """
    One recorded WebSocket text frame, prepared once at load.

    Attributes:
        text: the frame exactly as recorded (no line end).
        time_ms: frame time, unix milliseconds: the largest event ``timestamp``
            (a frame without one takes its predecessor's time).
        events: the parsed event objects.
        is_array: the frame is a JSON array (else a single object).
        asset_ids: assets of its per-asset events (``price_changes[]`` entries included).
        plain: every event is a per-asset, non-custom event, so a client
            subscribed to all of ``asset_ids`` can get ``text`` as is.
        source: ``path:line`` for error messages.
    """

    text: str
    time_ms: int
    events: tuple[Event, ...]
    is_array: bool
    asset_ids: frozenset[str]
    plain: bool
    source: str

    @property
    def event_count(self) -> int:
        """Number of events in the frame."""
        return len(self.events)


@attrs.frozen
class Capture:
    """
    Frames of one or more capture files, merged by frame time.

    Attributes:
        frames: in replay order; frame times never decrease.
        markets: every asset id of the capture -> its condition id.
        paths: the files read.
        first_ms: asset id -> the earliest ``timestamp`` of its events (ms).
    """

    frames: tuple[Frame, ...]
    markets: dict[str, str]
    paths: tuple[Path, ...]
    first_ms: dict[str, int] = attrs.field(factory=dict)

    @classmethod
    def load(cls, paths: Sequence[Path]) -> Capture:
        """
        Read capture files (``.jsonl`` or ``.jsonl.gz``) and merge them by frame time.

        At equal times frames keep file order, then argument order. Every frame
        is applied once to a scratch book, so a malformed event fails here, not
        during the replay.

        Raises:
            ReplayError: a file cannot be read, or a line (named ``path:line``)
                is not a frame: invalid JSON, not an object or array of objects
                with ``event_type``, a bad ``timestamp``, or an event whose
                fields cannot be applied to a book. Also when there is no frame.
        """
        per_file = [_read_capture(Path(path)) for path in paths]
        frames = tuple(heapq.merge(*per_file, key=lambda frame: frame.time_ms))
        if not frames:
            raise ReplayError(f"no frames in {', '.join(str(p) for p in paths)}")
        scratch = _Books()
        for frame in frames:
            scratch.apply_checked(frame)
        markets = {asset: book.market for asset, book in scratch.books.items()}
        first_ms: dict[str, int] = {}
        for frame in frames:
            for event in frame.events:
                stamp = event.get("timestamp")
                if stamp is not None:
                    for asset_id in _event_assets(event):
                        first_ms[asset_id] = min(first_ms.get(asset_id, int(stamp)), int(stamp))
        paths_read = tuple(Path(p) for p in paths)
        return cls(frames=frames, markets=markets, paths=paths_read, first_ms=first_ms)

    def schedule(self, speed: float) -> list[float]:
        """
        Seconds after the start of a pass at which each frame is due.

        Frame *i* is due ``(t_i - t_0) / speed`` after the first; ``speed`` > 0.
        """
        t0 = self.frames[0].time_ms
        scale = 1.0 / (1000.0 * speed)
        return [(frame.time_ms - t0) * scale for frame in self.frames]


def _read_capture(path: Path) -> list[Frame]:
    try:
        data = path.read_bytes()
        if path.name.endswith(".gz"):
            data = gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as exc:
        raise ReplayError(f"{path}: cannot read capture: {exc}") from exc
    frames: list[Frame] = []
    last_ms = -1  # frame times are clamped so they never decrease
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        line = raw.rstrip(b"\r")
        if line.strip():
            frame = _parse_line(line, f"{path}:{lineno}")
            if frame.time_ms < last_ms:
                frame = attrs.evolve(frame, time_ms=last_ms)
            last_ms = frame.time_ms
            frames.append(frame)
    # Frames before the first timestamped one take its time.
    first_ms = next((f.time_ms for f in frames if f.time_ms >= 0), 0)
    return [f if f.time_ms >= 0 else attrs.evolve(f, time_ms=first_ms) for f in frames]


def _parse_line(line: bytes, source: str) -> Frame:
    """Parse one line; ``time_ms`` is -1 when no event of the frame has a ``timestamp``."""
    try:
        text = line.decode("utf-8")
        value = orjson.loads(line)
    except UnicodeDecodeError as exc:
        raise ReplayError(f"{source}: not UTF-8") from exc
    except orjson.JSONDecodeError as exc:
        raise ReplayError(f"{source}: invalid JSON: {exc}") from exc
    is_array = isinstance(value, list)
    events: list[Any] = value if is_array else [value]
    if not events:
        raise ReplayError(f"{source}: empty array")
    time_ms = -1
    assets: set[str] = set()
    plain = True
    for event in events:
        if not isinstance(event, dict) or not isinstance(event.get("event_type"), str):
            raise ReplayError(f"{source}: not an event object with event_type")
        stamp = event.get("timestamp")
        if stamp is not None:
            try:
                time_ms = max(time_ms, int(stamp))
            except (TypeError, ValueError) as exc:
                raise ReplayError(f"{source}: bad timestamp {stamp!r}") from exc
        event_assets = _event_assets(event)
        if not event_assets or event["event_type"] in _CUSTOM_EVENTS:
            plain = False
        assets.update(event_assets)
    return Frame(
        text=text,
        time_ms=time_ms,
        events=tuple(events),
        is_array=is_array,
        asset_ids=frozenset(assets),
        plain=plain,
        source=source,
    )


def _event_assets(event: Event) -> list[str]:
    """Asset ids a client must subscribe to for ``event`` (none: venue-wide or unknown)."""
    if event["event_type"] in _VENUE_WIDE_EVENTS:
        return []
    changes = event.get("price_changes")
    if isinstance(changes, list):
        return [str(entry.get("asset_id")) for entry in changes if isinstance(entry, dict)]
    asset = event.get("asset_id")
    return [asset] if isinstance(asset, str) else []


# --- synthetic assets ----------------------------------------------------------------

_SYNTHETIC_ID_BASE = 10**76
_SYNTHETIC_ID_SPAN = 9 * 10**76
_SYNTHETIC_GAMMA_ID_BASE = 8_000_000_000


def synthetic_asset_id(index: int, original: str) -> str:
    """The id of synthetic asset ``index`` copying ``original``: 77 decimal digits."""
    digest = int(hashlib.sha256(f"synthetic/{index}/{original}".encode()).hexdigest(), 16)
    return str(_SYNTHETIC_ID_BASE + digest % _SYNTHETIC_ID_SPAN)


def _synthetic_market_id(copy: int, original_market: str) -> str:
    """A condition-id-like market id (``0x`` + 64 hex) for one copy of a recorded market."""
    return "0x" + hashlib.sha256(f"synthetic-market/{copy}/{original_market}".encode()).hexdigest()


@attrs.frozen
class SyntheticAsset:
    """
    One synthetic asset: a re-labelled copy of a recorded one.

    Attributes:
        asset_id: its own id (77 decimal digits, see :func:`synthetic_asset_id`).
        index: *k*, its position among the synthetic assets.
        copy: ``k // n`` (n = recorded assets); copies of one market share it.
        original: the recorded asset it copies (``k mod n`` in recorded order).
        market: its synthetic condition id.
        original_market: the recorded asset's condition id.
    """

    asset_id: str
    index: int
    copy: int
    original: str
    market: str
    original_market: str


@attrs.frozen
class Synthetic:
    """
    The synthetic assets of a server, built from a capture's assets.

    Attributes:
        assets: synthetic asset id -> :class:`SyntheticAsset`.
        ordered: the same, by index *k*.
        by_copy: (copy, original asset id) -> :class:`SyntheticAsset`.
    """

    assets: dict[str, SyntheticAsset]
    ordered: tuple[SyntheticAsset, ...]
    by_copy: dict[tuple[int, str], SyntheticAsset]

    @classmethod
    def build(cls, markets: dict[str, str], count: int) -> Synthetic:
        """
        ``count`` synthetic assets copying the assets of ``markets`` (asset id ->
        condition id, as :attr:`Capture.markets`), ordered by (condition id, asset id).

        Raises:
            ReplayError: ``count`` > 0 but there is no recorded asset, or ``count`` < 0.
        """
        if count < 0:
            raise ReplayError(f"synthesize: expected a count >= 0, got {count}")
        originals = sorted(markets, key=lambda asset: (markets[asset], asset))
        if count and not originals:
            raise ReplayError("synthesize: the capture names no asset to copy")
        ordered = []
        market_ids: dict[tuple[int, str], str] = {}
        for index in range(count):
            copy, position = divmod(index, len(originals))
            original = originals[position]
            original_market = markets[original]
            market = market_ids.get((copy, original_market))
            if market is None:
                market = market_ids[copy, original_market] = _synthetic_market_id(
                    copy, original_market
                )
            ordered.append(
                SyntheticAsset(
                    asset_id=synthetic_asset_id(index, original),
                    index=index,
                    copy=copy,
                    original=original,
                    market=market,
                    original_market=original_market,
                )
            )
        assets = {asset.asset_id: asset for asset in ordered}
        if len(assets) != len(ordered):  # a sha256 collision mod 9e76: not expected, ever
            raise ReplayError("synthesize: two synthetic ids collide")
        by_copy = {(asset.copy, asset.original): asset for asset in ordered}
        return cls(assets=assets, ordered=tuple(ordered), by_copy=by_copy)

    @property
    def asset_ids(self) -> list[str]:
        """Synthetic asset ids, by index *k*."""
        return [asset.asset_id for asset in self.ordered]

    def gamma_markets(self) -> list[Event]:
        """
        Gamma-like market objects for the synthetic markets, in order of first asset.

        One object per synthetic condition id: ``id`` a decimal string from
        8,000,000,000 up, ``conditionId``, ``question``, ``slug``, and
        ``outcomes`` / ``clobTokenIds`` as JSON-encoded strings (Gamma's shape;
        ``polystream.markets.GammaMarket.from_gamma`` reads them). Outcomes are
        ``["Yes", "No"]`` for two tokens (two tokens per market whenever the
        recorded markets are binary and the count is a multiple of the recorded
        assets), else ``Outcome 1..m``.
        """
        tokens: dict[str, list[SyntheticAsset]] = {}
        for asset in self.ordered:
            tokens.setdefault(asset.market, []).append(asset)
        objects: list[Event] = []
        for number, (market, members) in enumerate(tokens.items()):
            first = members[0]
            outcomes = (
                ["Yes", "No"]
                if len(members) == 2
                else [f"Outcome {i}" for i in range(1, len(members) + 1)]
            )
            objects.append(
                {
                    "id": str(_SYNTHETIC_GAMMA_ID_BASE + number),
                    "conditionId": market,
                    "question": f"Synthetic copy {first.copy} of {first.original_market}",
                    "slug": f"synthetic-{first.copy}-{first.original_market[:18]}",
                    "outcomes": orjson.dumps(outcomes).decode(),
                    "clobTokenIds": orjson.dumps([m.asset_id for m in members]).decode(),
                    "active": True,
                    "closed": False,
                }
            )
        return objects


# --- books ---------------------------------------------------------------------------

Level = Mapping[str, str]
"""One book level as sent: ``{"price": "0.45", "size": "100"}`` (decimal strings)."""


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
    nautilus_trader ``verify_book_snapshot_hash``; ../shared/protocol.md,
    section 11, "Book hash". It reproduces the real snapshots of
    ``enricobignozzi-2026-09-24`` and nautilus ``ws_book_snapshot_captured.json``.
    A pure function: no state, no I/O.
    """
    tail = _hash_tail(bids, asks, tick_size, last_trade_price, min_order_size, neg_risk)
    return _hash_with_tail(market, asset_id, timestamp, tail)


def _hash_tail(
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


def _hash_with_tail(market: str, asset_id: str, timestamp: str, tail: bytes) -> str:
    """:func:`book_hash` from the labels and a :func:`_hash_tail` (shared by copies of a book)."""
    head = orjson.dumps(
        {"market": market, "asset_id": asset_id, "timestamp": timestamp, "hash": ""}
    )
    return hashlib.sha1(head[:-1] + tail).hexdigest()


@attrs.define
class _Book:
    """One asset's L2 book: price -> (price text, size text) per side."""

    market: str
    bids: dict[Decimal, tuple[str, str]] = attrs.Factory(dict)
    asks: dict[Decimal, tuple[str, str]] = attrs.Factory(dict)
    tick_size: str | None = None
    last_trade_price: str = ""
    timestamp: str | None = None

    def replace(self, event: Event) -> None:
        self.bids = _levels(event.get("bids", event.get("buys")))
        self.asks = _levels(event.get("asks", event.get("sells")))
        tick = event.get("tick_size")
        if isinstance(tick, str) and tick:
            self.tick_size = tick
        last = event.get("last_trade_price")
        if isinstance(last, str) and last:
            self.last_trade_price = last

    def change(self, price: str, size: str, side: str) -> None:
        levels = self.bids if side.upper() == "BUY" else self.asks
        key = Decimal(price)
        if Decimal(size) == 0:
            levels.pop(key, None)
        else:
            levels[key] = (price, size)

    def snapshot(self, asset_id: str, timestamp: str) -> tuple[Event, bytes]:
        """
        The book as the real server's initial dump shows it (bids ascending, asks
        descending), labelled ``asset_id``, with the venue's hash
        (:func:`book_hash`); and that hash's :func:`_hash_tail`, which copies
        of the book under other labels share.
        """
        bids = [{"price": p, "size": s} for _, (p, s) in sorted(self.bids.items())]
        asks = [{"price": p, "size": s} for _, (p, s) in sorted(self.asks.items(), reverse=True)]
        stamp = self.timestamp or timestamp
        tick_size = self.current_tick_size()
        tail = _hash_tail(bids, asks, tick_size, self.last_trade_price)
        event = {
            "market": self.market,
            "asset_id": asset_id,
            "timestamp": stamp,
            "hash": _hash_with_tail(self.market, asset_id, stamp, tail),
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
class _Books:
    """Books of all assets, kept from the frames applied so far."""

    books: dict[str, _Book] = attrs.Factory(dict)

    def book(self, asset_id: str, market: Any) -> _Book:
        book = self.books.get(asset_id)
        if book is None:
            book = self.books[asset_id] = _Book(market=str(market or ""))
        return book

    def apply(self, frame: Frame) -> None:
        for event in frame.events:
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

    def apply_checked(self, frame: Frame) -> None:
        try:
            self.apply(frame)
        except (KeyError, TypeError, ValueError, AttributeError, InvalidOperation) as exc:
            reason = f"{type(exc).__name__}: {exc}"
            message = f"{frame.source}: event cannot be applied to a book: {reason}"
            raise ReplayError(message) from exc


# --- the tape ------------------------------------------------------------------------

TICK_HIGH = Decimal("0.96")
"""A best bid above this lowers a 0.01 tick to 0.001 (``tick_changes``; protocol.md, 6 and 11)."""
TICK_LOW = Decimal("0.04")
"""A best ask below this lowers a 0.01 tick to 0.001 (``tick_changes``)."""
_COARSE_TICK, _FINE_TICK = "0.01", "0.001"


@attrs.frozen
class TickChange:
    """
    One ``tick_size_change`` the tape made (``tick_changes``), in
    :attr:`ReplayServer.tick_change_log`.

    Attributes:
        asset_id, market: the book's asset and condition id (recorded ids;
            clients holding synthetic copies got it relabelled).
        old_tick_size, new_tick_size: ``"0.01"`` -> ``"0.001"`` or back.
        timestamp_ms: the event's ``timestamp``: the frame time of ``frame``.
        frame: index, within its pass, of the tape frame the change was sent
            just before (the frame that moved the book across the threshold;
            ``Capture.frames[frame]`` on the first pass).
        lap: passes completed before it (0 on the first pass).
        clients: numbers of the connections subscribed to ``asset_id`` that were sent it.
    """

    asset_id: str
    market: str
    old_tick_size: str
    new_tick_size: str
    timestamp_ms: int
    frame: int
    lap: int = 0
    clients: tuple[int, ...] = ()

    def event(self) -> Event:
        """The ``tick_size_change`` event as the venue sends it (protocol.md, section 6)."""
        return {
            "event_type": "tick_size_change",
            "market": self.market,
            "asset_id": self.asset_id,
            "old_tick_size": self.old_tick_size,
            "new_tick_size": self.new_tick_size,
            "timestamp": str(self.timestamp_ms),
        }

    def frame_of(self) -> Frame:
        """The event as a one-object :class:`Frame`, for the tape's dispatch."""
        event = self.event()
        return Frame(
            text=_encode(event),
            time_ms=self.timestamp_ms,
            events=(event,),
            is_array=False,
            asset_ids=frozenset({self.asset_id}),
            plain=True,
            source=f"tick_size_change:{self.asset_id}",
        )


def _tick_target(book: _Book, lowered: bool) -> str | None:
    """
    The tick ``book`` should move to, or None to stay: 0.01 -> 0.001 once its
    best bid is above :data:`TICK_HIGH` or its best ask below :data:`TICK_LOW`;
    a book the tape lowered goes back to 0.01 once both sides are present and
    within [0.04, 0.96]. Books on another tick are left alone.
    """
    bid, ask = book.top()
    tick = book.current_tick_size()
    if not lowered:
        extreme = (bid is not None and bid > TICK_HIGH) or (ask is not None and ask < TICK_LOW)
        return _FINE_TICK if extreme and tick == _COARSE_TICK else None
    inside = all(p is not None and TICK_LOW <= p <= TICK_HIGH for p in (bid, ask))
    return _COARSE_TICK if inside and tick == _FINE_TICK else None


@attrs.define(eq=False)
class Tape:
    """
    The one shared walk through a capture, and the state it leaves behind.

    Attributes:
        capture: the frames.
        position: index of the next frame of the current pass.
        laps: passes completed.
        frames_played: frames handed out so far (all passes).
        events_played: their events.
        finished: set once the last frame was handed to every connected client
            and written to its socket (never set when looping).
    """

    capture: Capture
    position: int = 0
    laps: int = 0
    frames_played: int = 0
    events_played: int = 0
    finished: trio.Event = attrs.field(factory=trio.Event)
    _books: _Books = attrs.field(factory=_Books, alias="_books")
    _time_ms: int | None = attrs.field(default=None, alias="_time_ms")
    _label_cache: dict[str, tuple[int, Event, bytes]] = attrs.field(
        factory=dict, alias="_label_cache"
    )
    _lowered: set[str] = attrs.field(factory=set, alias="_lowered")

    def apply(self, frame: Frame) -> None:
        """Apply ``frame`` to the books and count it as played."""
        self._books.apply(frame)
        self._time_ms = frame.time_ms
        self.frames_played += 1
        self.events_played += len(frame.events)

    def knows(self, asset_id: str) -> bool:
        """Whether the capture has any event of ``asset_id``."""
        return asset_id in self.capture.markets

    def top(self, asset_id: str) -> tuple[str | None, str | None]:
        """
        Best bid and best ask of ``asset_id``'s current book, as price texts
        (``"0.45"``); None for an empty side, a book not yet seen, or an
        unknown asset.
        """
        book = self._books.books.get(asset_id)
        if book is None:
            return None, None
        bid, ask = book.top()
        return (
            None if bid is None else book.bids[bid][0],
            None if ask is None else book.asks[ask][0],
        )

    def tick_crossings(self, frame: Frame, index: int) -> list[TickChange]:
        """
        After ``frame`` (index ``index`` of its pass) was applied: the tick
        changes it calls for (:func:`_tick_target`), already recorded in the
        books (their ``tick_size``), in asset id order. ``clients`` is empty.
        """
        changes: list[TickChange] = []
        for asset_id in sorted(frame.asset_ids):
            book = self._books.books.get(asset_id)
            if book is None:
                continue
            lowered = asset_id in self._lowered
            target = _tick_target(book, lowered)
            if target is None:
                continue
            changes.append(
                TickChange(
                    asset_id=asset_id,
                    market=book.market,
                    old_tick_size=book.current_tick_size(),
                    new_tick_size=target,
                    timestamp_ms=frame.time_ms,
                    frame=index,
                    lap=self.laps,
                )
            )
            book.tick_size = target
            if lowered:
                self._lowered.discard(asset_id)
            else:
                self._lowered.add(asset_id)
            self._label_cache.pop(asset_id, None)
        return changes

    def snapshot(self, asset_id: str, *, label: SyntheticAsset | None = None) -> Event | None:
        """
        The current ``book`` event of ``asset_id``, or None when the capture never names it.

        An asset that has no book yet (trades only, or before its first
        snapshot) gets empty ``bids`` / ``asks`` and its last trade price,
        stamped 1 ms before its first recorded event (so that no recorded
        event of it is older than the snapshot; raw event times can be
        older than the frame times the tape walks by).
        Fields, in the venue's order: ``market, asset_id, timestamp, hash,
        bids, asks, tick_size, event_type, last_trade_price``; ``hash`` is the
        venue's (:func:`book_hash` of exactly these fields, with
        ``min_order_size`` ``"5"`` and ``neg_risk`` false); ``tick_size`` the
        recorded one (or the tape's, after a ``tick_changes`` change), else
        inferred from the price decimals.
        With ``label`` (a synthetic copy of ``asset_id``) the event carries the
        copy's asset id and market instead, hashed under them (the levels and
        the rest of the hash preimage are built once per frame played and
        shared by all copies).
        """
        market = self.capture.markets.get(asset_id)
        if market is None:
            return None
        book = self._books.books.get(asset_id) or _Book(market=market)
        now = self._time_ms if self._time_ms is not None else self.capture.frames[0].time_ms
        if book.timestamp is None and asset_id in self.capture.first_ms:
            now = min(now, self.capture.first_ms[asset_id] - 1)
        if label is None:
            return book.snapshot(asset_id, str(now))[0]
        # Copies of one book share its levels and the hash preimage after the
        # labels: build them once per frame played; a copy costs one SHA-1.
        cached = self._label_cache.get(asset_id)
        if cached is None or cached[0] != self.frames_played:
            cached = self._label_cache[asset_id] = (
                self.frames_played,
                *book.snapshot(asset_id, str(now)),
            )
        _, base, tail = cached
        digest = _hash_with_tail(label.market, label.asset_id, base["timestamp"], tail)
        return {**base, "market": label.market, "asset_id": label.asset_id, "hash": digest}


# --- faults --------------------------------------------------------------------------

DropMode = Literal["tcp", "reset", "close"]
DROP_MODES: tuple[DropMode, ...] = ("tcp", "reset", "close")
"""How :meth:`ReplayServer.drop` ends a connection (see there)."""

FAULT_ACTIONS = (
    "drop-tcp",
    "drop-reset",
    "drop-close",
    "half-open",
    "silence",
    "stall",
    "garbage",
    "pause",
)
"""Actions a :class:`ScheduledFault` (and ``--fault``) can name."""

_WS_TEXT, _WS_BINARY = 0x1, 0x2


_TIMESTAMP = re.compile(r'"timestamp":(\s*)"(\d+)"')


def shift_frame(frame: Frame, offset_ms: int) -> Frame:
    """``frame`` with every ``timestamp`` moved ``offset_ms`` later (a looped lap)."""
    text = _TIMESTAMP.sub(
        lambda m: f'"timestamp":{m.group(1)}"{int(m.group(2)) + offset_ms}"', frame.text
    )
    data = orjson.loads(text)
    events = tuple(data) if frame.is_array else (data,)
    return attrs.evolve(frame, text=text, time_ms=frame.time_ms + offset_ms, events=events)


@attrs.frozen
class RawFrame:
    """
    Bytes written to the socket as they are, bypassing wsproto (an outbox entry).

    Used for what wsproto refuses to send: a text frame whose payload is not
    UTF-8 (:func:`ws_frame`), or part of a frame (:meth:`ReplayServer.stall`).
    """

    data: bytes


def ws_frame(payload: bytes, opcode: int = _WS_TEXT) -> bytes:
    """
    One final, unmasked server-to-client WebSocket frame (RFC 6455, section 5.2).

    No extension is ever negotiated by trio-websocket, so a server frame is
    the 2-10 byte header and the payload as is; wsproto keeps no per-message
    state for unextended frames, so writing one beside it is safe.
    """
    length = len(payload)
    if length < 126:
        header = struct.pack("!BB", 0x80 | opcode, length)
    elif length < 2**16:
        header = struct.pack("!BBH", 0x80 | opcode, 126, length)
    else:
        header = struct.pack("!BBQ", 0x80 | opcode, 127, length)
    return header + payload


async def _write_raw(ws: WebSocketConnection, data: bytes) -> None:
    """
    Write ``data`` to the connection's byte stream under its send lock.

    trio-websocket 0.12 has no public raw-write API. Its own ``_send`` writes
    what wsproto produced to ``ws._stream`` holding ``ws._stream_lock`` (a
    ``trio.StrictFIFOLock``); taking the same lock keeps a raw write from
    interleaving with a PONG or a close frame sent meanwhile. These two
    private attributes are the only internals the replay touches (also
    :func:`_abort_stream`); wsproto's state is never touched.

    Raises:
        ConnectionClosed: the peer is gone.
    """
    async with ws._stream_lock:
        try:
            await ws._stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise ConnectionClosed(None) from exc


async def _abort_stream(ws: WebSocketConnection, *, reset: bool) -> None:
    """
    Close the TCP connection under ``ws`` without a WebSocket close frame:
    a FIN, or with ``reset`` a RST (``SO_LINGER`` 0). trio-websocket's reader
    task then sees the stream closed and ends the connection (code 1006).
    """
    stream = ws._stream
    if reset and isinstance(stream, trio.SocketStream):
        try:
            stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass  # already gone: the close below is all that is left to do
    await stream.aclose()


@attrs.frozen
class ScheduledFault:
    """
    A fault the tape triggers by itself, at a chosen frame.

    Attributes:
        action: one of :data:`FAULT_ACTIONS`: ``drop-tcp`` / ``drop-reset`` /
            ``drop-close`` (:meth:`ReplayServer.drop`), ``half-open``
            (:meth:`ReplayServer.half_open`), ``silence``
            (:meth:`ReplayServer.silence`), ``stall``
            (:meth:`ReplayServer.stall`), ``garbage``
            (:meth:`ReplayServer.inject_garbage`, the whole catalogue but
            ``not_utf8_text``) or ``pause`` (:meth:`ReplayServer.pause`).
        after: fire once, after this many frames of a pass were dispatched (>= 1).
        every: fire after every this many frames (>= 1).
        duration: for ``pause``: seconds until the tape resumes (0: never).

    Exactly one of ``after`` and ``every`` is set. The fault hits every
    connection open at that moment, between two frames.
    """

    action: str = attrs.field(validator=attrs.validators.in_(FAULT_ACTIONS))
    after: int | None = None
    every: int | None = None
    duration: float = 0.0

    def __attrs_post_init__(self) -> None:
        if (self.after is None) == (self.every is None):
            raise ReplayError(f"fault {self.action}: give exactly one of after= and every=")
        if (self.after or self.every or 0) < 1:
            raise ReplayError(f"fault {self.action}: the frame count must be >= 1")

    @classmethod
    def parse(cls, spec: str) -> ScheduledFault:
        """
        Read ``ACTION:after=N``, ``ACTION:every=N`` (the ``--fault`` flag), with
        an optional ``,duration=S`` for ``pause``: ``drop-tcp:after=5000``,
        ``garbage:every=500``, ``pause:after=100,duration=3``.

        Raises:
            ReplayError: not of that form, or an unknown action.
        """
        action, _, rest = spec.partition(":")
        values: dict[str, str] = {}
        for part in filter(None, rest.split(",")):
            key, sep, value = part.partition("=")
            if not sep or key not in ("after", "every", "duration"):
                raise ReplayError(f"--fault {spec!r}: expected ACTION:after=N or ACTION:every=N")
            values[key] = value
        if action not in FAULT_ACTIONS:
            raise ReplayError(f"--fault {spec!r}: action must be one of {', '.join(FAULT_ACTIONS)}")
        try:
            return cls(
                action,
                after=int(values["after"]) if "after" in values else None,
                every=int(values["every"]) if "every" in values else None,
                duration=float(values.get("duration", 0.0)),
            )
        except ValueError as exc:
            raise ReplayError(f"--fault {spec!r}: {exc}") from exc

    def due(self, count: int) -> bool:
        """Whether it fires once ``count`` frames of the pass were dispatched."""
        if self.every is not None:
            return count % self.every == 0
        return count == self.after


@attrs.frozen
class FaultRecord:
    """
    One fault the server applied (kept always, in :attr:`ReplayServer.fault_log`).

    Attributes:
        action: what was done (``drop-tcp``, ``silence``, ``reject-429``,
            ``oversize-close``, ``garbage``, ...).
        at: ``time.monotonic()`` when it was applied (for a drop: before the
            socket was closed).
        clients: the connection numbers it hit.
        frame: frames of the tape dispatched so far (all passes).
    """

    action: str
    at: float
    clients: tuple[int, ...]
    frame: int


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
    frames: tuple[str | bytes | RawFrame, ...]


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


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
    chosen = list(GARBAGE_KINDS if kinds is None else kinds)
    if kinds is None:
        chosen.remove("not_utf8_text")
    unknown = [k for k in chosen if k not in GARBAGE_KINDS]
    if unknown:
        raise ReplayError(f"garbage: unknown kinds {unknown}")
    asset, book = _garbage_asset(tape, asset_ids)
    stamp = int(book.timestamp or 0)
    best_ask = min(book.asks)
    market = book.market
    trade = {
        "event_type": "last_trade_price",
        "asset_id": asset,
        "market": market,
        "price": book.last_trade_price or "0.5",
        "size": "1",
        "side": "BUY",
        "timestamp": str(stamp),
    }

    def change(price: str, size: str, side: str, timestamp: int) -> str:
        return _dumps(
            {
                "event_type": "price_change",
                "market": market,
                "timestamp": str(timestamp),
                "price_changes": [{"asset_id": asset, "price": price, "size": size, "side": side}],
            }
        )

    ask_text = book.asks[best_ask][0]
    bid_text = book.bids[max(book.bids)][0]
    low_bid = "0.001"
    built: dict[str, tuple[str | bytes | RawFrame, ...]] = {
        "truncated_json": (change(low_bid, "5", "BUY", stamp)[:40],),
        "not_an_object": ("[42]",),
        "binary_frame": (orjson.dumps(trade),),
        "unknown_event_type": (_dumps({**trade, "event_type": "price_surprise"}),),
        "missing_field": (_dumps({k: v for k, v in trade.items() if k != "price"}),),
        "bad_field": (_dumps({**trade, "asset_id": 12345}),),
        "price_out_of_range": (_dumps({**trade, "price": "1.5"}),),
        "nan_size": (change(low_bid, "NaN", "BUY", stamp),),
        "negative_size": (change(low_bid, "-5", "BUY", stamp),),
        "crossed_book": (
            change(ask_text, "1", "BUY", stamp),
            _dumps(tape.snapshot(asset)),
        ),
        # removes the best bid, if it were applied
        "stale_event": (change(bid_text, "0", "BUY", max(stamp - 60_000, 1)),),
        "foreign_asset": (_dumps({**trade, "asset_id": FOREIGN_ASSET}),),
        "not_utf8_text": (RawFrame(ws_frame(b'{"event_type": "book", "asset_id": "\xff\xfe"}')),),
    }
    return [Garbage(kind, GARBAGE_KINDS[kind], asset, built[kind]) for kind in chosen]


def _garbage_asset(tape: Tape, asset_ids: Iterable[str]) -> tuple[str, _Book]:
    for asset_id in sorted(asset_ids):
        book = tape._books.books.get(asset_id)
        if book is not None and book.bids and book.asks and book.timestamp:
            return asset_id, book
    raise ReplayError("garbage: no asset with a two-sided, timestamped book among those given")


# --- connections ---------------------------------------------------------------------


@attrs.frozen
class RequestRecord:
    """
    One subscription request a connection sent (kept with ``record``).

    Attributes:
        received_at: ``time.monotonic()`` when the server read it.
        size_bytes: the message's size, UTF-8 bytes.
        operation: ``"type"`` (the first message), ``"subscribe"`` or ``"unsubscribe"``.
        asset_ids: the ids as sent.
        subscribed_after: the connection's subscription count after it.
    """

    received_at: float
    size_bytes: int
    operation: str
    asset_ids: tuple[str, ...]
    subscribed_after: int


@attrs.define(eq=False)
class ConnectionLog:
    """
    What one connection did (kept with ``record``, also after it closed).

    Attributes:
        number: the connection's number (1 = first accepted).
        opened_at, closed_at: ``time.monotonic()``; ``closed_at`` None while open.
        requests: its subscription requests, in order.
        snapshots: asset id -> when its latest snapshot was written to the socket.
        subscribed: its subscription set (live while open, final once closed).
    """

    number: int
    opened_at: float
    closed_at: float | None = None
    requests: list[RequestRecord] = attrs.Factory(list)
    snapshots: dict[str, float] = attrs.Factory(dict)
    subscribed: set[str] = attrs.Factory(set)


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


@attrs.frozen
class _Snapshots:
    """An outbox entry holding a snapshot array, so its write time can be recorded."""

    text: str
    asset_ids: tuple[str, ...]


@attrs.define(eq=False)
class _Client:
    """
    One connection: its subscriptions and its ordered, bounded outbox.

    ``copies`` and ``copy_origins`` index its synthetic subscriptions: copy
    number -> recorded assets held as that copy, and recorded asset -> copies.
    """

    ws: WebSocketConnection
    capacity: int
    number: int
    mode: str = "normal"  # normal | silent | half_open | stalled | poisoned | dropped
    nursery: trio.Nursery | None = None
    subscribed: set[str] = attrs.Factory(set)
    copies: dict[int, set[str]] = attrs.Factory(dict)
    copy_origins: dict[str, set[int]] = attrs.Factory(dict)
    custom: bool = False
    typed: bool = False
    closed: bool = False
    outbox: deque[str | _Snapshots | bytes | RawFrame] = attrs.Factory(deque)
    sending: bool = False
    log: ConnectionLog | None = None
    on_snapshots_sent: Callable[[ConnectionLog, tuple[str, ...]], None] | None = None
    _data: trio.lowlevel.ParkingLot = attrs.field(factory=trio.lowlevel.ParkingLot, alias="_data")
    _space: trio.lowlevel.ParkingLot = attrs.field(factory=trio.lowlevel.ParkingLot, alias="_space")

    def push(self, item: str | _Snapshots | bytes | RawFrame) -> None:
        """Queue ``item`` (no wait: callers wait for room first, and may overshoot by one)."""
        self.outbox.append(item)
        if self._data:
            self._data.unpark()

    def add_copy(self, asset: SyntheticAsset) -> None:
        self.copies.setdefault(asset.copy, set()).add(asset.original)
        self.copy_origins.setdefault(asset.original, set()).add(asset.copy)

    def remove_copy(self, asset: SyntheticAsset) -> None:
        held = self.copies.get(asset.copy)
        if held is not None:
            held.discard(asset.original)
            if not held:
                del self.copies[asset.copy]
        copies = self.copy_origins.get(asset.original)
        if copies is not None:
            copies.discard(asset.copy)
            if not copies:
                del self.copy_origins[asset.original]

    async def wait_room(self) -> None:
        """Wait until the outbox is below capacity (or the client is gone)."""
        while len(self.outbox) >= self.capacity and not self.closed:
            await self._space.park()

    async def wait_drained(self) -> None:
        """Wait until everything queued was written to the socket (or the client is gone)."""
        while (self.outbox or self.sending) and not self.closed:
            await self._space.park()

    async def write_loop(self) -> None:
        """Send the outbox in order; raises ConnectionClosed when the peer is gone."""
        low_water = self.capacity // 2
        while True:
            while not self.outbox:
                await self._data.park()
            self.sending = True
            item = self.outbox.popleft()
            try:
                if isinstance(item, str):
                    await self.ws.send_message(item)
                elif isinstance(item, _Snapshots):
                    await self.ws.send_message(item.text)
                elif isinstance(item, bytes):
                    await self.ws.send_message(item)  # a binary frame
                else:
                    await _write_raw(self.ws, item.data)
            finally:
                self.sending = False
            if isinstance(item, _Snapshots) and self.log and self.on_snapshots_sent:
                self.on_snapshots_sent(self.log, item.asset_ids)
            if len(self.outbox) <= low_water:
                self._space.unpark_all()

    def close_space(self) -> None:
        """Wake the tape if it waits for room in this outbox."""
        self._space.unpark_all()

    def close(self) -> None:
        self.closed = True
        self.outbox.clear()
        self._space.unpark_all()
        self._data.unpark_all()


def _filter_events(
    frame: Frame, subscribed: set[str], custom: bool, *, venue_wide: bool = True
) -> list[Event]:
    """
    The events of ``frame`` one client may see; ``price_changes[]`` entries filtered too.

    ``venue_wide=False`` leaves out ``new_market`` / ``market_resolved`` (synthetic copies).
    """
    kept: list[Event] = []
    for event in frame.events:
        kind = event["event_type"]
        if kind in _VENUE_WIDE_EVENTS:
            if custom and venue_wide:
                kept.append(event)
            continue
        if kind in _CUSTOM_EVENTS and not custom:
            continue
        changes = event.get("price_changes")
        if isinstance(changes, list):
            entries = [
                e for e in changes if isinstance(e, dict) and e.get("asset_id") in subscribed
            ]
            if len(entries) == len(changes):
                kept.append(event)
            elif entries:
                kept.append({**event, "price_changes": entries})
        elif event.get("asset_id") in subscribed:
            kept.append(event)
    return kept


@attrs.define
class ReplayStats:
    """
    Counters of a replay server.

    Attributes:
        connections: connections accepted, all time.
        frames_sent: frames queued to clients (a frame to two clients counts twice).
        events_sent: events in those frames, after filtering.
        snapshots_sent: ``book`` events sent on subscribe.
        messages_ignored: client messages not understood (binary, non-JSON
            text other than ``PING``, JSON that is not a valid request).
        invalid_json: of those, text that looked like JSON and did not parse.
        messages_received: client messages of any kind.
        max_message_bytes: the largest client message, bytes (UTF-8 for text).
        max_request_assets: the most ids in one subscription request.
        max_subscribed: the largest subscription set one connection ever held.
        synthetic_snapshots_sent: of ``snapshots_sent``, those of synthetic assets.
        synthetic_events_sent: of ``events_sent``, events re-labelled for synthetic assets.
        rejected: handshakes rejected (``storm_limit``: 429; ``refusing``).
        oversized_subscribes: subscribe messages over ``max_subscribe_bytes`` /
            ``max_subscribe_ids`` (each closed the connection).
        faults: faults applied, by action (:attr:`ReplayServer.fault_log` has each).
        garbage_sent: garbage inputs queued, by kind (:data:`GARBAGE_KINDS`).
        tick_size_changes_sent: ``tick_size_change`` events queued to clients
            (``tick_changes``; copies relabelled for synthetic assets included).
        rest_requests: HTTP requests the REST app answered (:attr:`ReplayServer.rest_requests`).
    """

    connections: int = 0
    frames_sent: int = 0
    events_sent: int = 0
    snapshots_sent: int = 0
    messages_ignored: int = 0
    invalid_json: int = 0
    messages_received: int = 0
    max_message_bytes: int = 0
    max_request_assets: int = 0
    max_subscribed: int = 0
    synthetic_snapshots_sent: int = 0
    synthetic_events_sent: int = 0
    rejected: int = 0
    oversized_subscribes: int = 0
    faults: Counter[str] = attrs.Factory(Counter)
    garbage_sent: Counter[str] = attrs.Factory(Counter)
    tick_size_changes_sent: int = 0
    rest_requests: int = 0


@attrs.define(eq=False)
class ReplayServer:
    """
    A market-channel server replaying one :class:`Tape` to every connection.

    Build with a tape, then ``server = await nursery.start(server.serve)``.

    Attributes:
        tape: the shared tape (its ``finished`` event marks the end).
        speed: replay speed factor, > 0 (2.0 = twice as fast as recorded).
        max_speed: ignore recorded times; go as fast as clients take frames.
        loop: start again from the first frame after the last.
        start_when_subscribed: the tape starts when a client first subscribes
            to at least one asset (any id), not when the server starts.
        outbox_frames: frames queued per connection before the tape waits.
        max_message_size: largest client message accepted, bytes.
        synthetic: the synthetic assets served besides the recorded ones
            (see the module docstring), or None.
        synthetic_events: forward the tape's events to synthetic copies too
            (else synthetic assets get their snapshots only).
        record: keep :attr:`connection_logs`, :attr:`subscribe_times` and
            :attr:`snapshot_times` (memory grows with every request).
        host: listening address, set by :meth:`serve`.
        port: bound port, set by :meth:`serve` (useful with ``port=0``).
        connection_logs: with ``record``, one :class:`ConnectionLog` per
            connection accepted, in order.
        subscribe_times: with ``record``, asset id -> ``time.monotonic()`` when
            the latest subscription request naming it was read.
        snapshot_times: with ``record``, asset id -> when its latest snapshot was
            written to a socket.
        faults: :class:`ScheduledFault` s the tape triggers by itself.
        max_subscribe_bytes, max_subscribe_ids: a subscribe message larger
            than this (UTF-8 bytes) or naming more ids is not served and the
            connection is closed ``oversize_close_delay`` s later, the way
            ``oversize_close`` (:data:`DROP_MODES`) says, as observed on the
            real venue (protocol.md, section 4); 0 = no limit.
        storm_limit, storm_window: a handshake arriving when ``storm_limit``
            connections were accepted in the last ``storm_window`` s is
            answered ``429 Too Many Requests`` (rejected ones do not count);
            0 = no limit.
        garbage_assets: assets scheduled ``garbage`` may name (None: any the
            client holds); keeps ``crossed_book`` off assets with TP/SL rules.
        refusing: an HTTP status (e.g. 429 or 503) every handshake is answered
            with while non-zero: the venue down for good; 0 = accept.
        fault_log: every fault applied, in order (:class:`FaultRecord`).
        paused: the tape is held (:meth:`pause`); connections stay served.
        tick_changes: emit the venue's ``tick_size_change`` when a book crosses
            0.96 / 0.04 (module docstring, "Tick sizes").
        tick_change_log: with ``tick_changes``, every change made, in order
            (:class:`TickChange`: asset, ticks, the frame it preceded, clients).
        rest_url: ``http://host:port`` of the CLOB REST app once :meth:`serve`
            was given ``rest_port`` (None otherwise).
        rest_requests: every request the REST app got, in order (:class:`RestRequest`).
        rest_fail_next: HTTP statuses the next REST requests are answered with,
            one each, popped from the front (body ``{"error": "injected"}``; a
            429 carries ``Retry-After: 0``).
    """

    tape: Tape
    speed: float = attrs.field(default=1.0, validator=attrs.validators.gt(0.0))
    max_speed: bool = False
    loop: bool = False
    start_when_subscribed: bool = True
    outbox_frames: int = attrs.field(default=256, validator=attrs.validators.ge(2))
    max_message_size: int = MAX_MESSAGE_SIZE
    synthetic: Synthetic | None = None
    synthetic_events: bool = True
    record: bool = False
    host: str = ""
    port: int = 0
    stats: ReplayStats = attrs.Factory(ReplayStats)
    tape_started: trio.Event = attrs.Factory(trio.Event)
    connection_logs: list[ConnectionLog] = attrs.Factory(list)
    subscribe_times: dict[str, float] = attrs.Factory(dict)
    snapshot_times: dict[str, float] = attrs.Factory(dict)
    faults: tuple[ScheduledFault, ...] = ()
    max_subscribe_bytes: int = 0
    max_subscribe_ids: int = 0
    oversize_close_delay: float = 0.15
    oversize_close: DropMode = "tcp"
    storm_limit: int = 0
    storm_window: float = 1.0
    garbage_assets: frozenset[str] | None = None
    refusing: int = 0
    fault_log: list[FaultRecord] = attrs.Factory(list)
    paused: bool = False
    _repace: float | None = attrs.field(default=None, init=False)
    tick_changes: bool = False
    tick_change_log: list[TickChange] = attrs.Factory(list)
    rest_url: str | None = None
    rest_requests: list[RestRequest] = attrs.Factory(list)
    rest_fail_next: list[int] = attrs.Factory(list)
    _rest_arrived: trio.lowlevel.ParkingLot = attrs.field(
        factory=trio.lowlevel.ParkingLot, alias="_rest_arrived"
    )
    _clients: set[_Client] = attrs.field(factory=set, alias="_clients")
    _muted: set[_Client] = attrs.field(factory=set, alias="_muted")
    _resumed: trio.Event = attrs.field(factory=trio.Event, alias="_resumed")
    _nursery: trio.Nursery | None = attrs.field(default=None, alias="_nursery")
    _accepted_at: deque[float] = attrs.field(factory=deque, alias="_accepted_at")

    def subscriptions(self) -> dict[int, frozenset[str]]:
        """Connection number -> its current subscription set, for open connections."""
        return {
            c.number: frozenset(c.subscribed)
            for c in (*self._clients, *self._muted)
            if not c.closed and c.mode != "dropped"
        }

    @property
    def finished(self) -> trio.Event:
        """The tape's ``finished`` event."""
        return self.tape.finished

    @property
    def url(self) -> str:
        """``ws://host:port/ws/market`` of the listening server."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"ws://{host}:{self.port}/ws/market"

    async def serve(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        rest_port: int | None = None,
        task_status: trio.TaskStatus[ReplayServer] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """
        Listen on ``host:port`` and play the tape; runs until cancelled.

        With ``rest_port`` (0 = a free port) also serve :meth:`rest_app` on
        ``host:rest_port`` with hypercorn (:func:`polystream.health.serve_asgi`).
        Calls ``task_status.started(self)`` once listening, with :attr:`port`
        (and :attr:`rest_url`) set.

        Raises:
            OSError: an address cannot be bound.
        """
        async with trio.open_nursery() as nursery:
            ws_server = await nursery.start(
                partial(
                    serve_websocket,
                    self._serve_client,
                    host,
                    port,
                    None,
                    max_message_size=self.max_message_size,
                )
            )
            endpoint = ws_server.listeners[0]
            if not isinstance(endpoint, Endpoint):
                raise RuntimeError(f"unexpected listener {endpoint!r}")
            self.host, self.port = str(endpoint.address), int(endpoint.port)
            if rest_port is not None:
                listen = f"[{host}]:{rest_port}" if ":" in host else f"{host}:{rest_port}"
                urls: list[str] = await nursery.start(serve_asgi, self.rest_app, listen)
                self.rest_url = urls[0]
            logger.info(
                "replay_listening",
                url=self.url,
                rest_url=self.rest_url,
                frames=len(self.tape.capture.frames),
                assets=len(self.tape.capture.markets),
                speed=None if self.max_speed else self.speed,
                loop=self.loop,
                synthetic=len(self.synthetic.assets) if self.synthetic else 0,
                tick_changes=self.tick_changes,
            )
            self._nursery = nursery
            nursery.start_soon(self._play)
            task_status.started(self)

    async def close_clients(self, reason: str = "replay finished", code: int = 1001) -> int:
        """
        Close every open connection with ``code`` (1001, going away), waiting at
        most 5 s for the closing handshakes; returns how many were closed.
        """
        clients = [*self._clients, *self._muted]
        with trio.move_on_after(5):
            async with trio.open_nursery() as nursery:
                for client in clients:
                    nursery.start_soon(client.ws.aclose, code, reason)
        return len(clients)

    # --- faults (module docstring, "Faults") ---

    def _targets(self, clients: Collection[int] | None) -> list[_Client]:
        """Open, not yet dropped connections; all, or those numbered in ``clients``."""
        return [
            c
            for c in (*self._clients, *self._muted)
            if not c.closed and c.mode != "dropped" and (clients is None or c.number in clients)
        ]

    def _mute(self, client: _Client, mode: str, *, clear: bool = True) -> None:
        """
        Take ``client`` off the tape: it gets no frame from now on, and is not
        waited for. ``clear=False`` still writes what is queued.
        """
        client.mode = mode
        if client in self._clients:
            self._clients.discard(client)
            self._muted.add(client)
        if clear:
            client.outbox.clear()
        client.close_space()

    def _record(self, action: str, clients: Iterable[_Client]) -> list[_Client]:
        hit = list(clients)
        self.stats.faults[action] += 1
        self.fault_log.append(
            FaultRecord(
                action, time.monotonic(), tuple(c.number for c in hit), self.tape.frames_played
            )
        )
        logger.info("replay_fault", action=action, clients=[c.number for c in hit])
        return hit

    async def drop(
        self,
        how: DropMode = "tcp",
        *,
        clients: Collection[int] | None = None,
        code: int = 1011,
        reason: str = "replay fault",
    ) -> int:
        """
        End connections abruptly: all, or those numbered in ``clients``; returns
        how many. They get no frame after this call. ``how``:

        * ``"tcp"``: close the TCP connection (FIN) without a close frame; the
          client sees an abnormal closure (1006);
        * ``"reset"``: the same with a RST (``SO_LINGER`` 0);
        * ``"close"``: a WebSocket close frame with ``code`` and ``reason``,
          waiting at most 2 s for the client's answer.

        Returns once every socket is closed.
        """
        targets = self._record(f"drop-{how}", self._targets(clients))
        for client in targets:
            self._mute(client, "dropped")
        async with trio.open_nursery() as nursery:
            for client in targets:
                nursery.start_soon(self._close, client, how, code, reason)
        return len(targets)

    def drop_soon(self, how: DropMode = "tcp", *, clients: Collection[int] | None = None) -> int:
        """:meth:`drop` from synchronous code: connections are muted now, closed just after."""
        targets = self._record(f"drop-{how}", self._targets(clients))
        for client in targets:
            self._mute(client, "dropped")
            if client.nursery is not None:
                client.nursery.start_soon(self._close, client, how, 1011, "replay fault")
        return len(targets)

    async def _close(self, client: _Client, how: DropMode, code: int, reason: str) -> None:
        if how == "close":
            with trio.move_on_after(2):
                await client.ws.aclose(code, reason)
        await _abort_stream(client.ws, reset=how == "reset")

    def half_open(self, *, clients: Collection[int] | None = None) -> int:
        """
        Make connections half-open: the socket stays open but they get nothing
        any more, ``PONG`` included (what a dead link looks like to the client).
        trio-websocket still answers protocol-level pings and a close frame.
        Returns how many connections were hit.
        """
        targets = self._record("half-open", self._targets(clients))
        for client in targets:
            self._mute(client, "half_open")
        return len(targets)

    def silence(self, *, clients: Collection[int] | None = None) -> int:
        """
        A silent feed: connections keep answering ``PING`` with ``PONG`` but get
        no data frame any more (the RTDS failure mode, protocol.md, section 5).
        The tape goes on without them; a new connection is served normally.
        """
        targets = self._record("silence", self._targets(clients))
        for client in targets:
            self._mute(client, "silent")
        return len(targets)

    def heal(self, *, clients: Collection[int] | None = None) -> int:
        """
        End ``silence`` / ``half_open`` on open connections: they get the tape's
        frames again from the next one (frames missed meanwhile are not sent).
        """
        healed = [c for c in self._targets(clients) if c.mode in ("silent", "half_open")]
        for client in self._record("heal", healed):
            client.mode = "normal"
            self._muted.discard(client)
            self._clients.add(client)
        return len(healed)

    def stall(self, *, clients: Collection[int] | None = None) -> int:
        """
        Stall mid-frame: write the header and half the payload of one frame
        (the books of the client's assets, as a snapshot array) and then
        nothing: no data, no ``PONG``. The client's WebSocket reader waits for
        the rest of the frame. Later bytes trio-websocket writes by itself (the
        answer to a close frame) land inside that frame's payload, so the
        client never sees them either.
        """
        targets = self._record("stall", self._targets(clients))
        for client in targets:
            self._mute(client, "stalled")
            if client.nursery is not None:
                client.nursery.start_soon(self._write_partial_frame, client)
        return len(targets)

    async def _write_partial_frame(self, client: _Client) -> None:
        books = [b for a in sorted(client.subscribed) if (b := self.tape.snapshot(a)) is not None]
        payload = orjson.dumps(books or [{"event_type": "book", "padding": "x" * 4096}])
        frame = ws_frame(payload)
        await _write_raw(client.ws, frame[: len(frame) - len(payload) // 2])

    def inject(
        self,
        frames: Iterable[str | bytes | RawFrame],
        *,
        clients: Collection[int] | None = None,
    ) -> int:
        """
        Queue ``frames`` to connections being served normally (text, binary, or
        raw wire bytes), between two tape frames; returns how many connections.
        """
        items = list(frames)
        targets = [c for c in self._targets(clients) if c.mode == "normal"]
        for client in targets:
            for item in items:
                client.push(item)
        return len(targets)

    def inject_garbage(
        self,
        kinds: Iterable[str] | None = None,
        *,
        clients: Collection[int] | None = None,
        asset_ids: Iterable[str] | None = None,
    ) -> dict[int, list[Garbage]]:
        """
        Queue one bad input of each of ``kinds`` (:func:`garbage_frames`;
        default: all but ``not_utf8_text``) to each connection served normally,
        about one of its assets (restricted to ``asset_ids`` when given).
        Returns connection number -> what it was sent (a connection without
        such an asset gets nothing and is left out).

        A connection sent ``not_utf8_text`` is taken off the tape afterwards
        (mode ``poisoned``; it still answers ``PING``): the client must fail
        it (RFC 6455, section 8.1), and one that does so without closing the
        socket must not hold the tape up for everyone else.

        Raises:
            ReplayError: an unknown kind.
        """
        chosen = None if kinds is None else list(kinds)
        if chosen is not None and (unknown := set(chosen) - GARBAGE_KINDS.keys()):
            raise ReplayError(f"garbage: unknown kinds {sorted(unknown)}")
        allowed = None if asset_ids is None else set(asset_ids)
        sent: dict[int, list[Garbage]] = {}
        targets = [c for c in self._targets(clients) if c.mode == "normal"]
        for client in self._record("garbage", targets):
            assets = client.subscribed if allowed is None else client.subscribed & allowed
            try:
                garbage = garbage_frames(self.tape, assets, chosen)
            except ReplayError as exc:  # e.g. no two-sided book yet: nothing to spoil
                logger.info("replay_garbage_skipped", client=client.number, reason=str(exc))
                continue
            for item in garbage:
                for frame in item.frames:
                    client.push(frame)
                self.stats.garbage_sent[item.kind] += 1
            sent[client.number] = garbage
            if any(item.kind == "not_utf8_text" for item in garbage):
                self._mute(client, "poisoned", clear=False)
        return sent

    def pause(self, duration: float = 0.0) -> None:
        """
        Hold the tape (a quiet market): connections stay open, answer ``PING``
        and get nothing new; with ``duration`` > 0 it resumes by itself then.
        Pacing resumes where it stopped (the schedule shifts by the pause).
        """
        self._record("pause", [])
        self.paused = True
        if duration > 0 and self._nursery is not None:
            self._nursery.start_soon(self._resume_after, duration)

    async def _resume_after(self, duration: float) -> None:
        await trio.sleep(duration)
        self.resume()

    def resume(self, *, speed: float | None = None) -> None:
        """
        Let a paused tape go on; with ``speed`` (> 0), paced from here at
        ``speed`` times the recorded pace instead of as before (a test can
        run to a moment at maximum speed, then watch it at a pace a client
        keeps up with).
        """
        if speed is not None:
            self.max_speed = False
            self._repace = speed
        self.paused = False
        self._resumed.set()
        self._resumed = trio.Event()

    def _scheduled(self, fault: ScheduledFault) -> None:
        """Apply a :class:`ScheduledFault` that came due (no checkpoint)."""
        action = fault.action
        if action.startswith("drop-"):
            how = action.removeprefix("drop-")
            assert how in DROP_MODES
            self.drop_soon(how)
        elif action == "half-open":
            self.half_open()
        elif action == "silence":
            self.silence()
        elif action == "stall":
            self.stall()
        elif action == "garbage":
            self.inject_garbage(asset_ids=self.garbage_assets)
        elif action == "pause":
            self.pause(fault.duration)

    # --- CLOB REST (module docstring, "CLOB REST") ---

    def rest_book(self, token_id: str) -> Event | None:
        """
        The CLOB's ``GET /book`` answer for ``token_id`` from the tape's current
        book (a synthetic copy's from its original's), or None for an asset the
        server does not know.

        Shape (protocol.md, section 8): ``{market, asset_id, timestamp (ms
        string), hash, bids (ascending price), asks (descending price),
        min_order_size "5", tick_size, neg_risk false, last_trade_price}``;
        ``hash`` is :func:`book_hash` of those fields, so it equals the hash
        of the WebSocket snapshot of the same book state.
        """
        snapshot = self._book_event(token_id)
        if snapshot is None:
            return None
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

    def rest_top(self, token_id: str) -> tuple[str | None, str | None]:
        """Best bid and ask price texts of ``token_id`` (copies: their original's), None if empty."""
        label = self.synthetic.assets.get(token_id) if self.synthetic is not None else None
        return self.tape.top(label.original if label is not None else token_id)

    async def rest_app(self, scope: _Scope, receive: _Receive, send: _Send) -> None:
        """
        An ASGI app answering like the CLOB REST API (protocol.md, section 8)
        from the tape's current state; serve it with :meth:`serve`
        (``rest_port``) or :func:`polystream.health.serve_asgi`:

        * ``GET /book?token_id=T``: :meth:`rest_book`; 404 ``{"error": ...}``
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
        is recorded (:attr:`rest_requests`); :attr:`rest_fail_next` injects failures.
        """
        if scope["type"] == "lifespan":
            await answer_lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        data = await _read_body(receive)
        body, parsed = _parse_json(data)
        method, path = str(scope["method"]), str(scope["path"])
        query = bytes(scope.get("query_string", b"")).decode("latin-1")
        if self.rest_fail_next:
            status, answer = self.rest_fail_next.pop(0), {"error": "injected"}
        else:
            status, answer = self._rest_answer(method, path, query, body if parsed else _INVALID)
        self.rest_requests.append(RestRequest(method, path, query, body, time.monotonic(), status))
        self.stats.rest_requests += 1
        self._rest_arrived.unpark_all()
        headers = [(b"content-type", b"application/json")]
        if status == 429:
            headers.append((b"retry-after", b"0"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": orjson.dumps(answer)})

    async def wait_rest_requests(
        self, count: int = 1, *, path: str | None = None
    ) -> list[RestRequest]:
        """
        Wait until at least ``count`` REST requests (to ``path``, when given)
        were answered; returns those requests, in order.
        """
        while len(done := [r for r in self.rest_requests if path in (None, r.path)]) < count:
            await self._rest_arrived.park()
        return done

    def _rest_answer(self, method: str, path: str, query: str, body: Any) -> tuple[int, Any]:
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

    def _get_book(self, query: str, body: Any) -> tuple[int, Any]:
        token_id = parse_qs(query).get("token_id", [""])[0]
        if not token_id:
            return 400, {"error": "token_id is required"}
        book = self.rest_book(token_id)
        if book is None:
            return 404, {"error": "No orderbook exists for the requested token id"}
        return 200, book

    def _post_books(self, query: str, body: Any) -> tuple[int, Any]:
        items = _rest_items(body)
        if isinstance(items, str):
            return 400, {"error": items}
        if len(items) > MAX_BOOKS_PER_REQUEST:
            return 400, {"error": f"too many token ids: {len(items)} > {MAX_BOOKS_PER_REQUEST}"}
        books = (self.rest_book(item["token_id"]) for item in items)
        return 200, [book for book in books if book is not None]

    def _post_prices(self, query: str, body: Any) -> tuple[int, Any]:
        items = _rest_items(body, sides=True)
        if isinstance(items, str):
            return 400, {"error": items}
        answer: dict[str, dict[str, str]] = {}
        for item in items:
            token_id, side = item["token_id"], item["side"]
            bid, ask = self.rest_top(token_id)
            price = bid if side == "BUY" else ask
            if price is not None:
                answer.setdefault(token_id, {})[side] = price
        return 200, answer

    def _post_midpoints(self, query: str, body: Any) -> tuple[int, Any]:
        items = _rest_items(body)
        if isinstance(items, str):
            return 400, {"error": items}
        answer: dict[str, str] = {}
        for item in items:
            bid, ask = self.rest_top(item["token_id"])
            if bid is not None and ask is not None:
                answer[item["token_id"]] = _decimal_text((Decimal(bid) + Decimal(ask)) / 2)
        return 200, answer

    # --- the tape loop ---

    async def _play(self) -> None:
        if self.start_when_subscribed:
            await self.tape_started.wait()
        self.tape_started.set()
        log = logger.bind(url=self.url)
        log.info("replay_started", clients=len(self._clients))
        recorded = self.tape.capture.frames
        frames: Sequence[Frame] = recorded
        schedule = self.tape.capture.schedule(self.speed)
        span_ms = recorded[-1].time_ms - recorded[0].time_ms + 1000 if recorded else 0
        begun = trio.current_time()
        while True:
            await self._play_pass(frames, schedule)
            if not self.loop:
                break
            self.tape.laps += 1
            log.info("replay_lap", laps=self.tape.laps)
            # A new lap is later in time: a consumer rightly drops events older than
            # what it holds, so every timestamp moves on by the capture's span.
            frames = [shift_frame(f, self.tape.laps * span_ms) for f in recorded]
        self.tape.laps += 1
        for client in list(self._clients):
            await client.wait_drained()
        self.tape.finished.set()
        elapsed = trio.current_time() - begun
        log.info(
            "replay_finished",
            frames=self.tape.frames_played,
            events=self.tape.events_played,
            frames_sent=self.stats.frames_sent,
            events_sent=self.stats.events_sent,
            connections=self.stats.connections,
            elapsed_s=round(elapsed, 3),
            frames_per_s=round(self.tape.frames_played / elapsed) if elapsed > 0 else None,
        )

    async def _play_pass(self, frames: Sequence[Frame], schedule: Sequence[float]) -> None:
        start = trio.current_time()
        for index, frame in enumerate(frames):
            self.tape.position = index
            if self.paused:
                start += await self._wait_resumed()
            if self._repace is not None:  # resumed at a new pace: this frame is due now
                schedule = self.tape.capture.schedule(self._repace)
                start = trio.current_time() - schedule[index]
                self._repace = None
            if self.max_speed:
                await trio.lowlevel.checkpoint()
            else:
                await trio.sleep_until(start + schedule[index])
            for client in list(self._clients):
                await client.wait_room()
            self._dispatch(frame, index)
            if self.faults:
                for fault in self.faults:
                    if fault.due(index + 1):
                        self._scheduled(fault)
        self.tape.position = len(frames)

    async def _wait_resumed(self) -> float:
        """Wait while paused; returns the seconds waited (the schedule shifts by them)."""
        began = trio.current_time()
        while self.paused:
            await self._resumed.wait()
        return trio.current_time() - began

    def _dispatch(self, frame: Frame, index: int) -> None:
        """
        Apply ``frame`` (index ``index`` of its pass), queue it to every client,
        preceded by the tick changes it calls for (``tick_changes``); no
        checkpoint, so atomic w.r.t. subscribes and REST requests.
        """
        self.tape.apply(frame)
        if self.tick_changes:
            for change in self.tape.tick_crossings(frame, index):
                self._send_tick_change(change)
        self._send(frame)

    def _send_tick_change(self, change: TickChange) -> None:
        """Record ``change`` and queue its ``tick_size_change`` to the clients holding the asset."""
        clients = tuple(sorted(c.number for c in self._clients if change.asset_id in c.subscribed))
        self.tick_change_log.append(attrs.evolve(change, clients=clients))
        logger.info(
            "replay_tick_size_change",
            asset_id=change.asset_id,
            old_tick_size=change.old_tick_size,
            new_tick_size=change.new_tick_size,
            frame=change.frame,
            clients=len(clients),
        )
        before = self.stats.events_sent
        self._send(change.frame_of())
        self.stats.tick_size_changes_sent += self.stats.events_sent - before

    def _send(self, frame: Frame) -> None:
        """Queue ``frame`` to every client, filtered to its assets (copies relabelled)."""
        stats = self.stats
        for client in self._clients:
            subscribed = client.subscribed
            if frame.plain:
                if frame.asset_ids <= subscribed:
                    client.push(frame.text)
                    stats.frames_sent += 1
                    stats.events_sent += len(frame.events)
                    continue
                if frame.asset_ids.isdisjoint(subscribed):
                    continue
            events = _filter_events(frame, subscribed, client.custom)
            if events:
                client.push(_encode(events if frame.is_array else events[0]))
                stats.frames_sent += 1
                stats.events_sent += len(events)
        if self.synthetic is not None and self.synthetic_events:
            for client in self._clients:
                if client.copy_origins and any(a in client.copy_origins for a in frame.asset_ids):
                    self._dispatch_copies(frame, client, self.synthetic)

    def _dispatch_copies(self, frame: Frame, client: _Client, synthetic: Synthetic) -> None:
        """Queue the events of ``frame`` re-labelled for each copy ``client`` holds, as one array."""
        copies: set[int] = set()
        for asset_id in frame.asset_ids:
            copies.update(client.copy_origins.get(asset_id, ()))
        parts: list[str] = []
        count = 0
        for copy in sorted(copies):
            originals = client.copies[copy]
            events = _filter_events(frame, originals, client.custom, venue_wide=False)
            if not events:
                continue
            text = _encode(events)[1:-1]
            markets: set[str] = set()
            for original in frame.asset_ids & originals:
                label = synthetic.by_copy[copy, original]
                text = text.replace(f'"{original}"', f'"{label.asset_id}"')
                if label.original_market not in markets:
                    markets.add(label.original_market)
                    text = text.replace(f'"{label.original_market}"', f'"{label.market}"')
            parts.append(text)
            count += len(events)
        if parts:
            client.push("[" + ",".join(parts) + "]")
            self.stats.frames_sent += 1
            self.stats.events_sent += count
            self.stats.synthetic_events_sent += count

    # --- connections ---

    async def _serve_client(self, request: WebSocketRequest) -> None:
        status = self.refusing
        if not status and self.storm_limit and self._storm(time.monotonic()):
            status = 429
        if status:
            self.stats.rejected += 1
            self._record(f"reject-{status}", [])
            try:
                await request.reject(status, body=b"Too Many Requests" if status == 429 else None)
            except ConnectionClosed:
                pass
            return
        try:
            ws = await request.accept()
        except ConnectionClosed:
            return
        self.stats.connections += 1
        client = _Client(ws=ws, capacity=self.outbox_frames, number=self.stats.connections)
        if self.record:
            client.log = ConnectionLog(
                number=client.number, opened_at=time.monotonic(), subscribed=client.subscribed
            )
            client.on_snapshots_sent = self._snapshots_sent
            self.connection_logs.append(client.log)
        log = logger.bind(client=client.number)
        log.info("replay_client_connected", path=request.path)
        self._clients.add(client)
        try:
            async with trio.open_nursery() as nursery:
                client.nursery = nursery
                nursery.start_soon(client.write_loop)
                await self._read_loop(client)
        except* ConnectionClosed:
            pass
        except* Exception:  # a supervisor: one bad connection must not stop the server
            log.exception("replay_client_failed")
        finally:
            client.close()
            self._clients.discard(client)
            self._muted.discard(client)
            if client.log is not None:
                client.log.closed_at = time.monotonic()
            log.info("replay_client_disconnected", subscribed=len(client.subscribed))

    def _storm(self, now: float) -> bool:
        """Whether a handshake now exceeds ``storm_limit``; else count it as accepted."""
        accepted = self._accepted_at
        while accepted and now - accepted[0] > self.storm_window:
            accepted.popleft()
        if len(accepted) >= self.storm_limit:
            return True
        accepted.append(now)
        return False

    def _oversized(self, client: _Client, size: int, assets: list[str]) -> bool:
        """Whether a subscribe is over the limits; if so, close the connection a little later."""
        if not (
            (self.max_subscribe_bytes and size > self.max_subscribe_bytes)
            or (self.max_subscribe_ids and len(assets) > self.max_subscribe_ids)
        ):
            return False
        self.stats.oversized_subscribes += 1
        self._record("oversize-close", [client])
        if client.nursery is not None and client.mode != "dropped":
            client.nursery.start_soon(self._close_later, client)
        return True

    async def _close_later(self, client: _Client) -> None:
        await trio.sleep(self.oversize_close_delay)
        if client.mode != "dropped":
            self._mute(client, "dropped")
            await self._close(client, self.oversize_close, 1009, "subscribe too large")

    def _snapshots_sent(self, log: ConnectionLog, asset_ids: tuple[str, ...]) -> None:
        now = time.monotonic()
        for asset_id in asset_ids:
            log.snapshots[asset_id] = now
            self.snapshot_times[asset_id] = now

    async def _read_loop(self, client: _Client) -> None:
        while True:
            message = await client.ws.get_message()
            received_at = time.monotonic()
            await client.wait_room()
            self._on_message(client, message, received_at)

    def _on_message(
        self, client: _Client, message: str | bytes, received_at: float | None = None
    ) -> None:
        """
        Handle one client message (no checkpoint: snapshots match the frames that
        follow). ``received_at`` (``time.monotonic()``, default now) is when it was read.
        """
        stats = self.stats
        stats.messages_received += 1
        size = (
            len(message)
            if isinstance(message, bytes) or message.isascii()
            else len(message.encode("utf-8", "surrogatepass"))
        )
        stats.max_message_bytes = max(stats.max_message_bytes, size)
        if isinstance(message, bytes):
            self.stats.messages_ignored += 1
            return
        if message == "PING":
            if client.mode in ("normal", "silent", "poisoned"):
                client.push("PONG")
            return
        try:
            request = orjson.loads(message)
        except orjson.JSONDecodeError:
            self.stats.messages_ignored += 1
            if message.lstrip()[:1] in ("{", "["):
                self.stats.invalid_json += 1
            return
        assets = request.get("assets_ids") if isinstance(request, dict) else None
        if not isinstance(assets, list) or not all(isinstance(a, str) for a in assets):
            self.stats.messages_ignored += 1
            return
        operation = request.get("operation")
        limited = self.max_subscribe_bytes or self.max_subscribe_ids
        if limited and operation != "unsubscribe" and self._oversized(client, size, assets):
            return
        if operation == "unsubscribe":
            self._unsubscribe(client, assets)
        elif operation == "subscribe" or (operation is None and "type" in request):
            if operation is None:
                if client.typed:
                    client.push("INVALID OPERATION")
                    return
                client.typed = True
            self._subscribe(client, assets, request)
        else:
            self.stats.messages_ignored += 1
            return
        stats.max_request_assets = max(stats.max_request_assets, len(assets))
        stats.max_subscribed = max(stats.max_subscribed, len(client.subscribed))
        if client.log is not None:
            now = time.monotonic() if received_at is None else received_at
            client.log.requests.append(
                RequestRecord(now, size, operation or "type", tuple(assets), len(client.subscribed))
            )
            if operation != "unsubscribe":
                self.subscribe_times.update(dict.fromkeys(assets, now))

    def _unsubscribe(self, client: _Client, assets: list[str]) -> None:
        client.subscribed.difference_update(assets)
        if self.synthetic is not None and client.copy_origins:
            for asset_id in assets:
                label = self.synthetic.assets.get(asset_id)
                if label is not None:
                    client.remove_copy(label)

    def _subscribe(self, client: _Client, assets: list[str], request: Event) -> None:
        if request.get("custom_feature_enabled") is True:
            client.custom = True
        new = [a for a in dict.fromkeys(assets) if a not in client.subscribed]
        client.subscribed.update(new)
        labels = self.synthetic.assets if self.synthetic is not None else {}
        if labels:
            for asset_id in new:
                if (label := labels.get(asset_id)) is not None:
                    client.add_copy(label)
        if assets:
            self.tape_started.set()
        if request.get("initial_dump", True) is False or client.mode != "normal":
            return
        books: list[Event] = []
        synthetic_books = 0
        for asset_id in new:
            book = self._book_event(asset_id)
            if book is not None:
                books.append(book)
                synthetic_books += asset_id in labels
        if books:
            text = _encode(books)
            if client.log is not None:
                client.push(_Snapshots(text, tuple(b["asset_id"] for b in books)))
            else:
                client.push(text)
            self.stats.snapshots_sent += len(books)
            self.stats.synthetic_snapshots_sent += synthetic_books

    def _book_event(self, asset_id: str) -> Event | None:
        """The current ``book`` of ``asset_id``, recorded or synthetic; None if unknown."""
        label = self.synthetic.assets.get(asset_id) if self.synthetic is not None else None
        if label is None:
            return self.tape.snapshot(asset_id)
        return self.tape.snapshot(label.original, label=label)


def _encode(value: Any) -> str:
    return orjson.dumps(value).decode()


# --- CLOB REST helpers ---------------------------------------------------------------

MAX_BOOKS_PER_REQUEST = 500
"""Most items in one ``POST /books`` body; more is answered 400 (protocol.md, section 8)."""

_Scope = dict[str, Any]
_Receive = Callable[[], Awaitable[dict[str, Any]]]
_Send = Callable[[dict[str, Any]], Awaitable[None]]
_INVALID = object()
"""A request body that is not JSON."""


async def _read_body(receive: _Receive) -> bytes:
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


# --- entry points --------------------------------------------------------------------


async def serve_replay(
    paths: Sequence[Path],
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    speed: float = 1.0,
    max_speed: bool = False,
    loop: bool = False,
    start_when_subscribed: bool = True,
    synthesize: int = 0,
    synthetic_events: bool = True,
    record: bool = False,
    faults: Sequence[ScheduledFault] = (),
    max_subscribe_bytes: int = 0,
    max_subscribe_ids: int = 0,
    oversize_close_delay: float = 0.15,
    storm_limit: int = 0,
    storm_window: float = 1.0,
    tick_changes: bool = False,
    rest_port: int | None = None,
    task_status: trio.TaskStatus[ReplayServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """
    Load captures and serve them as Polymarket's market channel until cancelled.

    ``task_status.started(server)`` is called once listening; ``server.port`` is
    the bound port and ``server.finished`` is set at the end of the tape. With
    ``start_when_subscribed`` the tape waits for the first subscribe naming an
    asset, so a client started after the server misses nothing. ``synthesize``
    adds that many synthetic assets (``server.synthetic``; module docstring),
    ``synthetic_events`` forwards events to them, ``record`` keeps per-connection
    request and snapshot logs (:attr:`ReplayServer.connection_logs`).
    ``tick_changes`` emits the venue's ``tick_size_change`` events (module
    docstring, "Tick sizes"); ``rest_port`` (0 = a free port) also serves the
    CLOB REST app (:meth:`ReplayServer.rest_app`; ``server.rest_url``). The
    fault options are :class:`ReplayServer`'s attributes of the same names
    (module docstring, "Faults").

    Raises:
        ReplayError: a capture cannot be loaded (see :meth:`Capture.load`), or
            ``synthesize`` is negative.
    """
    # Loading blocks the event loop once, before anything else runs in it.
    server = _build_server(
        paths,
        speed=speed,
        max_speed=max_speed,
        loop=loop,
        start_when_subscribed=start_when_subscribed,
        synthesize=synthesize,
        synthetic_events=synthetic_events,
        record=record,
        faults=tuple(faults),
        max_subscribe_bytes=max_subscribe_bytes,
        max_subscribe_ids=max_subscribe_ids,
        oversize_close_delay=oversize_close_delay,
        storm_limit=storm_limit,
        storm_window=storm_window,
        tick_changes=tick_changes,
    )
    await server.serve(host=host, port=port, rest_port=rest_port, task_status=task_status)


def _build_server(
    paths: Iterable[Path],
    *,
    speed: float,
    max_speed: bool,
    loop: bool,
    start_when_subscribed: bool,
    synthesize: int,
    synthetic_events: bool,
    record: bool = False,
    faults: tuple[ScheduledFault, ...],
    max_subscribe_bytes: int,
    max_subscribe_ids: int,
    oversize_close_delay: float,
    storm_limit: int,
    storm_window: float,
    tick_changes: bool = False,
) -> ReplayServer:
    """Load the captures and build the server both entry points run."""
    capture = Capture.load(list(paths))
    return ReplayServer(
        tape=Tape(capture),
        speed=speed,
        max_speed=max_speed,
        loop=loop,
        start_when_subscribed=start_when_subscribed,
        synthetic=Synthetic.build(capture.markets, synthesize) if synthesize else None,
        synthetic_events=synthetic_events,
        record=record,
        faults=faults,
        max_subscribe_bytes=max_subscribe_bytes,
        max_subscribe_ids=max_subscribe_ids,
        oversize_close_delay=oversize_close_delay,
        storm_limit=storm_limit,
        storm_window=storm_window,
        tick_changes=tick_changes,
    )


def run_replay_cli(
    paths: Iterable[Path],
    host: str = "127.0.0.1",
    port: int = 8765,
    speed: float = 1.0,
    max_speed: bool = False,
    loop: bool = False,
    *,
    start_when_subscribed: bool = True,
    exit_at_end: bool = False,
    synthesize: int = 0,
    synthetic_events: bool = True,
    faults: Sequence[str] = (),
    max_subscribe_bytes: int = 0,
    max_subscribe_ids: int = 0,
    oversize_close_delay: float = 0.15,
    storm_limit: int = 0,
    storm_window: float = 1.0,
    tick_changes: bool = False,
    rest_port: int | None = None,
) -> None:
    """
    Run the replay server (``polystream replay PATH...``) until Ctrl-C.

    Logs ``replay_listening`` with the URL, then ``replay_finished`` with a
    summary at the end of the tape. The server keeps serving the final books
    afterwards unless ``exit_at_end``. ``synthesize`` adds that many synthetic
    assets (module docstring), ``synthetic_events`` forwards events to them.
    ``faults`` are ``--fault`` specs (:meth:`ScheduledFault.parse`); the other
    fault options are :class:`ReplayServer`'s attributes of the same names.
    ``tick_changes`` (``--tick-changes``) emits ``tick_size_change`` events;
    ``rest_port`` (``--rest-port``, 0 = a free port) also serves the CLOB
    REST app, its URL logged as ``rest_url`` in ``replay_listening``.
    Configure structlog before calling.

    Raises:
        ReplayError: a capture cannot be loaded, ``synthesize`` is negative, a
            fault spec is malformed, or the address cannot be bound.
    """
    server = _build_server(
        paths,
        speed=speed,
        max_speed=max_speed,
        loop=loop,
        start_when_subscribed=start_when_subscribed,
        synthesize=synthesize,
        synthetic_events=synthetic_events,
        faults=tuple(ScheduledFault.parse(spec) for spec in faults),
        max_subscribe_bytes=max_subscribe_bytes,
        max_subscribe_ids=max_subscribe_ids,
        oversize_close_delay=oversize_close_delay,
        storm_limit=storm_limit,
        storm_window=storm_window,
        tick_changes=tick_changes,
    )

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(server.serve, host=host, port=port, rest_port=rest_port))
            if exit_at_end:
                await server.finished.wait()
                await server.close_clients()
                nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    except* OSError as group:
        reasons = "; ".join(str(exc) for exc in _leaves(group))
        raise ReplayError(f"cannot serve on {host}:{port}: {reasons}") from group
    except* KeyboardInterrupt:
        logger.info("replay_stopped")


def _leaves(error: BaseException) -> Iterable[BaseException]:
    """The exceptions inside (nested) exception groups."""
    if isinstance(error, BaseExceptionGroup):
        for inner in error.exceptions:
            yield from _leaves(inner)
    else:
        yield error
