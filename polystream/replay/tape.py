"""
The tape: the one shared walk through a capture, and the books it leaves behind.

Every connection of a replay server is served from one :class:`Tape`. It
keeps the current L2 book and last trade price of every asset of the
capture, subscribed or not, so a client that subscribes late gets the book
as it stands, as from the real server (:meth:`Tape.snapshot`). Every
snapshot carries the venue's ``hash`` (docs/protocol.md, "Book hash"); the
snapshot of a book that has not changed since a recorded snapshot with
``tick_size`` and ``last_trade_price`` has that snapshot's hash. Recorded
frames are sent as recorded, ``hash`` included (the ``updown`` and
``aaimek`` captures carry assigned ones).

Tick sizes (``tick_changes``). The venue changes a book's tick from 0.01 to
0.001 when its price passes 0.96 or 0.04 and back, sends
``tick_size_change`` (``old_tick_size``, ``new_tick_size``), and then no
fresh ``book``: ``price_change`` frames keep coming with their own
``best_bid`` / ``best_ask`` (docs/protocol.md, "Server messages" and "What
the venue really does"). :meth:`Tape.tick_crossings`, called after each
frame, finds the books of the frame's assets that cross: a 0.01 book whose
best bid went above :data:`TICK_HIGH` or best ask below :data:`TICK_LOW`
goes to 0.001, and a book it lowered goes back to 0.01 once both sides are
present within [0.04, 0.96]. The change is recorded in the tape's book
(later snapshots and REST books carry the new tick); the server sends it.
Books recorded on another tick are left alone.
"""

from __future__ import annotations

from decimal import Decimal

import attrs
import trio

from polystream.replay.books import Event, ReplayBook, ReplayBooks, hash_with_tail
from polystream.replay.capture import Capture, Frame, encode
from polystream.replay.synthetic import SyntheticAsset

__all__ = ["TICK_HIGH", "TICK_LOW", "Tape", "TickChange"]

TICK_HIGH = Decimal("0.96")
"""A best bid above this lowers a 0.01 tick to 0.001 (docs/protocol.md, "Server messages")."""
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
        """The ``tick_size_change`` event as the venue sends it (protocol.md, "Server messages")."""
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
            text=encode(event),
            time_ms=self.timestamp_ms,
            events=(event,),
            is_array=False,
            asset_ids=frozenset({self.asset_id}),
            plain=True,
            source=f"tick_size_change:{self.asset_id}",
        )


def _tick_target(book: ReplayBook, lowered: bool) -> str | None:
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
    _books: ReplayBooks = attrs.field(factory=ReplayBooks, alias="_books")
    _time_ms: int | None = attrs.field(default=None, alias="_time_ms")
    _label_cache: dict[str, tuple[int, Event, bytes]] = attrs.field(
        factory=dict, alias="_label_cache"
    )
    _lowered: set[str] = attrs.field(factory=set, alias="_lowered")

    def apply(self, frame: Frame) -> None:
        """Apply ``frame`` to the books and count it as played."""
        self._books.apply(frame.events)
        self._time_ms = frame.time_ms
        self.frames_played += 1
        self.events_played += len(frame.events)

    def knows(self, asset_id: str) -> bool:
        """Whether the capture has any event of ``asset_id``."""
        return asset_id in self.capture.markets

    def book(self, asset_id: str) -> ReplayBook | None:
        """The current book of ``asset_id``; None before its first event or when unknown."""
        return self._books.books.get(asset_id)

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
            target = _tick_target(book, asset_id in self._lowered)
            if target is not None:
                changes.append(self._change_tick(asset_id, book, target, frame.time_ms, index))
        return changes

    def _change_tick(
        self, asset_id: str, book: ReplayBook, target: str, time_ms: int, index: int
    ) -> TickChange:
        """Move ``book`` to the tick ``target``; the change as sent before frame ``index``."""
        change = TickChange(
            asset_id=asset_id,
            market=book.market,
            old_tick_size=book.current_tick_size(),
            new_tick_size=target,
            timestamp_ms=time_ms,
            frame=index,
            lap=self.laps,
        )
        book.tick_size = target
        if asset_id in self._lowered:
            self._lowered.discard(asset_id)
        else:
            self._lowered.add(asset_id)
        self._label_cache.pop(asset_id, None)
        return change

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
        book = self._books.books.get(asset_id) or ReplayBook(market=market)
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
        digest = hash_with_tail(label.market, label.asset_id, base["timestamp"], tail)
        return {**base, "market": label.market, "asset_id": label.asset_id, "hash": digest}
