"""
The replay server: Polymarket's market channel, served to many connections from one tape.

The protocol served (docs/protocol.md, "Endpoint", "Subscribing",
"Heartbeat" and "Server messages"):

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
* a client receives only events of its assets (:mod:`polystream.replay.client`).

The tape (:mod:`polystream.replay.tape`) walks the frames at the recorded
pace or as fast as the clients take them (:mod:`polystream.replay.pacing`);
it never drops a frame for a connected client, and a client that
disconnects is forgotten while the tape goes on. With
``start_when_subscribed`` (the default) the tape waits until some client
subscribed to at least one asset, so the replay can be started first and
the daemon second without missing anything. With ``tick_changes`` each
``tick_size_change`` the tape makes goes, as one object frame, to every
client holding the asset (relabelled for synthetic copies) just before the
frame that caused it.

The server also answers the CLOB REST API from the same books
(:mod:`polystream.replay.rest`) and applies faults on request or on schedule
(:mod:`polystream.replay.faults`, :mod:`polystream.replay.injector`); with
no fault configured, the tape's per-frame cost for them is two truth tests.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Collection, Iterable, Iterator, Sequence
from functools import partial
from typing import Any, Unpack

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

from polystream.ops.health import serve_asgi
from polystream.replay.books import Event
from polystream.replay.capture import Frame, encode, shift_frame
from polystream.replay.client import Client, Clients, Snapshots
from polystream.replay.faults import FaultRecord, ScheduledFault
from polystream.replay.garbage import Garbage
from polystream.replay.injector import FaultInjector
from polystream.replay.options import ReplayChanges, ReplayOptions
from polystream.replay.pacing import Pacer
from polystream.replay.rest import ClobRest, RestRequest
from polystream.replay.stats import ConnectionLog, ReplayStats, RequestRecord
from polystream.replay.synthetic import Synthetic, SyntheticAsset
from polystream.replay.tape import Tape, TickChange
from polystream.replay.wire import DROP_MODES, DropMode, RawFrame

__all__ = ["ReplayServer"]

logger = structlog.get_logger(__name__)


@attrs.define(eq=False, init=False)
class ReplayServer:
    """
    A market-channel server replaying one :class:`Tape` to every connection.

    Build it with a tape and :class:`ReplayOptions`, or the options' fields
    as keywords on top of them (``ReplayServer(tape, max_speed=True)``), then
    ``server = await nursery.start(server.serve)``.

    Attributes:
        tape: the shared tape (its ``finished`` event marks the end).
        options: how it plays and which faults it applies.
        synthetic: the synthetic assets served besides the recorded ones,
            built from ``options.synthesize`` unless given; or None.
        host: listening address, set by :meth:`serve`.
        port: bound port, set by :meth:`serve` (useful with ``port=0``).
        stats: its counters.
        tape_started: set when the tape starts (see ``start_when_subscribed``).
        connection_logs: with ``record``, one :class:`ConnectionLog` per
            connection accepted, in order.
        subscribe_times: with ``record``, asset id -> ``time.monotonic()`` when
            the latest subscription request naming it was read.
        snapshot_times: with ``record``, asset id -> when its latest snapshot was
            written to a socket.
        refusing: an HTTP status (e.g. 429 or 503) every handshake is answered
            with while non-zero: the venue down for good; 0 = accept.
        tick_change_log: with ``tick_changes``, every change made, in order
            (:class:`TickChange`: asset, ticks, the frame it preceded, clients).
        rest_url: ``http://host:port`` of the CLOB REST app once :meth:`serve`
            was given ``rest_port`` (None otherwise).
        rest: the CLOB REST app (:class:`ClobRest`).
        injector: what applies the faults (:class:`FaultInjector`).
    """

    tape: Tape
    options: ReplayOptions
    synthetic: Synthetic | None
    host: str = ""
    port: int = 0
    stats: ReplayStats = attrs.Factory(ReplayStats)
    tape_started: trio.Event = attrs.Factory(trio.Event)
    connection_logs: list[ConnectionLog] = attrs.Factory(list)
    subscribe_times: dict[str, float] = attrs.Factory(dict)
    snapshot_times: dict[str, float] = attrs.Factory(dict)
    refusing: int = 0
    tick_change_log: list[TickChange] = attrs.Factory(list)
    rest_url: str | None = None
    rest: ClobRest = attrs.field(init=False)
    injector: FaultInjector = attrs.field(init=False)
    _pacer: Pacer = attrs.field(init=False)
    _clients: Clients = attrs.field(factory=Clients, init=False)
    _nursery: trio.Nursery | None = attrs.field(default=None, init=False)
    _accepted_at: deque[float] = attrs.field(factory=deque, init=False)

    def __init__(
        self,
        tape: Tape,
        options: ReplayOptions | None = None,
        *,
        synthetic: Synthetic | None = None,
        **changes: Unpack[ReplayChanges],
    ) -> None:
        """
        Build the server: ``options`` (default :class:`ReplayOptions`) with
        ``changes`` on top; ``synthetic`` replaces the copies ``synthesize`` builds.

        Raises:
            ReplayError: ``synthesize`` < 0, or > 0 for a capture without assets.
            ValueError: a change out of range (``speed`` <= 0, ``outbox_frames`` < 2).
            TypeError: a change that names no option.
        """
        options = attrs.evolve(options or ReplayOptions(), **changes)
        if synthetic is None and options.synthesize:
            synthetic = Synthetic.build(tape.capture.markets, options.synthesize)
        self.__attrs_init__(tape, options, synthetic)
        self.rest = ClobRest(self._book_event, self._top, self.stats)
        self.injector = FaultInjector(self._clients, tape, self.stats)
        self._pacer = Pacer(tape.capture, options.speed, options.max_speed)

    @property
    def finished(self) -> trio.Event:
        """The tape's ``finished`` event."""
        return self.tape.finished

    @property
    def url(self) -> str:
        """``ws://host:port/ws/market`` of the listening server."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"ws://{host}:{self.port}/ws/market"

    @property
    def paused(self) -> bool:
        """The tape is held (:meth:`pause`); connections stay served."""
        return self._pacer.paused

    @property
    def fault_log(self) -> list[FaultRecord]:
        """Every fault applied, in order (:class:`FaultRecord`)."""
        return self.injector.log

    @property
    def rest_requests(self) -> list[RestRequest]:
        """Every request the REST app got, in order (:class:`RestRequest`)."""
        return self.rest.requests

    @property
    def rest_fail_next(self) -> list[int]:
        """
        HTTP statuses the next REST requests are answered with, one each,
        popped from the front (body ``{"error": "injected"}``; a 429 carries
        ``Retry-After: 0``).
        """
        return self.rest.fail_next

    def subscriptions(self) -> dict[int, frozenset[str]]:
        """Connection number -> its current subscription set, for open connections."""
        return {c.number: frozenset(c.subscribed) for c in self._clients.open()}

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

        With ``rest_port`` (0 = a free port) also serve the CLOB REST app
        (:attr:`rest`) on ``host:rest_port`` with hypercorn
        (:func:`polystream.ops.health.serve_asgi`). Calls
        ``task_status.started(self)`` once listening, with :attr:`port` (and
        :attr:`rest_url`) set.

        Raises:
            OSError: an address cannot be bound.
        """
        async with trio.open_nursery() as nursery:
            await self._listen(nursery, host, port)
            if rest_port is not None:
                listen = f"[{host}]:{rest_port}" if ":" in host else f"{host}:{rest_port}"
                urls: list[str] = await nursery.start(serve_asgi, self.rest.app, listen)
                self.rest_url = urls[0]
            self._log_listening()
            self._nursery = nursery
            nursery.start_soon(self._play)
            task_status.started(self)

    async def _listen(self, nursery: trio.Nursery, host: str, port: int) -> None:
        """Start the WebSocket listener; sets :attr:`host` and :attr:`port`."""
        ws_server = await nursery.start(
            partial(
                serve_websocket,
                self._serve_client,
                host,
                port,
                None,
                max_message_size=self.options.max_message_size,
            )
        )
        endpoint = ws_server.listeners[0]
        if not isinstance(endpoint, Endpoint):
            raise RuntimeError(f"unexpected listener {endpoint!r}")
        self.host, self.port = str(endpoint.address), int(endpoint.port)

    def _log_listening(self) -> None:
        options = self.options
        logger.info(
            "replay_listening",
            url=self.url,
            rest_url=self.rest_url,
            frames=len(self.tape.capture.frames),
            assets=len(self.tape.capture.markets),
            speed=None if options.max_speed else options.speed,
            loop=options.loop,
            synthetic=len(self.synthetic.assets) if self.synthetic else 0,
            tick_changes=options.tick_changes,
        )

    async def close_clients(self, reason: str = "replay finished", code: int = 1001) -> int:
        """
        Close every open connection with ``code`` (1001, going away), waiting at
        most 5 s for the closing handshakes; returns how many were closed.
        """
        clients = self._clients.every()
        with trio.move_on_after(5):
            async with trio.open_nursery() as nursery:
                for client in clients:
                    nursery.start_soon(client.ws.aclose, code, reason)
        return len(clients)

    # --- faults (polystream.replay.faults); ``clients``: connection numbers, None = all ---

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
        return await self.injector.drop(how, clients, code, reason)

    def drop_soon(self, how: DropMode = "tcp", *, clients: Collection[int] | None = None) -> int:
        """:meth:`drop` from synchronous code: connections are muted now, closed just after."""
        return self.injector.drop_soon(how, clients)

    def half_open(self, *, clients: Collection[int] | None = None) -> int:
        """
        Make connections half-open: the socket stays open but they get nothing
        any more, ``PONG`` included (what a dead link looks like to the client).
        trio-websocket still answers protocol-level pings and a close frame.
        Returns how many connections were hit.
        """
        return len(self.injector.take_off("half-open", "half_open", clients))

    def silence(self, *, clients: Collection[int] | None = None) -> int:
        """
        A silent feed: connections keep answering ``PING`` with ``PONG`` but get
        no data frame any more (the RTDS failure mode, docs/protocol.md,
        "Heartbeat"). The tape goes on without them; a new connection is
        served normally. Returns how many connections were hit.
        """
        return len(self.injector.take_off("silence", "silent", clients))

    def heal(self, *, clients: Collection[int] | None = None) -> int:
        """
        End ``silence`` / ``half_open`` on open connections: they get the tape's
        frames again from the next one (frames missed meanwhile are not sent).
        """
        return self.injector.heal(clients)

    def stall(self, *, clients: Collection[int] | None = None) -> int:
        """
        Stall mid-frame: write the header and half the payload of one frame
        (the books of the client's assets, as a snapshot array) and then
        nothing: no data, no ``PONG``. The client's WebSocket reader waits for
        the rest of the frame. Later bytes trio-websocket writes by itself (the
        answer to a close frame) land inside that frame's payload, so the
        client never sees them either.
        """
        return self.injector.stall(clients)

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
        return self.injector.inject(frames, clients)

    def inject_garbage(
        self,
        kinds: Iterable[str] | None = None,
        *,
        clients: Collection[int] | None = None,
        asset_ids: Iterable[str] | None = None,
        poison: bool = True,
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
        socket must not hold the tape up for everyone else. ``poison=False``
        keeps it on the tape: for a client that counts and skips such a
        frame instead (polystream's ``sansio`` transport).

        Raises:
            ReplayError: an unknown kind.
        """
        return self.injector.inject_garbage(kinds, clients, asset_ids, poison)

    def pause(self, duration: float = 0.0) -> None:
        """
        Hold the tape (a quiet market): connections stay open, answer ``PING``
        and get nothing new; with ``duration`` > 0 it resumes by itself then.
        Pacing resumes where it stopped (the schedule shifts by the pause).
        """
        self.injector.record("pause", [])
        self._pacer.pause(duration, self._nursery)

    def resume(self, *, speed: float | None = None) -> None:
        """
        Let a paused tape go on; with ``speed`` (> 0), paced from here at
        ``speed`` times the recorded pace instead of as before (a test can
        run to a moment at maximum speed, then watch it at a pace a client
        keeps up with).
        """
        self._pacer.resume(speed=speed)

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
            self.inject_garbage(asset_ids=self.options.garbage_assets)
        elif action == "pause":
            self.pause(fault.duration)

    async def wait_rest_requests(
        self, count: int = 1, *, path: str | None = None
    ) -> list[RestRequest]:
        """
        Wait until at least ``count`` REST requests (to ``path``, when given)
        were answered; returns those requests, in order.
        """
        return await self.rest.wait_requests(count, path=path)

    # --- the tape loop ---

    async def _play(self) -> None:
        if self.options.start_when_subscribed:
            await self.tape_started.wait()
        self.tape_started.set()
        log = logger.bind(url=self.url)
        log.info("replay_started", clients=len(self._clients.live))
        begun = trio.current_time()
        for frames in self._passes(log):
            await self._play_pass(frames)
        self.tape.laps += 1
        await self._clients.wait_drained()
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

    def _passes(self, log: Any) -> Iterator[Sequence[Frame]]:
        """The frames of each pass: the recorded ones, then (``loop``) shifted laps."""
        recorded = self.tape.capture.frames
        span_ms = recorded[-1].time_ms - recorded[0].time_ms + 1000 if recorded else 0
        yield recorded
        while self.options.loop:
            self.tape.laps += 1
            log.info("replay_lap", laps=self.tape.laps)
            # A new lap is later in time: a consumer rightly drops events older than
            # what it holds, so every timestamp moves on by the capture's span.
            yield [shift_frame(f, self.tape.laps * span_ms) for f in recorded]

    async def _play_pass(self, frames: Sequence[Frame]) -> None:
        self._pacer.begin_pass()
        for index, frame in enumerate(frames):
            self.tape.position = index
            await self._pacer.wait_due(index)
            await self._clients.wait_room()
            self._dispatch(frame, index)
            if self.options.faults:
                for fault in self.options.faults:
                    if fault.due(index + 1):
                        self._scheduled(fault)
        self.tape.position = len(frames)

    def _dispatch(self, frame: Frame, index: int) -> None:
        """
        Apply ``frame`` (index ``index`` of its pass), queue it to every client,
        preceded by the tick changes it calls for (``tick_changes``); no
        checkpoint, so atomic w.r.t. subscribes and REST requests.
        """
        self.tape.apply(frame)
        if self.options.tick_changes:
            for change in self.tape.tick_crossings(frame, index):
                self._send_tick_change(change)
        self._send(frame)

    def _send_tick_change(self, change: TickChange) -> None:
        """Record ``change`` and queue its ``tick_size_change`` to the clients holding the asset."""
        live = self._clients.live
        clients = tuple(sorted(c.number for c in live if change.asset_id in c.subscribed))
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
        for client in self._clients.live:
            self._push(client, client.frame_text(frame))
        synthetic = self.synthetic
        if synthetic is not None and self.options.synthetic_events:
            for client in self._clients.live:
                copies = self._push(client, client.copies_text(frame, synthetic))
                self.stats.synthetic_events_sent += copies

    def _push(self, client: Client, picked: tuple[str, int] | None) -> int:
        """Queue ``picked`` (a frame's text and event count) to ``client``; the events queued."""
        if picked is None:
            return 0
        text, count = picked
        client.push(text)
        self.stats.frames_sent += 1
        self.stats.events_sent += count
        return count

    # --- connections ---

    async def _serve_client(self, request: WebSocketRequest) -> None:
        status = self._refusal()
        if status:
            await self.injector.reject(request, status)
            return
        try:
            ws = await request.accept()
        except ConnectionClosed:
            return
        client = self._open_client(ws)
        log = logger.bind(client=client.number)
        log.info("replay_client_connected", path=request.path)
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
            self._close_client(client)
            log.info("replay_client_disconnected", subscribed=len(client.subscribed))

    def _refusal(self) -> int:
        """The HTTP status a handshake arriving now is refused with; 0 = accept it."""
        if self.refusing:
            return self.refusing
        if self.options.storm_limit and self._storm(time.monotonic()):
            return 429
        return 0

    def _storm(self, now: float) -> bool:
        """Whether a handshake now exceeds ``storm_limit``; else count it as accepted."""
        accepted = self._accepted_at
        while accepted and now - accepted[0] > self.options.storm_window:
            accepted.popleft()
        if len(accepted) >= self.options.storm_limit:
            return True
        accepted.append(now)
        return False

    def _open_client(self, ws: WebSocketConnection) -> Client:
        """A new connection, numbered and put on the tape."""
        self.stats.connections += 1
        client = Client(ws=ws, capacity=self.options.outbox_frames, number=self.stats.connections)
        if self.options.record:
            client.log = ConnectionLog(
                number=client.number, opened_at=time.monotonic(), subscribed=client.subscribed
            )
            client.on_snapshots_sent = self._snapshots_sent
            self.connection_logs.append(client.log)
        self._clients.add(client)
        return client

    def _close_client(self, client: Client) -> None:
        """A connection ended: forget it (its log keeps when)."""
        client.close()
        self._clients.forget(client)
        if client.log is not None:
            client.log.closed_at = time.monotonic()

    def _snapshots_sent(self, log: ConnectionLog, asset_ids: tuple[str, ...]) -> None:
        now = time.monotonic()
        for asset_id in asset_ids:
            log.snapshots[asset_id] = now
            self.snapshot_times[asset_id] = now

    async def _read_loop(self, client: Client) -> None:
        while True:
            message = await client.ws.get_message()
            received_at = time.monotonic()
            await client.wait_room()
            self._on_message(client, message, received_at)

    def _on_message(
        self, client: Client, message: str | bytes, received_at: float | None = None
    ) -> None:
        """
        Handle one client message (no checkpoint: snapshots match the frames that
        follow). ``received_at`` (``time.monotonic()``, default now) is when it was read.
        """
        size = self._count(message)
        parsed = self._request(client, message)
        if parsed is None:
            return
        request, assets = parsed
        operation = request.get("operation")
        if operation != "unsubscribe" and self._oversized(size, assets):
            options = self.options
            self.injector.close_oversized(
                client, options.oversize_close_delay, options.oversize_close
            )
            return
        if self._apply(client, request, operation, assets):
            self._note(client, size, operation, assets, received_at)

    def _count(self, message: str | bytes) -> int:
        """Count a client message; returns its size, bytes (UTF-8 for text)."""
        size = (
            len(message)
            if isinstance(message, bytes) or message.isascii()
            else len(message.encode("utf-8", "surrogatepass"))
        )
        self.stats.messages_received += 1
        self.stats.max_message_bytes = max(self.stats.max_message_bytes, size)
        return size

    def _request(self, client: Client, message: str | bytes) -> tuple[Event, list[str]] | None:
        """
        The subscription request in ``message`` and its ids; None for a ``PING``
        (answered) or a message that is not a request (counted as ignored).
        """
        if isinstance(message, bytes):
            self.stats.messages_ignored += 1
            return None
        if message == "PING":
            if client.answers_ping:
                client.push("PONG")
            return None
        try:
            request = orjson.loads(message)
        except orjson.JSONDecodeError:
            self.stats.messages_ignored += 1
            if message.lstrip()[:1] in ("{", "["):
                self.stats.invalid_json += 1
            return None
        assets = request.get("assets_ids") if isinstance(request, dict) else None
        if not isinstance(assets, list) or not all(isinstance(a, str) for a in assets):
            self.stats.messages_ignored += 1
            return None
        return request, assets

    def _oversized(self, size: int, assets: list[str]) -> bool:
        """Whether a subscribe is over ``max_subscribe_bytes`` or ``max_subscribe_ids``."""
        limit_bytes, limit_ids = self.options.max_subscribe_bytes, self.options.max_subscribe_ids
        return bool((limit_bytes and size > limit_bytes) or (limit_ids and len(assets) > limit_ids))

    def _apply(self, client: Client, request: Event, operation: Any, assets: list[str]) -> bool:
        """Subscribe or unsubscribe; False when the request is neither (or a second ``type``)."""
        if operation == "unsubscribe":
            self._unsubscribe(client, assets)
            return True
        if operation == "subscribe" or (operation is None and "type" in request):
            if operation is None:
                if client.typed:
                    client.push("INVALID OPERATION")
                    return False
                client.typed = True
            self._subscribe(client, assets, request)
            return True
        self.stats.messages_ignored += 1
        return False

    def _note(
        self,
        client: Client,
        size: int,
        operation: str | None,
        assets: list[str],
        received_at: float | None,
    ) -> None:
        """Count a request served, and log it with ``record``."""
        stats = self.stats
        stats.max_request_assets = max(stats.max_request_assets, len(assets))
        stats.max_subscribed = max(stats.max_subscribed, len(client.subscribed))
        if client.log is None:
            return
        now = time.monotonic() if received_at is None else received_at
        client.log.requests.append(
            RequestRecord(now, size, operation or "type", tuple(assets), len(client.subscribed))
        )
        if operation != "unsubscribe":
            self.subscribe_times.update(dict.fromkeys(assets, now))

    def _unsubscribe(self, client: Client, assets: list[str]) -> None:
        client.subscribed.difference_update(assets)
        if self.synthetic is not None and client.copy_origins:
            for asset_id in assets:
                label = self.synthetic.assets.get(asset_id)
                if label is not None:
                    client.remove_copy(label)

    def _subscribe(self, client: Client, assets: list[str], request: Event) -> None:
        if request.get("custom_feature_enabled") is True:
            client.custom = True
        new = [a for a in dict.fromkeys(assets) if a not in client.subscribed]
        client.subscribed.update(new)
        for asset_id in new:
            if (label := self._label(asset_id)) is not None:
                client.add_copy(label)
        if assets:
            self.tape_started.set()
        if request.get("initial_dump", True) is not False and client.mode == "normal":
            self._send_snapshots(client, new)

    def _send_snapshots(self, client: Client, asset_ids: Iterable[str]) -> None:
        """Queue the current books of those of ``asset_ids`` the server knows, as one array."""
        books = [book for a in asset_ids if (book := self._book_event(a)) is not None]
        if not books:
            return
        text = encode(books)
        ids = tuple(book["asset_id"] for book in books)
        client.push(text if client.log is None else Snapshots(text, ids))
        self.stats.snapshots_sent += len(books)
        self.stats.synthetic_snapshots_sent += sum(self._label(a) is not None for a in ids)

    def _label(self, asset_id: str) -> SyntheticAsset | None:
        """The synthetic asset ``asset_id`` names, or None for a recorded (or unknown) id."""
        return self.synthetic.assets.get(asset_id) if self.synthetic is not None else None

    def _book_event(self, asset_id: str) -> Event | None:
        """The current ``book`` of ``asset_id``, recorded or synthetic; None if unknown."""
        label = self._label(asset_id)
        if label is None:
            return self.tape.snapshot(asset_id)
        return self.tape.snapshot(label.original, label=label)

    def _top(self, asset_id: str) -> tuple[str | None, str | None]:
        """Best bid and ask price texts of ``asset_id`` (copies: their original's)."""
        label = self._label(asset_id)
        return self.tape.top(label.original if label is not None else asset_id)
