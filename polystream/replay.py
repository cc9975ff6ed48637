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
"""

from __future__ import annotations

import gzip
import hashlib
import heapq
import zlib
from collections import deque
from collections.abc import Iterable, Sequence
from decimal import Decimal, InvalidOperation
from functools import partial
from pathlib import Path
from typing import Any

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

__all__ = [
    "Capture",
    "Frame",
    "ReplayServer",
    "ReplayStats",
    "Tape",
    "run_replay_cli",
    "serve_replay",
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
    """

    frames: tuple[Frame, ...]
    markets: dict[str, str]
    paths: tuple[Path, ...]

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
        return cls(frames=frames, markets=markets, paths=tuple(Path(p) for p in paths))

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


# --- books ---------------------------------------------------------------------------


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

    def change(self, price: str, size: str, side: str) -> None:
        levels = self.bids if side.upper() == "BUY" else self.asks
        key = Decimal(price)
        if Decimal(size) == 0:
            levels.pop(key, None)
        else:
            levels[key] = (price, size)

    def snapshot(self, asset_id: str, timestamp: str) -> Event:
        """The book as the real server's initial dump shows it (bids ascending, asks descending)."""
        bids = [{"price": p, "size": s} for _, (p, s) in sorted(self.bids.items())]
        asks = [{"price": p, "size": s} for _, (p, s) in sorted(self.asks.items(), reverse=True)]
        digest = hashlib.sha1(orjson.dumps([self.market, asset_id, bids, asks])).hexdigest()
        return {
            "market": self.market,
            "asset_id": asset_id,
            "timestamp": self.timestamp or timestamp,
            "hash": digest,
            "bids": bids,
            "asks": asks,
            "tick_size": self.tick_size or self._inferred_tick_size(),
            "event_type": "book",
            "last_trade_price": self.last_trade_price,
        }

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

    def apply(self, frame: Frame) -> None:
        """Apply ``frame`` to the books and count it as played."""
        self._books.apply(frame)
        self._time_ms = frame.time_ms
        self.frames_played += 1
        self.events_played += len(frame.events)

    def knows(self, asset_id: str) -> bool:
        """Whether the capture has any event of ``asset_id``."""
        return asset_id in self.capture.markets

    def snapshot(self, asset_id: str) -> Event | None:
        """
        The current ``book`` event of ``asset_id``, or None when the capture never names it.

        An asset that has no book yet (trades only, or before its first
        snapshot) gets empty ``bids`` / ``asks`` and its last trade price.
        """
        market = self.capture.markets.get(asset_id)
        if market is None:
            return None
        book = self._books.books.get(asset_id) or _Book(market=market)
        now = self._time_ms if self._time_ms is not None else self.capture.frames[0].time_ms
        return book.snapshot(asset_id, str(now))


# --- connections ---------------------------------------------------------------------


@attrs.define(eq=False)
class _Client:
    """One connection: its subscriptions and its ordered, bounded outbox."""

    ws: WebSocketConnection
    capacity: int
    number: int
    subscribed: set[str] = attrs.Factory(set)
    custom: bool = False
    typed: bool = False
    closed: bool = False
    outbox: deque[str] = attrs.Factory(deque)
    sending: bool = False
    _data: trio.lowlevel.ParkingLot = attrs.field(factory=trio.lowlevel.ParkingLot, alias="_data")
    _space: trio.lowlevel.ParkingLot = attrs.field(factory=trio.lowlevel.ParkingLot, alias="_space")

    def push(self, text: str) -> None:
        """Queue ``text`` (no wait: callers wait for room first, and may overshoot by one)."""
        self.outbox.append(text)
        if self._data:
            self._data.unpark()

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
            try:
                await self.ws.send_message(self.outbox.popleft())
            finally:
                self.sending = False
            if len(self.outbox) <= low_water:
                self._space.unpark_all()

    def close(self) -> None:
        self.closed = True
        self.outbox.clear()
        self._space.unpark_all()
        self._data.unpark_all()


def _filter_events(frame: Frame, subscribed: set[str], custom: bool) -> list[Event]:
    """The events of ``frame`` one client may see; ``price_changes[]`` entries filtered too."""
    kept: list[Event] = []
    for event in frame.events:
        kind = event["event_type"]
        if kind in _VENUE_WIDE_EVENTS:
            if custom:
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
    """

    connections: int = 0
    frames_sent: int = 0
    events_sent: int = 0
    snapshots_sent: int = 0
    messages_ignored: int = 0
    invalid_json: int = 0


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
        host: listening address, set by :meth:`serve`.
        port: bound port, set by :meth:`serve` (useful with ``port=0``).
    """

    tape: Tape
    speed: float = attrs.field(default=1.0, validator=attrs.validators.gt(0.0))
    max_speed: bool = False
    loop: bool = False
    start_when_subscribed: bool = True
    outbox_frames: int = attrs.field(default=256, validator=attrs.validators.ge(2))
    max_message_size: int = MAX_MESSAGE_SIZE
    host: str = ""
    port: int = 0
    stats: ReplayStats = attrs.Factory(ReplayStats)
    tape_started: trio.Event = attrs.Factory(trio.Event)
    _clients: set[_Client] = attrs.field(factory=set, alias="_clients")

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
        task_status: trio.TaskStatus[ReplayServer] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """
        Listen on ``host:port`` and play the tape; runs until cancelled.

        Calls ``task_status.started(self)`` once listening, with :attr:`port` set.
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
            logger.info(
                "replay_listening",
                url=self.url,
                frames=len(self.tape.capture.frames),
                assets=len(self.tape.capture.markets),
                speed=None if self.max_speed else self.speed,
                loop=self.loop,
            )
            nursery.start_soon(self._play)
            task_status.started(self)

    async def close_clients(self, reason: str = "replay finished") -> None:
        """Close every connection with code 1001 (going away), waiting at most 5 s."""
        with trio.move_on_after(5):
            async with trio.open_nursery() as nursery:
                for client in list(self._clients):
                    nursery.start_soon(client.ws.aclose, 1001, reason)

    # --- the tape loop ---

    async def _play(self) -> None:
        if self.start_when_subscribed:
            await self.tape_started.wait()
        self.tape_started.set()
        log = logger.bind(url=self.url)
        log.info("replay_started", clients=len(self._clients))
        frames = self.tape.capture.frames
        schedule = self.tape.capture.schedule(self.speed)
        begun = trio.current_time()
        while True:
            await self._play_pass(frames, schedule)
            if not self.loop:
                break
            self.tape.laps += 1
            log.info("replay_lap", laps=self.tape.laps)
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
            if self.max_speed:
                await trio.lowlevel.checkpoint()
            else:
                await trio.sleep_until(start + schedule[index])
            for client in list(self._clients):
                await client.wait_room()
            self._dispatch(frame)
        self.tape.position = len(frames)

    def _dispatch(self, frame: Frame) -> None:
        """Apply ``frame``, queue it to every client; no checkpoint, so atomic w.r.t. subscribes."""
        self.tape.apply(frame)
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

    # --- connections ---

    async def _serve_client(self, request: WebSocketRequest) -> None:
        try:
            ws = await request.accept()
        except ConnectionClosed:
            return
        self.stats.connections += 1
        client = _Client(ws=ws, capacity=self.outbox_frames, number=self.stats.connections)
        log = logger.bind(client=client.number)
        log.info("replay_client_connected", path=request.path)
        self._clients.add(client)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client.write_loop)
                await self._read_loop(client)
        except* ConnectionClosed:
            pass
        except* Exception:  # a supervisor: one bad connection must not stop the server
            log.exception("replay_client_failed")
        finally:
            client.close()
            self._clients.discard(client)
            log.info("replay_client_disconnected", subscribed=len(client.subscribed))

    async def _read_loop(self, client: _Client) -> None:
        while True:
            message = await client.ws.get_message()
            await client.wait_room()
            self._on_message(client, message)

    def _on_message(self, client: _Client, message: str | bytes) -> None:
        """Handle one client message (no checkpoint: snapshots match the frames that follow)."""
        if isinstance(message, bytes):
            self.stats.messages_ignored += 1
            return
        if message == "PING":
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
        if operation == "unsubscribe":
            client.subscribed.difference_update(assets)
        elif operation == "subscribe" or (operation is None and "type" in request):
            if operation is None:
                if client.typed:
                    client.push("INVALID OPERATION")
                    return
                client.typed = True
            self._subscribe(client, assets, request)
        else:
            self.stats.messages_ignored += 1

    def _subscribe(self, client: _Client, assets: list[str], request: Event) -> None:
        if request.get("custom_feature_enabled") is True:
            client.custom = True
        new = [a for a in dict.fromkeys(assets) if a not in client.subscribed]
        client.subscribed.update(new)
        if assets:
            self.tape_started.set()
        if request.get("initial_dump", True) is False:
            return
        books = [book for a in new if (book := self.tape.snapshot(a)) is not None]
        if books:
            client.push(_encode(books))
            self.stats.snapshots_sent += len(books)


def _encode(value: Any) -> str:
    return orjson.dumps(value).decode()


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
    task_status: trio.TaskStatus[ReplayServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """
    Load captures and serve them as Polymarket's market channel until cancelled.

    ``task_status.started(server)`` is called once listening; ``server.port`` is
    the bound port and ``server.finished`` is set at the end of the tape. With
    ``start_when_subscribed`` the tape waits for the first subscribe naming an
    asset, so a client started after the server misses nothing.

    Raises:
        ReplayError: a capture cannot be loaded (see :meth:`Capture.load`).
    """
    # Loading blocks the event loop once, before anything else runs in it.
    capture = Capture.load(paths)
    server = ReplayServer(
        tape=Tape(capture),
        speed=speed,
        max_speed=max_speed,
        loop=loop,
        start_when_subscribed=start_when_subscribed,
    )
    await server.serve(host=host, port=port, task_status=task_status)


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
) -> None:
    """
    Run the replay server (``polystream replay PATH...``) until Ctrl-C.

    Logs ``replay_listening`` with the URL, then ``replay_finished`` with a
    summary at the end of the tape. The server keeps serving the final books
    afterwards unless ``exit_at_end``. Configure structlog before calling.

    Raises:
        ReplayError: a capture cannot be loaded, or the address cannot be bound.
    """
    server = ReplayServer(
        tape=Tape(Capture.load(list(paths))),
        speed=speed,
        max_speed=max_speed,
        loop=loop,
        start_when_subscribed=start_when_subscribed,
    )

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(server.serve, host=host, port=port))
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
