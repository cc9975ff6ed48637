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

A line may also be an envelope, as ``polystream record`` writes them:
``{"received_ms":<unix ms>,"frame":<the frame>}`` (no ``event_type`` at its
top level). Its frame is read as a plain line's, its text kept byte for byte
when the envelope is laid out exactly so (else the frame re-encoded
compactly). Its frame time is ``received_ms``, the recorder's clock: a
recording replays at the pace its frames arrived, and the files of one
recording merge back in the order they were received (event times can go
back: a book dump after a reconnect carries each book's own last-change
time). Clamping and merging work as for plain lines, so a recording merged
with a plain capture is ordered by two clocks (receive time is event time
plus the link's latency). Plain and envelope lines may be mixed.

A ``.gz`` file cut short (a recorder killed before it closed the file) is
read up to its last complete line, with a ``capture_truncated`` warning;
``name.jsonl.gz.part`` (a recorder's file still being written) reads as gzip too.

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
import structlog

from polystream.errors import ReplayError
from polystream.replay.books import Event, ReplayBooks

__all__ = [
    "CUSTOM_EVENTS",
    "VENUE_WIDE_EVENTS",
    "Capture",
    "Frame",
    "encode",
    "envelope_line",
    "event_assets",
    "shift_frame",
]

logger = structlog.get_logger(__name__)

CUSTOM_EVENTS = frozenset({"best_bid_ask", "new_market", "market_resolved"})
"""Events sent only to clients that set ``custom_feature_enabled``."""
VENUE_WIDE_EVENTS = frozenset({"new_market", "market_resolved"})
"""Events of no one asset: every custom-feature client gets them."""

_TIMESTAMP = re.compile(r'"timestamp":(\s*)"(\d+)"')
_ENVELOPE = re.compile(rb'\{"received_ms":(\d+),"frame":')  # as :func:`envelope_line` writes it


@attrs.frozen
class Frame:
    """
    One recorded WebSocket text frame, prepared once at load.

    Attributes:
        text: the frame exactly as recorded (no line end).
        time_ms: frame time, unix milliseconds: the largest event ``timestamp``
            (a frame without one takes its predecessor's time); for an
            envelope line, ``received_ms``.
        events: the parsed event objects.
        is_array: the frame is a JSON array (else a single object).
        asset_ids: assets of its per-asset events (``price_changes[]`` entries included).
        plain: every event is a per-asset, non-custom event, so a client
            subscribed to all of ``asset_ids`` can get ``text`` as is.
        source: ``path:line`` for error messages.
        received_ms: when a recorder received it (unix milliseconds, its own
            clock), from an envelope line; None for a plain line.
    """

    text: str
    time_ms: int
    events: tuple[Event, ...]
    is_array: bool
    asset_ids: frozenset[str]
    plain: bool
    source: str
    received_ms: int | None = None

    @property
    def event_count(self) -> int:
        """Number of events in the frame."""
        return len(self.events)

    @classmethod
    def parse(cls, raw: bytes, source: str, *, received_ms: int | None = None) -> Frame:
        """
        One frame from its text (UTF-8, no line end): a JSON event object or
        a non-empty array of them, each with ``event_type``. Not an envelope:
        that is a line's form (see the module docstring). ``time_ms`` is
        ``received_ms`` when given, else the largest event ``timestamp``, -1
        when no event has one (the loader fills it in).

        Raises:
            ReplayError: (named by ``source``) not UTF-8, invalid JSON, not an
                object or array of objects with ``event_type``, or a bad ``timestamp``.
        """
        text, value = _decode(raw, source)
        return cls._of(text, value, source, received_ms)

    @classmethod
    def _of(cls, text: str, value: Any, source: str, received_ms: int | None) -> Frame:
        """The frame of ``value``, parsed from ``text``."""
        is_array = isinstance(value, list)
        events: list[Any] = value if is_array else [value]
        if not events:
            raise ReplayError(f"{source}: empty array")
        time_ms, assets, plain = _scan(events, source)
        return cls(
            text=text,
            time_ms=time_ms if received_ms is None else received_ms,
            events=tuple(events),
            is_array=is_array,
            asset_ids=frozenset(assets),
            plain=plain,
            source=source,
            received_ms=received_ms,
        )


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

        Lines are plain frames or envelopes (``{"received_ms", "frame"}``; see
        the module docstring). At equal times frames keep file order, then
        argument order. Every frame is applied once to a scratch book, so a
        malformed event fails here, not during the replay. A gzip file cut
        short gives its complete lines and a ``capture_truncated`` warning.

        Raises:
            ReplayError: a file cannot be read (a corrupt gzip stream
                included), or a line (named ``path:line``) is not a frame:
                invalid JSON, not an object or array of objects with
                ``event_type``, a bad ``timestamp``, an envelope without a
                frame or with a bad ``received_ms``, or an event whose fields
                cannot be applied to a book. Also when there is no frame.
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
        if path.name.removesuffix(".part").endswith(".gz"):
            data = _gunzip(data, path)
    except (OSError, zlib.error) as exc:
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


def _gunzip(data: bytes, path: Path) -> bytes:
    """
    ``data`` decompressed (every gzip member). A stream cut short (no
    trailer: a writer that died) gives what it holds up to its last line end,
    with a ``capture_truncated`` warning; other damage raises.

    Raises:
        OSError, zlib.error: not gzip, or a corrupt stream.
    """
    try:
        return gzip.decompress(data)
    except EOFError:
        pass
    out = bytearray()
    rest = data
    while rest:
        inflater = zlib.decompressobj(wbits=31)  # 31: a gzip header and trailer
        out += inflater.decompress(rest)
        if not inflater.eof:
            break
        rest = inflater.unused_data
    complete = out[: out.rfind(b"\n") + 1]
    logger.warning(
        "capture_truncated",
        path=str(path),
        kept_bytes=len(complete),
        dropped_bytes=len(out) - len(complete),
    )
    return bytes(complete)


def _parse_line(line: bytes, source: str) -> Frame:
    """
    Parse one line, a frame or an envelope; ``time_ms`` is -1 when no event of
    the frame has a ``timestamp``.
    """
    match = _ENVELOPE.match(line)
    if match is not None and line.endswith(b"}"):  # our own layout: the frame text as sent
        try:
            return Frame.parse(line[match.end() : -1], source, received_ms=int(match.group(1)))
        except ReplayError:
            pass  # not that layout after all, or a bad frame: said below
    text, value = _decode(line, source)
    if isinstance(value, dict) and "event_type" not in value:
        return _unwrap(value, source)
    return Frame._of(text, value, source, None)


def _decode(raw: bytes, source: str) -> tuple[str, Any]:
    """``raw`` as text and as parsed JSON. Raises ReplayError: not UTF-8, not JSON."""
    try:
        return raw.decode("utf-8"), orjson.loads(raw)
    except UnicodeDecodeError as exc:
        raise ReplayError(f"{source}: not UTF-8") from exc
    except orjson.JSONDecodeError as exc:
        raise ReplayError(f"{source}: invalid JSON: {exc}") from exc


def _unwrap(envelope: Event, source: str) -> Frame:
    """
    The frame of an envelope laid out otherwise than :func:`envelope_line`
    writes it (other key order or spacing), re-encoded compactly.

    Raises:
        ReplayError: not an envelope (an object without ``event_type`` nor
            ``frame``), a ``received_ms`` that is not an integer >= 0, or a bad frame.
    """
    if "frame" not in envelope:
        hint = " (a line of record --raw?)" if "text" in envelope else ""
        raise ReplayError(f"{source}: not an event object with event_type{hint}")
    received_ms = envelope.get("received_ms")
    if type(received_ms) is not int or received_ms < 0:
        raise ReplayError(f"{source}: bad received_ms {received_ms!r}")
    value = envelope["frame"]
    return Frame._of(encode(value), value, source, received_ms)


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


def envelope_line(frame: Frame, received_ms: int) -> bytes:
    """
    The capture line of ``frame`` received at ``received_ms`` (unix
    milliseconds): ``{"received_ms":N,"frame":<text>}`` and a line end, the
    frame's text as received, or re-encoded compactly when it holds a line
    break (pretty-printed JSON) and so cannot stand on one line.
    """
    text = frame.text
    if "\n" in text or "\r" in text:
        text = encode(list(frame.events) if frame.is_array else frame.events[0])
    return b'{"received_ms":%d,"frame":%b}\n' % (received_ms, text.encode())
