"""
The fault actions: what each fault does to a server's open connections.

:class:`FaultInjector` takes connections off the tape (:meth:`Clients.mute`),
ends them without a close frame, writes half a frame or bad input to them,
refuses handshakes, and logs every fault applied (:class:`FaultRecord`).
:class:`ReplayServer` exposes these as its fault methods and fires the
scheduled ones (the faults and their sources: :mod:`polystream.replay.faults`).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Collection, Iterable

import attrs
import orjson
import structlog
import trio
from trio_websocket import ConnectionClosed, WebSocketRequest

from polystream.errors import ReplayError
from polystream.replay.client import Client, Clients, Mode
from polystream.replay.faults import FaultRecord
from polystream.replay.garbage import Garbage, chosen_kinds, garbage_frames
from polystream.replay.stats import ReplayStats
from polystream.replay.tape import Tape
from polystream.replay.wire import DropMode, RawFrame, end_connection, write_raw, ws_frame

__all__ = ["FaultInjector"]

logger = structlog.get_logger(__name__)

_Numbers = Collection[int] | None
"""Connection numbers a fault hits; None: every open connection."""


@attrs.define(eq=False)
class FaultInjector:
    """
    Applies faults to the open connections of one server.

    Attributes:
        clients: the server's connections.
        tape: its tape (for the garbage and the stalled frame, and frame counts).
        stats: its counters (``faults``, ``garbage_sent``, ``rejected``,
            ``oversized_subscribes``).
        log: every fault applied, in order.
    """

    clients: Clients
    tape: Tape
    stats: ReplayStats
    log: list[FaultRecord] = attrs.Factory(list)

    def record(self, action: str, clients: Iterable[Client]) -> list[Client]:
        """Count and log ``action`` hitting ``clients``; returns them as a list."""
        hit = list(clients)
        numbers = tuple(c.number for c in hit)
        self.stats.faults[action] += 1
        self.log.append(FaultRecord(action, time.monotonic(), numbers, self.tape.frames_played))
        logger.info("replay_fault", action=action, clients=list(numbers))
        return hit

    def take_off(self, action: str, mode: Mode, numbers: _Numbers) -> list[Client]:
        """Record ``action`` on the open connections (all, or ``numbers``) and mute them in ``mode``."""
        targets = self.record(action, self.clients.open(numbers))
        for client in targets:
            self.clients.mute(client, mode)
        return targets

    async def drop(self, how: DropMode, numbers: _Numbers, code: int, reason: str) -> int:
        """Mute the targets, then end them all; returns how many, once every socket is closed."""
        targets = self.take_off(f"drop-{how}", "dropped", numbers)
        async with trio.open_nursery() as nursery:
            for client in targets:
                nursery.start_soon(end_connection, client.ws, how, code, reason)
        return len(targets)

    def drop_soon(self, how: DropMode, numbers: _Numbers) -> int:
        """Mute the targets now; each connection's own nursery ends it just after."""

        async def end(client: Client) -> None:
            await end_connection(client.ws, how, 1011, "replay fault")

        return self._take_off_then(f"drop-{how}", "dropped", numbers, end)

    def stall(self, numbers: _Numbers) -> int:
        """Mute the targets, then write half of one frame to each (:meth:`_write_partial_frame`)."""
        return self._take_off_then("stall", "stalled", numbers, self._write_partial_frame)

    def _take_off_then(
        self,
        action: str,
        mode: Mode,
        numbers: _Numbers,
        then: Callable[[Client], Awaitable[None]],
    ) -> int:
        targets = self.take_off(action, mode, numbers)
        for client in targets:
            if client.nursery is not None:
                client.nursery.start_soon(then, client)
        return len(targets)

    async def _write_partial_frame(self, client: Client) -> None:
        """The header and half the payload of the snapshots of ``client``'s assets."""
        books = [b for a in sorted(client.subscribed) if (b := self.tape.snapshot(a)) is not None]
        payload = orjson.dumps(books or [{"event_type": "book", "padding": "x" * 4096}])
        frame = ws_frame(payload)
        await write_raw(client.ws, frame[: len(frame) - len(payload) // 2])

    def heal(self, numbers: _Numbers) -> int:
        """Put silent and half-open targets back on the tape; returns how many."""
        healed = [c for c in self.clients.open(numbers) if c.mode in ("silent", "half_open")]
        for client in self.record("heal", healed):
            self.clients.restore(client)
        return len(healed)

    def inject(self, frames: Iterable[str | bytes | RawFrame], numbers: _Numbers) -> int:
        """Queue ``frames`` to the targets served normally; returns how many."""
        items = list(frames)
        targets = self._served(numbers)
        for client in targets:
            for item in items:
                client.push(item)
        return len(targets)

    def inject_garbage(
        self,
        kinds: Iterable[str] | None,
        numbers: _Numbers,
        asset_ids: Iterable[str] | None,
        poison: bool = True,
    ) -> dict[int, list[Garbage]]:
        """
        Queue garbage (:func:`garbage_frames`) to each target served normally,
        about its assets (those of ``asset_ids`` when given); connection number
        -> what it was sent.

        Raises:
            ReplayError: an unknown kind.
        """
        chosen = None if kinds is None else chosen_kinds(kinds)
        allowed = None if asset_ids is None else set(asset_ids)
        sent: dict[int, list[Garbage]] = {}
        for client in self.record("garbage", self._served(numbers)):
            assets = client.subscribed if allowed is None else client.subscribed & allowed
            garbage = self._send_garbage(client, assets, chosen, poison)
            if garbage is not None:
                sent[client.number] = garbage
        return sent

    def _send_garbage(
        self, client: Client, assets: Iterable[str], kinds: list[str] | None, poison: bool
    ) -> list[Garbage] | None:
        """Queue garbage about ``assets`` to ``client``; None when it has no asset to spoil."""
        try:
            garbage = garbage_frames(self.tape, assets, kinds)
        except ReplayError as exc:  # e.g. no two-sided book yet: nothing to spoil
            logger.info("replay_garbage_skipped", client=client.number, reason=str(exc))
            return None
        for item in garbage:
            for frame in item.frames:
                client.push(frame)
            self.stats.garbage_sent[item.kind] += 1
        if poison and any(item.kind == "not_utf8_text" for item in garbage):
            self.clients.mute(client, "poisoned", clear=False)
        return garbage

    def _served(self, numbers: _Numbers) -> list[Client]:
        return [c for c in self.clients.open(numbers) if c.mode == "normal"]

    def close_oversized(self, client: Client, delay: float, how: DropMode) -> None:
        """An oversized subscribe: end ``client`` ``delay`` s later (code 1009), unserved."""
        self.stats.oversized_subscribes += 1
        self.record("oversize-close", [client])
        if client.nursery is not None and client.mode != "dropped":
            client.nursery.start_soon(self._close_later, client, delay, how)

    async def _close_later(self, client: Client, delay: float, how: DropMode) -> None:
        await trio.sleep(delay)
        if client.mode != "dropped":
            self.clients.mute(client, "dropped")
            await end_connection(client.ws, how, 1009, "subscribe too large")

    async def reject(self, request: WebSocketRequest, status: int) -> None:
        """Answer a handshake with HTTP ``status`` (429: ``Too Many Requests``)."""
        self.stats.rejected += 1
        self.record(f"reject-{status}", [])
        try:
            await request.reject(status, body=b"Too Many Requests" if status == 429 else None)
        except ConnectionClosed:
            pass
