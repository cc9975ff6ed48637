"""
The capture format: recorded market-channel frames, loaded once and merged.

A capture is a file of WebSocket text frames exactly as the market channel
sent them, one a line, optionally gzip-compressed (``.jsonl`` or
``.jsonl.gz``; examples/README.md, "Capture format"). A frame is one event
object or an array of them, each with ``event_type`` (docs/protocol.md,
"Server messages"). Its time is the largest event ``timestamp`` in it (unix
milliseconds); a frame without one takes its predecessor's, frames before
the first timestamped one take that one's, and times are clamped so they
never decrease within a file. Several captures are merged by frame time.

A client must subscribe to an event's asset to get it: the ``asset_id`` of
most events, every ``price_changes[]`` entry's of a price change; ``new_market``
and ``market_resolved`` are venue-wide, and ``best_bid_ask`` and those two
go only to clients with ``custom_feature_enabled`` (docs/protocol.md,
"Subscribing").
"""

from __future__ import annotations

import gzip
import heapq
import re
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import attrs
import orjson

from polystream.errors import ReplayError
from polystream.replay.books import Event, ReplayBooks

__all__ = [
    "CUSTOM_EVENTS",
    "VENUE_WIDE_EVENTS",
    "Capture",
    "Frame",
    "encode",
    "event_assets",
    "shift_frame",
]

CUSTOM_EVENTS = frozenset({"best_bid_ask", "new_market", "market_resolved"})
"""Events sent only to clients that set ``custom_feature_enabled``."""
VENUE_WIDE_EVENTS = frozenset({"new_market", "market_resolved"})
"""Events of no one asset: every custom-feature client gets them."""

_TIMESTAMP = re.compile(r'"timestamp":(\s*)"(\d+)"')


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
        scratch = ReplayBooks()
        for frame in frames:
            scratch.apply_checked(frame.events, frame.source)
        markets = {asset: book.market for asset, book in scratch.books.items()}
        paths_read = tuple(Path(p) for p in paths)
        return cls(frames=frames, markets=markets, paths=paths_read, first_ms=_first_ms(frames))

    def schedule(self, speed: float) -> list[float]:
        """
        Seconds after the start of a pass at which each frame is due.

        Frame *i* is due ``(t_i - t_0) / speed`` after the first; ``speed`` > 0.
        """
        t0 = self.frames[0].time_ms
        scale = 1.0 / (1000.0 * speed)
        return [(frame.time_ms - t0) * scale for frame in self.frames]


def _first_ms(frames: Iterable[Frame]) -> dict[str, int]:
    """Asset id -> the earliest ``timestamp`` of its events, ms."""
    first_ms: dict[str, int] = {}
    for frame in frames:
        for event in frame.events:
            stamp = event.get("timestamp")
            if stamp is not None:
                for asset_id in event_assets(event):
                    first_ms[asset_id] = min(first_ms.get(asset_id, int(stamp)), int(stamp))
    return first_ms


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
    time_ms, assets, plain = _scan(events, source)
    return Frame(
        text=text,
        time_ms=time_ms,
        events=tuple(events),
        is_array=is_array,
        asset_ids=frozenset(assets),
        plain=plain,
        source=source,
    )


def _scan(events: Iterable[Any], source: str) -> tuple[int, set[str], bool]:
    """
    The frame time (-1 without any ``timestamp``), the assets and whether the
    frame is plain (:attr:`Frame.plain`) of one line's events.
    """
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
        per_event = event_assets(event)
        if not per_event or event["event_type"] in CUSTOM_EVENTS:
            plain = False
        assets.update(per_event)
    return time_ms, assets, plain


def event_assets(event: Event) -> list[str]:
    """Asset ids a client must subscribe to for ``event`` (none: venue-wide or unknown)."""
    if event["event_type"] in VENUE_WIDE_EVENTS:
        return []
    changes = event.get("price_changes")
    if isinstance(changes, list):
        return [str(entry.get("asset_id")) for entry in changes if isinstance(entry, dict)]
    asset = event.get("asset_id")
    return [asset] if isinstance(asset, str) else []


def shift_frame(frame: Frame, offset_ms: int) -> Frame:
    """``frame`` with every ``timestamp`` moved ``offset_ms`` later (a looped lap)."""
    text = _TIMESTAMP.sub(
        lambda m: f'"timestamp":{m.group(1)}"{int(m.group(2)) + offset_ms}"', frame.text
    )
    data = orjson.loads(text)
    events = tuple(data) if frame.is_array else (data,)
    return attrs.evolve(frame, text=text, time_ms=frame.time_ms + offset_ms, events=events)


def encode(value: Any) -> str:
    """``value`` (an event, or a list of them) as the text of one frame: compact JSON."""
    return orjson.dumps(value).decode()
