"""
The WebSocket feed: shards of at most ``feed.max_assets_per_connection``
assets, each one trio-websocket connection with its own reconnect loop.

Per connection (docs/protocol.md, "Subscribing" to "Heartbeat"):

* the first message is ``{"assets_ids": [...], "type": "market"}``, sent at
  once, in frames of at most ``feed.max_subscribe_bytes``: the first frame
  carries ``type``, the rest use ``operation: subscribe`` (a second ``type``
  message is answered ``INVALID OPERATION``);
* later changes are ``{"operation": "subscribe" | "unsubscribe", ...}``;
* text ``PING`` every ``feed.ping_interval`` seconds, answered ``PONG``;
* ``max_message_size`` is raised: an initial book dump can exceed 1 MiB.

The reader task only parses and hands events to the router over a bounded
channel; it never waits on the database. An optional :data:`FrameTap`
(``polystream record``) sees every message before it is parsed.

A big frame (at least :data:`BIG_FRAME_BYTES`: an initial dump, hundreds of
books in one JSON array) is parsed in slices of about :data:`SLICE_SECONDS`
of CPU with a checkpoint between them, and one big frame at a time in the
whole pool, from its parse until the router has applied it
(:class:`FrameEvents`): the loop never runs many shards' dumps in one trio
batch (each runnable task's step adds to the batch, so the loop lag is their
sum), parsed dumps do not pile up in front of the router, and a shard
waiting its turn leaves its socket unread (backpressure to TCP). With the
``sansio`` transport the turn starts when the frame's first
:data:`BIG_FRAME_BYTES` are read, not when it is whole
(:class:`~polystream.feed.transport.MessageGate`): a 10,000-asset dump is 50
frames of 1.5 MB arriving at once, and only one is in memory at a time.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Generator, Iterable, Sequence
from typing import Any

import attrs
import structlog
import trio

from polystream.config import FeedConfig
from polystream.errors import FeedClosed, FeedError, MalformedFrame, TransportError
from polystream.feed.heartbeat import Heartbeat
from polystream.feed.protocol import (
    BookSnapshot,
    FeedEvent,
    FrameParser,
    LastTradePrice,
    MarketResolved,
    NewMarket,
    ParsedFrame,
    PriceChange,
    chunk_asset_ids,
    encode_operation,
    encode_subscribe,
)
from polystream.feed.transport import (
    Message,
    MessageGate,
    Transport,
    connect_failure,
    open_transport,
)
from polystream.logs import RateLimitedLog
from polystream.stats import ShardStats, Stats
from polystream.timing import SLICE_SECONDS, Backoff

__all__ = [
    "BIG_FRAME_BYTES",
    "FEED_ERRORS",
    "SLICE_SECONDS",
    "FeedPool",
    "FrameEvents",
    "FrameTap",
    "Shard",
    "StaleCheck",
    "describe_failure",
    "filter_events",
]

logger = structlog.get_logger(__name__)

FEED_ERRORS = (OSError, trio.BrokenResourceError, FeedError)

StaleCheck = Callable[[list[str]], Awaitable[str | None]]
"""``await check(asset_ids)``: how those assets' prices moved (over REST), None if not."""
FrameTap = Callable[[Message, int], Awaitable[None]]
"""
``await tap(message, received_ms)``: every message a shard receives, as
received (see :data:`~polystream.feed.transport.Message`: ``PONG`` and bad
frames included), with when (unix milliseconds, ``time.time_ns()``), before it
is parsed; the shard reads on when it returns (it may wait: backpressure).
"""
_CLOSE_KINDS = {1007: "not_utf8", 1009: "frame_too_large"}  # RFC 6455, section 7.4.1
_REFUSED_WITHIN = 1.0  # seconds: a close frame this soon, before any data, refuses the subscribe
_MIN_SUBSCRIBE_BYTES = 200  # one 77-digit id and the envelope


BIG_FRAME_BYTES = 65_536
"""A frame this long or longer is parsed in slices, one such frame at a time (see above)."""


class FrameEvents(list[FeedEvent]):
    """
    One big frame's events for the router, with ``applied``: a
    :class:`trio.Event` the router sets once it has applied them all
    (:meth:`polystream.pipeline.router.Router.run`). The feed waits for it
    before the next big frame is parsed.
    """

    __slots__ = ("applied",)

    def __init__(self, events: Iterable[FeedEvent]) -> None:
        super().__init__(events)
        self.applied = trio.Event()


async def run_in_slices(steps: Generator[None, None, ParsedFrame]) -> ParsedFrame:
    """Drive :meth:`FrameParser.parse_in_slices`, checkpointing between slices."""
    try:
        while True:
            next(steps)
            await trio.lowlevel.checkpoint()
    except StopIteration as done:
        parsed: ParsedFrame = done.value
        return parsed


def describe_failure(exc: BaseException, url: str) -> str:
    """
    Why a connection to ``url`` failed or ended, in words an operator can act
    on (the transport's reason: "connection refused by host:port", "host not
    found: host", "HTTP 429 from host", "closed by the venue: 1008 ...",
    "connection lost"), or our own (an unanswered PING, a stale feed).
    """
    if isinstance(exc, TransportError | FeedClosed):
        return exc.reason
    if isinstance(exc, OSError):
        return connect_failure(exc, url)
    if isinstance(exc, trio.BrokenResourceError):
        return "connection lost (the socket broke)"
    return f"{type(exc).__name__}: {exc}"


@attrs.define(eq=False)
class Shard:
    """
    One connection's share of the assets.

    ``assets`` is what the shard should be subscribed to; ``pending_subscribe``
    and ``pending_unsubscribe`` are the changes not yet sent on the open
    connection (a reconnect sends ``assets`` whole and clears them).

    Control state is in trio seconds (``trio.current_time()``), so the
    refused-subscribe and staleness logic runs under ``MockClock``;
    :attr:`stats` is telemetry only.

    Attributes:
        subscribed_at: when the current connection's subscribe went out, or None.
        answered: a data frame (not ``PONG``) arrived since that subscribe.
        last_data_at: when the last data frame arrived, or None.
        subscribe_bytes: this shard's subscribe-frame cap; 0 = ``feed.max_subscribe_bytes``.
    """

    index: int
    stats: ShardStats
    assets: set[str] = attrs.field(factory=set)
    pending_subscribe: set[str] = attrs.field(factory=set)
    pending_unsubscribe: set[str] = attrs.field(factory=set)
    changed: trio.Event = attrs.field(factory=trio.Event)
    cancel_scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    subscribe_bytes: int = 0
    subscribed_at: float | None = None
    answered: bool = False
    last_data_at: float | None = None

    def add(self, asset_ids: Iterable[str]) -> None:
        """Subscribe ``asset_ids`` (sent on the open connection, or at connect)."""
        now = time.monotonic()
        for asset_id in asset_ids:
            self.assets.add(asset_id)
            self.stats.subscribed_at[asset_id] = now
            self.pending_unsubscribe.discard(asset_id)
            self.pending_subscribe.add(asset_id)
        self.stats.assets = len(self.assets)
        self.changed.set()

    def remove(self, asset_ids: Iterable[str]) -> None:
        """Unsubscribe ``asset_ids``; their events are dropped from now on."""
        for asset_id in asset_ids:
            self.assets.discard(asset_id)
            self.stats.seen_assets.discard(asset_id)
            self.stats.subscribed_at.pop(asset_id, None)
            self.pending_subscribe.discard(asset_id)
            self.pending_unsubscribe.add(asset_id)
        self.stats.assets = len(self.assets)
        self.changed.set()

    def take_initial(self) -> list[str]:
        """The full asset list for a new connection; clears pending changes."""
        self.pending_subscribe.clear()
        self.pending_unsubscribe.clear()
        self.changed = trio.Event()
        now = time.monotonic()
        self.stats.seen_assets.clear()  # coverage counts from this subscription
        self.stats.subscribed_at = dict.fromkeys(self.assets, now)
        return sorted(self.assets)


def filter_events(events: list[FeedEvent], assets: set[str]) -> tuple[list[FeedEvent], int]:
    """
    Keep the events of ``assets``; inside a ``price_change`` keep only their entries.

    The server can push ids that were not subscribed (docs/protocol.md, "Server messages").
    ``new_market``/``market_resolved`` are venue-wide and kept.

    Returns:
        The kept events and the number of events or entries dropped.
    """
    kept: list[FeedEvent] = []
    dropped = 0
    for event in events:
        if isinstance(event, PriceChange):
            for change in event.changes:
                if change.asset_id not in assets:
                    break
            else:  # every entry subscribed: the event as it is
                kept.append(event)
                continue
            changes = tuple(c for c in event.changes if c.asset_id in assets)
            dropped += len(event.changes) - len(changes)
            if changes:
                kept.append(PriceChange(event.condition_id, event.timestamp_ms, changes))
        elif isinstance(event, NewMarket | MarketResolved) or event.asset_id in assets:
            kept.append(event)
        else:
            dropped += 1
    return kept, dropped


@attrs.define(eq=False)
class FeedPool:
    """
    All shards. :meth:`set_assets` (sync, from the reconciler) moves the
    desired asset set; :meth:`run` starts new shards with a stagger and closes
    emptied ones.

    ``events`` carries each data frame's events (``list[FeedEvent]``); a big
    frame's come as :class:`FrameEvents`, whose ``applied`` the consumer (the
    router) must set once done with them: until then no other big frame is
    parsed and that shard reads nothing more.

    Assets stay in their shard while subscribed; new ones fill the
    lowest-numbered shard with room, else a new shard.

    ``tap`` (a :data:`FrameTap`, None: off) is awaited with each message
    before it is parsed.
    """

    config: FeedConfig
    events: trio.MemorySendChannel[list[FeedEvent]]
    stats: Stats
    shards: dict[int, Shard] = attrs.field(factory=dict)
    asset_shard: dict[str, int] = attrs.field(factory=dict)
    _to_start: list[Shard] = attrs.field(factory=list)
    _wake: trio.Event = attrs.field(factory=trio.Event)
    _next_index: int = 0
    _bad_frames: RateLimitedLog = attrs.field(factory=RateLimitedLog)
    _parser: FrameParser = attrs.field(factory=FrameParser)
    _big_frame: MessageGate = attrs.field(factory=lambda: MessageGate(BIG_FRAME_BYTES))
    stale_check: StaleCheck | None = None
    tap: FrameTap | None = None

    def set_assets(self, desired: set[str]) -> None:
        """Make the subscribed set equal ``desired`` (asset ids)."""
        removed = [a for a in self.asset_shard if a not in desired]
        by_shard: dict[int, list[str]] = {}
        for asset_id in removed:
            by_shard.setdefault(self.asset_shard.pop(asset_id), []).append(asset_id)
        for index, ids in by_shard.items():
            self.shards[index].remove(ids)
        added = sorted(a for a in desired if a not in self.asset_shard)
        cap = self.config.max_assets_per_connection
        for shard in sorted(self.shards.values(), key=lambda s: s.index):
            room = cap - len(shard.assets)
            if room > 0 and added:
                self._assign(shard, added[:room])
                added = added[room:]
        while added:
            shard = Shard(self._next_index, self.stats.shard(self._next_index))
            self._next_index += 1
            self.shards[shard.index] = shard
            self._assign(shard, added[:cap])
            added = added[cap:]
            self._to_start.append(shard)
        for shard in [s for s in self.shards.values() if not s.assets]:
            shard.cancel_scope.cancel()
            del self.shards[shard.index]
            self.stats.shards.pop(shard.index, None)
        self._wake.set()

    def _assign(self, shard: Shard, asset_ids: list[str]) -> None:
        for asset_id in asset_ids:
            self.asset_shard[asset_id] = shard.index
        shard.add(asset_ids)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Start shards as they appear, ``feed.connect_stagger`` s apart; runs until cancelled."""
        with self.events:  # closed on exit: the router drains what is queued and ends
            async with trio.open_nursery() as nursery:
                task_status.started()
                await self._start_shards(nursery)

    async def _start_shards(self, nursery: trio.Nursery) -> None:
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            while self._to_start:
                shard = self._to_start.pop(0)
                if shard.index in self.shards:
                    nursery.start_soon(self._supervise, shard)
                    await trio.sleep(self.config.connect_stagger)

    async def _supervise(self, shard: Shard) -> None:
        """Connect, serve, and reconnect with backoff until the shard is closed."""
        log = logger.bind(shard=shard.index)
        backoff = Backoff(self.config.backoff_initial, self.config.backoff_max)
        with shard.cancel_scope:
            while True:
                shard.stats.state = "connecting"
                if not shard.assets:  # never hold an empty connection open
                    shard.stats.state = "idle"
                    await shard.changed.wait()
                    continue
                try:
                    await self._serve(shard, backoff)
                except* FEED_ERRORS as group:
                    self._count_close(group.exceptions)
                    self._shrink_if_refused(shard, group.exceptions, log)
                    reason = "; ".join(
                        describe_failure(e, self.config.url) for e in group.exceptions
                    )
                    shard.stats.last_error = reason[:300]
                    log.warning("feed_disconnected", reason=shard.stats.last_error)
                shard.stats.state = "backoff"
                shard.stats.connected_at = None
                delay = backoff.next_delay()
                shard.stats.reconnects += 1
                shard.stats.retry_at = time.monotonic() + delay
                log.info("feed_reconnect_scheduled", backoff_s=round(delay, 3), reason=reason[:300])
                await trio.sleep(delay)
                shard.stats.retry_at = None

    def _count_close(self, errors: Sequence[BaseException]) -> None:
        """Count closes that carry a bad-input reason (RFC 6455 close codes)."""
        for exc in errors:
            code = exc.code if isinstance(exc, TransportError) else None
            if code in _CLOSE_KINDS:
                self.stats.parse_errors[_CLOSE_KINDS[code]] += 1

    def _shrink_if_refused(self, shard: Shard, errors: Sequence[BaseException], log: Any) -> None:
        """
        A venue that closes the connection after our subscribe, before any
        data frame answered it and within :data:`_REFUSED_WITHIN` seconds,
        refuses its size (observed: a few thousand ids in one frame earn a
        close 100 to 200 ms later, unserved; docs/protocol.md, "Limits"): quarter
        this shard's subscribe frames. A drop after data arrived (the venue
        answers a subscribe with snapshots at once) is no refusal, and
        neither is a failure of ours (an unanswered PING).
        """
        subscribed = shard.subscribed_at
        if shard.answered or subscribed is None:
            return
        if trio.current_time() - subscribed > _REFUSED_WITHIN:
            return
        if not any(isinstance(exc, TransportError | trio.BrokenResourceError) for exc in errors):
            return
        current = shard.subscribe_bytes or self.config.max_subscribe_bytes
        smaller = max(_MIN_SUBSCRIBE_BYTES, current // 4)
        if smaller < current:
            shard.subscribe_bytes = smaller
            log.warning("feed_subscribe_frames_shrunk", max_subscribe_bytes=smaller)

    def _grow_when_healthy(self, shard: Shard) -> None:
        """After a healthy while, double a shrunk subscribe-frame cap back toward the maximum."""
        if shard.subscribe_bytes and shard.subscribe_bytes < self.config.max_subscribe_bytes:
            shard.subscribe_bytes = min(self.config.max_subscribe_bytes, shard.subscribe_bytes * 2)
            logger.info(
                "feed_subscribe_frames_grown",
                shard=shard.index,
                max_subscribe_bytes=shard.subscribe_bytes,
            )
            if shard.subscribe_bytes == self.config.max_subscribe_bytes:
                shard.subscribe_bytes = 0

    async def _serve(self, shard: Shard, backoff: Backoff) -> None:
        async with open_transport(
            self.config.transport,
            self.config.url,
            max_message_size=self.config.max_message_size,
            connect_timeout=10.0,
            gate=self._big_frame,
            receive_buffer=self.config.receive_buffer,
        ) as transport:
            await self._subscribe_and_read(transport, shard, backoff)

    async def _subscribe_and_read(self, ws: Transport, shard: Shard, backoff: Backoff) -> None:
        initial = shard.take_initial()
        chunks = chunk_asset_ids(initial, shard.subscribe_bytes or self.config.max_subscribe_bytes)
        custom = self.config.custom_feature_enabled
        await ws.send(encode_subscribe(chunks[0] if chunks else [], custom_feature_enabled=custom))
        for chunk in chunks[1:]:
            await ws.send(encode_operation("subscribe", chunk, custom_feature_enabled=custom))
        shard.stats.state = "connected"
        shard.stats.connected_at = time.monotonic()
        shard.subscribed_at = trio.current_time()
        shard.answered = False
        logger.info("feed_subscribed", shard=shard.index, assets=len(initial), frames=len(chunks))
        beat = Heartbeat()
        async with trio.open_nursery() as nursery:
            # Text PING only once the subscribe went out: a PING before a valid
            # subscription is answered with close 1008 (docs/protocol.md, "What the venue really does").
            nursery.start_soon(self._ping, ws, beat, shard.index)
            nursery.start_soon(self._send_changes, ws, shard)
            nursery.start_soon(self._when_healthy, shard, backoff)
            nursery.start_soon(self._watch_staleness, shard)
            await self._read(ws, shard, beat)

    async def _when_healthy(self, shard: Shard, backoff: Backoff) -> None:
        """
        After ``backoff_max`` seconds connected, reset the backoff; and every
        ``backoff_max`` seconds connected, double a shrunk frame cap back.
        """
        await trio.sleep(self.config.backoff_max)
        backoff.reset()
        while True:
            self._grow_when_healthy(shard)
            await trio.sleep(self.config.backoff_max)

    async def _ping(self, ws: Transport, beat: Heartbeat, index: int) -> None:
        """
        Text ``PING`` every ``ping_interval`` s on a fixed schedule; raise
        :class:`FeedClosed` when a PING waits ``pong_timeout`` s for its PONG
        (a half-open connection: docs/protocol.md, "Heartbeat").
        """
        interval, timeout = self.config.ping_interval, self.config.pong_timeout
        next_ping = trio.current_time() + interval
        while True:
            deadline = next_ping
            silent = beat.silent_since()
            if silent is not None:
                deadline = min(deadline, silent + timeout)
            await trio.sleep_until(deadline)
            now = trio.current_time()
            silent = beat.silent_since()
            if silent is not None and now - silent >= timeout:
                raise FeedClosed(index, f"no PONG and no data within {timeout:g} s")
            if now >= next_ping:
                beat.sent(now)
                await ws.send("PING")
                next_ping = max(next_ping + interval, now)

    async def _watch_staleness(self, shard: Shard) -> None:
        """
        Recycle a shard whose link answers PONG but delivers no data while its
        assets' prices moved (checked with ``stale_check`` over REST); a quiet
        market on a live link is left alone.
        """
        after = self.config.stale_after
        while True:
            now = trio.current_time()
            last = shard.last_data_at or shard.subscribed_at or now
            quiet_for = now - last
            if quiet_for < after:
                await trio.sleep(after - quiet_for)
                continue
            if self.stale_check is not None and shard.assets:
                shard.stats.stale_checks += 1
                moved = await self.stale_check(sorted(shard.assets)[:50])
                if moved is not None:
                    raise FeedClosed(
                        shard.index, f"no data for {quiet_for:.0f} s while prices moved ({moved})"
                    )
            await trio.sleep(after)

    async def _send_changes(self, ws: Transport, shard: Shard) -> None:
        custom = self.config.custom_feature_enabled
        limit = shard.subscribe_bytes or self.config.max_subscribe_bytes
        while True:
            await shard.changed.wait()
            shard.changed = trio.Event()
            removed = sorted(shard.pending_unsubscribe)
            added = sorted(shard.pending_subscribe)
            shard.pending_unsubscribe.clear()
            shard.pending_subscribe.clear()
            for chunk in chunk_asset_ids(removed, limit):
                await ws.send(encode_operation("unsubscribe", chunk))
            for chunk in chunk_asset_ids(added, limit):
                await ws.send(encode_operation("subscribe", chunk, custom_feature_enabled=custom))
            if removed or added:
                logger.info(
                    "feed_subscription_changed",
                    shard=shard.index,
                    subscribed=len(added),
                    unsubscribed=len(removed),
                )

    async def _read(self, ws: Transport, shard: Shard, beat: Heartbeat) -> None:
        try:
            while True:
                message = await ws.receive()
                if self.tap is not None:
                    await self.tap(message, time.time_ns() // 1_000_000)
                if len(message) >= BIG_FRAME_BYTES:
                    if not isinstance(message, bytearray):
                        await self._big(message, shard, beat)
                        continue
                    self._big_frame.leave()  # a big binary frame, read inside the gate
                events = self._received(message, shard, beat)
                if events:
                    try:  # no scheduling round trip while the router keeps up
                        self.events.send_nowait(events)
                    except trio.WouldBlock:
                        await self.events.send(events)
        finally:  # the connection failed inside a big frame
            self._big_frame.leave()

    async def _big(self, message: str | bytes, shard: Shard, beat: Heartbeat) -> None:
        """
        A big frame: parsed in slices inside the pool's gate (entered here,
        or by the transport when it read the frame's first
        :data:`BIG_FRAME_BYTES`), left once the router has applied its events.
        Time spent waiting for our own CPU is not the link's silence: the
        heartbeat counts the frame as received when we are done with it.
        """
        now = self._arrived(shard, beat)
        await self._big_frame.enter()
        try:
            try:
                parsed = await run_in_slices(self._parser.parse_in_slices(message, SLICE_SECONDS))
            except MalformedFrame as exc:
                self._bad_frame(shard, exc, message, now)
                return
            events = self._accepted(parsed, message, shard, beat, now)
            if events:
                frame = FrameEvents(events)
                await self.events.send(frame)
                await frame.applied.wait()
        finally:
            self._big_frame.leave()
        beat.last_received = trio.current_time()

    def _arrived(self, shard: Shard, beat: Heartbeat) -> float:
        """Count a frame's arrival; its ``time.monotonic()``."""
        now = time.monotonic()
        beat.last_received = trio.current_time()
        shard.stats.frames += 1
        shard.stats.last_frame_at = now
        self.stats.frames += 1
        return now

    def _received(self, message: Message, shard: Shard, beat: Heartbeat) -> list[FeedEvent] | None:
        """Count and parse one frame; the events for the router, or None."""
        now = self._arrived(shard, beat)
        if isinstance(message, bytearray):  # a binary frame: the market channel sends text only
            self._bad_frame(
                shard, MalformedFrame("binary_frame", f"{len(message)} bytes"), message, now
            )
            return None
        try:
            parsed = self._parser.parse(message)
        except MalformedFrame as exc:
            self._bad_frame(shard, exc, message, now)
            return None
        return self._accepted(parsed, message, shard, beat, now)

    def _accepted(
        self, parsed: ParsedFrame, message: Message, shard: Shard, beat: Heartbeat, now: float
    ) -> list[FeedEvent] | None:
        """Count a parsed frame; the events of subscribed assets, or None for a control frame."""
        stats = self.stats
        if parsed.control is not None:
            self._control(parsed.control, shard, beat, now)
            return None
        shard.stats.last_data_at = now
        shard.last_data_at = beat.last_received
        shard.answered = True
        for kind in parsed.event_types:
            stats.events[kind] += 1
        for kind in parsed.ignored:
            stats.ignored_events[kind] += 1
        for problem in parsed.problems:
            self._bad_frame(shard, problem, message, now)
        events, dropped = filter_events(parsed.events, shard.assets)
        stats.foreign_events += dropped
        self._covered(events, shard)
        return events

    def _control(self, text: str, shard: Shard, beat: Heartbeat, now: float) -> None:
        self.stats.control[text] += 1
        if text == "PONG":
            shard.stats.last_pong_at = now
            rtt = beat.answered(trio.current_time())
            if rtt is not None:
                shard.stats.ping_rtt = rtt

    @staticmethod
    def _covered(events: list[FeedEvent], shard: Shard) -> None:
        """
        Coverage and book integrity: an asset counts as covered from its first
        ``book`` or ``last_trade_price`` (a ``price_change`` does not confirm a
        subscription: docs/protocol.md, "What the venue really does"); each ``book``'s hash check is counted.
        """
        seen = shard.stats.seen_assets
        for event in events:
            if type(event) is LastTradePrice:  # exact types: cheaper than isinstance
                seen.add(event.asset_id)
            elif type(event) is BookSnapshot:
                seen.add(event.asset_id)
                shard.stats.book_hashes[event.integrity] += 1

    def _bad_frame(self, shard: Shard, exc: MalformedFrame, message: Message, now: float) -> None:
        self.stats.parse_errors[exc.kind] += 1
        suppressed = self._bad_frames.allow(exc.kind, now)
        if suppressed is not None:
            logger.warning(
                "feed_bad_frame",
                shard=shard.index,
                kind=exc.kind,
                detail=exc.detail[:200],
                frame=repr(message[:200]),
                suppressed_since_last=suppressed,
            )
