"""
The monitor benchmark's tape: the capture encoded once, and what its books say
after every frame (best bids for TP/SL, best asks for predictions), followed with
:class:`polystream.book.Books`, the router's model.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from decimal import Decimal
from pathlib import Path
from typing import Literal

import attrs
import orjson

from bench.harness import (
    CAPTURE_EXPECTED,
    BenchError,
    Market,
    capture_lines,
    lap_offset_ms,
    shift_timestamps,
    text_frames,
)

Kind = Literal["take_profit", "stop_loss"]


@attrs.frozen
class Recording:
    """
    One repetition of the capture: each frame encoded as a server-to-client
    WebSocket text frame, its server timestamp (ms), and per asset the best
    bid after every frame that moved it (``(frame index, bid)``, unknown
    bids left out: the monitor does not compare those) and the best ask
    after every such frame (``(frame index, ask or None)``), and the best ask
    of every asset after the last frame. Books are kept with
    :class:`polystream.book.Books`, the router's model; the final asks are
    checked against ``expected.json`` in :meth:`AskFacts.of`.
    """

    frames: tuple[bytes, ...]
    times_ms: tuple[int, ...]
    events: int
    bids: dict[str, list[tuple[int, Decimal]]]
    asks: dict[str, list[tuple[int, Decimal | None]]]
    final_asks: dict[str, Decimal | None]
    lines: tuple[bytes, ...] = ()

    def lap(self, number: int) -> tuple[bytes, ...]:
        """The frames of repetition ``number``, timestamps moved after the previous one's
        (a repeated, older timestamp is rightly dropped by the daemon as stale)."""
        if number == 0:
            return self.frames
        return tuple(text_frames(self.lap_lines(number)))

    def lap_lines(self, number: int) -> list[bytes]:
        """The JSON lines of repetition ``number`` (timestamps shifted as in :meth:`lap`)."""
        offset = number * lap_offset_ms(self.lines)
        return [shift_timestamps(line, offset) for line in self.lines]

    @classmethod
    def load(cls, path: Path) -> Recording:
        """
        Read and encode the capture, following its books.

        Raises:
            BenchError: a second repetition does not end in the state the
                first ends in (the daemon sees several).
        """
        from polystream.book import Books
        from polystream.feed.protocol import parse_frame

        books = Books()
        bids: dict[str, list[tuple[int, Decimal]]] = {}
        asks: dict[str, list[tuple[int, Decimal | None]]] = {}
        times: list[int] = []
        events = 0
        lines = capture_lines(path)
        for index, line in enumerate(lines):
            stamp = times[-1] if times else 0
            parsed = parse_frame(line)
            events += len(parsed.event_types)
            for event in parsed.events:
                stamp = max(stamp, getattr(event, "timestamp_ms", 0) or 0)
            times.append(stamp)
            for asset in books.apply(parsed.events).moved:
                bid, ask = books[asset].best_bid, books[asset].best_ask
                if bid is not None:
                    bids.setdefault(asset, []).append((index, bid))
                asks.setdefault(asset, []).append((index, ask))
        final = {asset: book.best_ask for asset, book in books.items()}
        frames = tuple(text_frames(lines))
        recording = cls(frames, tuple(times), events, bids, asks, final, tuple(lines))
        for line in recording.lap_lines(1):
            books.apply(parse_frame(line).events)
        if {asset: book.best_ask for asset, book in books.items()} != final:
            raise BenchError("a second repetition of the capture ends in another state")
        return recording

    @property
    def bytes(self) -> int:
        """Encoded size of one repetition."""
        return sum(len(frame) for frame in self.frames)


@attrs.frozen
class BidPath:
    """One asset's best-bid path with running extremes, for first crossings in O(log n)."""

    frames: list[int]
    bids: list[Decimal]
    high: list[Decimal]  # running maximum: non-decreasing
    neg_low: list[Decimal]  # minus the running minimum: non-decreasing

    @classmethod
    def of(cls, path: list[tuple[int, Decimal]]) -> BidPath:
        """The path of ``(frame, bid)`` pairs, with its running extremes."""
        high: list[Decimal] = []
        neg_low: list[Decimal] = []
        for _, bid in path:
            high.append(max(bid, high[-1]) if high else bid)
            neg_low.append(max(-bid, neg_low[-1]) if neg_low else -bid)
        return cls([f for f, _ in path], [b for _, b in path], high, neg_low)

    def first_crossing(self, kind: Kind, level: Decimal) -> tuple[int, Decimal] | None:
        """(frame, bid) of the first tick with ``bid >= level`` (TP) or ``<= level`` (SL)."""
        if kind == "take_profit":
            at = bisect.bisect_left(self.high, level)
        else:
            at = bisect.bisect_left(self.neg_low, -level)
        if at == len(self.frames):
            return None
        return self.frames[at], self.bids[at]


@attrs.frozen
class AskFacts:
    """
    What the recording says about best asks: per asset the ask after each
    frame that moved it (one repetition: later ones repeat it) and after the
    last frame (all repetitions end in that state: :meth:`Recording.load`).
    """

    asks: dict[str, list[tuple[int, Decimal | None]]]
    final: dict[str, Decimal | None]

    @classmethod
    def of(cls, recording: Recording, markets: Sequence[Market]) -> AskFacts:
        """
        The facts, with the final asks checked against ``expected.json``.

        Raises:
            BenchError: the books followed here end elsewhere than expected.json.
        """
        want = orjson.loads(CAPTURE_EXPECTED.read_bytes())["assets"]
        final: dict[str, Decimal | None] = {}
        for token in (t for m in markets for t in m.tokens):
            final[token] = recording.final_asks.get(token)
            stated = want[token]["best_ask"]
            if final[token] != (None if stated is None else Decimal(stated)):
                raise BenchError(f"final ask of {token[:10]}: {final[token]} != {stated}")
        return cls(recording.asks, final)

    def first_ask(
        self, asset: str, forecast: Decimal | None = None, min_edge: Decimal | None = None
    ) -> Decimal | None:
        """
        The first ask the tape gives ``asset`` (with ``forecast``: the first
        with ``forecast - ask >= min_edge``); None if it never does.
        """
        for _, ask in self.asks.get(asset, []):
            if ask is None:
                continue
            if forecast is None or forecast - ask >= (min_edge or Decimal(0)):
                return ask
        return None

    def quoted_at_end(self) -> set[str]:
        """Assets with a best ask after the last frame."""
        return {asset for asset, ask in self.final.items() if ask is not None}
