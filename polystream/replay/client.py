"""
One connection of a replay server: its subscriptions, what it may see, its outbox.

A client receives only events of its assets (docs/protocol.md,
"Subscribing"): a frame whose assets are all subscribed is sent byte for
byte as recorded, any other is filtered (events of other assets dropped,
``price_changes[]`` entries too) and skipped when nothing is left.
``best_bid_ask`` events go only to clients that set
``custom_feature_enabled``; ``new_market`` and ``market_resolved`` go to all
of those (venue-wide, as on the real feed).

Everything a client receives goes through its own bounded outbox, in order:
snapshots, answers (``PONG``) and frames; one task per connection writes it
(:meth:`Client.write_loop`). The tape never drops a frame for a connected
client: it waits until every outbox of :attr:`Clients.live` has room. A
fault takes a client off the tape (:attr:`Clients.muted`): it is neither
sent frames nor waited for.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Collection
from typing import Literal

import attrs
import trio
from trio_websocket import WebSocketConnection

from polystream.replay.books import Event
from polystream.replay.capture import CUSTOM_EVENTS, VENUE_WIDE_EVENTS, Frame, encode
from polystream.replay.stats import ConnectionLog
from polystream.replay.synthetic import Synthetic, SyntheticAsset
from polystream.replay.wire import RawFrame, write_raw

__all__ = ["Client", "Clients", "Mode", "Outgoing", "Snapshots", "filter_events"]

Mode = Literal["normal", "silent", "half_open", "stalled", "poisoned", "dropped"]
"""
How a connection is served: ``normal`` (on the tape), or after a fault:
``silent`` (``PONG`` but no data), ``half_open`` (nothing), ``stalled``
(stuck inside a partial frame), ``poisoned`` (sent a non-UTF-8 text frame;
still answers ``PING``), ``dropped`` (being closed).
"""

_ANSWERS_PING: frozenset[Mode] = frozenset({"normal", "silent", "poisoned"})


@attrs.frozen
class Snapshots:
    """An outbox entry holding a snapshot array, so its write time can be recorded."""

    text: str
    asset_ids: tuple[str, ...]


Outgoing = str | Snapshots | bytes | RawFrame
"""An outbox entry: a text frame, snapshots, a binary frame, or raw wire bytes."""


def filter_events(
    frame: Frame, subscribed: Collection[str], custom: bool, *, venue_wide: bool = True
) -> list[Event]:
    """
    The events of ``frame`` one client may see; ``price_changes[]`` entries filtered too.

    ``venue_wide=False`` leaves out ``new_market`` / ``market_resolved`` (synthetic copies).
    """
    kept: list[Event] = []
    for event in frame.events:
        kind = event["event_type"]
        if kind in VENUE_WIDE_EVENTS:
            if custom and venue_wide:
                kept.append(event)
            continue
        if kind in CUSTOM_EVENTS and not custom:
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


@attrs.define(eq=False)
class Client:
    """
    One connection: its subscriptions and its ordered, bounded outbox.

    Attributes:
        ws: the accepted WebSocket.
        capacity: outbox entries before the tape waits for it.
        number: 1 for the first connection accepted, and so on.
        mode: how it is served (:data:`Mode`).
        nursery: its connection's nursery (its writer runs there), once served.
        subscribed: its asset ids, recorded and synthetic.
        copies, copy_origins: its synthetic subscriptions indexed: copy
            number -> recorded assets held as that copy, and recorded asset
            -> copies.
        custom: it set ``custom_feature_enabled``.
        typed: its first (``type``) message was read.
        closed: the connection ended.
        log: its :class:`ConnectionLog` (the ``record`` option), or None.
        on_snapshots_sent: called with ``log`` and the asset ids once a
            snapshot array was written to the socket (with ``log``).
    """

    ws: WebSocketConnection
    capacity: int
    number: int
    mode: Mode = "normal"
    nursery: trio.Nursery | None = None
    subscribed: set[str] = attrs.Factory(set)
    copies: dict[int, set[str]] = attrs.Factory(dict)
    copy_origins: dict[str, set[int]] = attrs.Factory(dict)
    custom: bool = False
    typed: bool = False
    closed: bool = False
    outbox: deque[Outgoing] = attrs.Factory(deque)
    sending: bool = False
    log: ConnectionLog | None = None
    on_snapshots_sent: Callable[[ConnectionLog, tuple[str, ...]], None] | None = None
    _data: trio.lowlevel.ParkingLot = attrs.field(factory=trio.lowlevel.ParkingLot, alias="_data")
    _space: trio.lowlevel.ParkingLot = attrs.field(factory=trio.lowlevel.ParkingLot, alias="_space")

    @property
    def answers_ping(self) -> bool:
        """Whether a ``PING`` gets its ``PONG`` in the current mode."""
        return self.mode in _ANSWERS_PING

    def push(self, item: Outgoing) -> None:
        """Queue ``item`` (no wait: callers wait for room first, and may overshoot by one)."""
        self.outbox.append(item)
        if self._data:
            self._data.unpark()

    def add_copy(self, asset: SyntheticAsset) -> None:
        """Index a new synthetic subscription."""
        self.copies.setdefault(asset.copy, set()).add(asset.original)
        self.copy_origins.setdefault(asset.original, set()).add(asset.copy)

    def remove_copy(self, asset: SyntheticAsset) -> None:
        """Forget a synthetic subscription (nothing if not held)."""
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

    def frame_text(self, frame: Frame) -> tuple[str, int] | None:
        """
        What this client gets of ``frame``: the text and its event count, or
        None for nothing. The recorded text when every asset of a plain frame
        is subscribed, else the filtered events (:func:`filter_events`).
        """
        subscribed = self.subscribed
        if frame.plain:
            if frame.asset_ids <= subscribed:
                return frame.text, len(frame.events)
            if frame.asset_ids.isdisjoint(subscribed):
                return None
        events = filter_events(frame, subscribed, self.custom)
        if not events:
            return None
        return encode(events if frame.is_array else events[0]), len(events)

    def copies_text(self, frame: Frame, synthetic: Synthetic) -> tuple[str, int] | None:
        """
        The events of ``frame`` re-labelled for each synthetic copy this client
        holds (:meth:`Synthetic.relabel`), as ONE array, and their count; None
        when it holds no copy of the frame's assets.
        """
        if not self.copy_origins:
            return None
        copies: set[int] = set()
        for asset_id in frame.asset_ids:
            copies.update(self.copy_origins.get(asset_id, ()))
        parts: list[str] = []
        count = 0
        for copy in sorted(copies):
            originals = self.copies[copy]
            events = filter_events(frame, originals, self.custom, venue_wide=False)
            if events:
                held = frame.asset_ids & originals
                parts.append(synthetic.relabel(encode(events)[1:-1], copy, held))
                count += len(events)
        return ("[" + ",".join(parts) + "]", count) if parts else None

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
                await self._write(item)
            finally:
                self.sending = False
            if isinstance(item, Snapshots) and self.log and self.on_snapshots_sent:
                self.on_snapshots_sent(self.log, item.asset_ids)
            if len(self.outbox) <= low_water:
                self._space.unpark_all()

    async def _write(self, item: Outgoing) -> None:
        if isinstance(item, Snapshots):
            await self.ws.send_message(item.text)
        elif isinstance(item, RawFrame):
            await write_raw(self.ws, item.data)
        else:
            await self.ws.send_message(item)  # text, or bytes: a binary frame

    def close_space(self) -> None:
        """Wake the tape if it waits for room in this outbox."""
        self._space.unpark_all()

    def close(self) -> None:
        """The connection ended: drop what is queued and wake whoever waits on it."""
        self.closed = True
        self.outbox.clear()
        self._space.unpark_all()
        self._data.unpark_all()


@attrs.define(eq=False)
class Clients:
    """
    The open connections of a server.

    Attributes:
        live: on the tape: sent its frames, and waited for.
        muted: taken off the tape by a fault: neither sent frames nor waited for.
    """

    live: set[Client] = attrs.Factory(set)
    muted: set[Client] = attrs.Factory(set)

    def add(self, client: Client) -> None:
        """A new connection, on the tape."""
        self.live.add(client)

    def forget(self, client: Client) -> None:
        """A connection that ended."""
        self.live.discard(client)
        self.muted.discard(client)

    def every(self) -> list[Client]:
        """Every connection, live and muted."""
        return [*self.live, *self.muted]

    def open(self, numbers: Collection[int] | None = None) -> list[Client]:
        """Open, not yet dropped connections: all, or those numbered in ``numbers``."""
        return [
            c
            for c in self.every()
            if not c.closed and c.mode != "dropped" and (numbers is None or c.number in numbers)
        ]

    def mute(self, client: Client, mode: Mode, *, clear: bool = True) -> None:
        """
        Take ``client`` off the tape in ``mode``: it gets no frame from now on,
        and is not waited for. ``clear=False`` still writes what is queued.
        """
        client.mode = mode
        if client in self.live:
            self.live.discard(client)
            self.muted.add(client)
        if clear:
            client.outbox.clear()
        client.close_space()

    def restore(self, client: Client) -> None:
        """Put a muted ``client`` back on the tape, served normally."""
        client.mode = "normal"
        self.muted.discard(client)
        self.live.add(client)

    async def wait_room(self) -> None:
        """Wait until every live outbox has room (the tape's back-pressure)."""
        for client in list(self.live):
            await client.wait_room()

    async def wait_drained(self) -> None:
        """Wait until every live client's outbox was written to its socket."""
        for client in list(self.live):
            await client.wait_drained()
