"""
What the recorder writes for each received message: capture lines, raw lines.

Blocking code, run in a worker thread a batch at a time
(:meth:`RecordSink.write_batch`). A message becomes:

* in the capture files, an envelope line ``{"received_ms":N,"frame":<frame>}``
  (:func:`polystream.replay.capture.envelope_line`) when it is a frame
  :meth:`polystream.replay.Capture.load` accepts: checked here by the same
  parser and applied to a scratch book, so a recording always loads. Control
  texts (``PONG``, ``INVALID OPERATION``, ``NO NEW ASSETS``) are counted and
  left out; anything else (binary, not UTF-8, not JSON, no ``event_type``, an
  event a book cannot take) is counted by kind, logged (one line per kind
  per 10 s) and left out;
* with ``--raw``, also a raw line in the raw files, for every message:
  ``{"received_ms":N,"text":"<the text exactly>"}``, or for a binary frame or
  text that is not UTF-8 ``{"received_ms":N,"base64":"...","binary":true|false}``.
"""

from __future__ import annotations

import base64
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import attrs
import orjson
import structlog

from polystream.errors import ReplayError
from polystream.feed.protocol import CONTROL_FRAMES
from polystream.feed.transport import Message
from polystream.logs import RateLimitedLog
from polystream.record.files import FileSet
from polystream.replay.books import ReplayBooks
from polystream.replay.capture import Frame, envelope_line

__all__ = ["Received", "RecordSink", "RecordStats", "raw_line"]

logger = structlog.get_logger(__name__)

Received = tuple[Message, int]
"""One message as a shard received it, and when: unix milliseconds."""

_CONTROL_BYTES = frozenset(text.encode() for text in CONTROL_FRAMES)


@attrs.define
class RecordStats:
    """
    Counters of one recording. The ``frames_*`` and ``bytes_*`` counters,
    ``bad_frames``, ``control_frames`` and ``files`` are written by the
    writer thread only, the others by trio tasks only.

    Attributes:
        frames_received: messages the shards received (every one, ``PONG`` included).
        frames_recorded: lines written to the capture files.
        bytes_recorded: their uncompressed bytes.
        raw_frames: lines written to the raw files (``--raw``).
        control_frames: control texts left out of the capture files.
        bad_frames: messages left out of the capture files, by kind
            (``binary_frame``, ``not_a_frame``).
        backpressure_waits: times a shard waited for room in the writer's queue.
        batches: batches handed to the writer thread.
        files: capture and raw files completed (renamed to their final name).
    """

    frames_received: int = 0
    frames_recorded: int = 0
    bytes_recorded: int = 0
    raw_frames: int = 0
    control_frames: int = 0
    bad_frames: Counter[str] = attrs.field(factory=Counter)
    backpressure_waits: int = 0
    batches: int = 0
    files: int = 0


def raw_line(message: Message, received_ms: int) -> bytes:
    """
    The raw line of ``message`` received at ``received_ms`` (unix ms), with a
    line end: ``{"received_ms":N,"text":...}`` for text, else (a binary frame,
    text that is not UTF-8) ``{"received_ms":N,"base64":...,"binary":...}``.
    """
    if isinstance(message, str):
        try:
            return orjson.dumps({"received_ms": received_ms, "text": message}) + b"\n"
        except TypeError:  # lone surrogates: not UTF-8 after all
            message = message.encode("utf-8", "surrogatepass")
    binary = isinstance(message, bytearray)
    if not binary:
        try:
            text = bytes(message).decode("utf-8")
            return orjson.dumps({"received_ms": received_ms, "text": text}) + b"\n"
        except UnicodeDecodeError:
            pass
    encoded = base64.b64encode(message).decode()
    value = {"received_ms": received_ms, "base64": encoded, "binary": binary}
    return orjson.dumps(value) + b"\n"


@attrs.define(eq=False)
class RecordSink:
    """
    Turns batches of received messages into lines of the capture files
    (``frames``) and, with ``raw``, of the raw files (see the module docstring).

    Attributes:
        frames: the capture files.
        raw: the raw files, or None (no ``--raw``).
        stats: the counters it adds to.
    """

    frames: FileSet
    raw: FileSet | None
    stats: RecordStats
    _books: ReplayBooks = attrs.field(factory=ReplayBooks)
    _bad_log: RateLimitedLog = attrs.field(factory=RateLimitedLog)

    def write_batch(self, batch: Sequence[Received], *, sync: bool, finish: bool) -> None:
        """
        Write one batch; then with ``finish`` complete the open files (the
        next line opens new ones), else with ``sync`` sync-flush and fsync
        them (:meth:`FileSet.finish`, :meth:`FileSet.sync`).

        Raises:
            OSError: a file cannot be written, synced or renamed.
        """
        if self.raw is not None and batch:
            self.raw.write([raw_line(message, received_ms) for message, received_ms in batch])
            self.stats.raw_frames += len(batch)
        lines = [line for message, ms in batch if (line := self._line(message, ms)) is not None]
        self.frames.write(lines)
        self.stats.frames_recorded += len(lines)
        self.stats.bytes_recorded += sum(map(len, lines))
        for files in (self.frames, self.raw):
            if files is None:
                continue
            if finish:
                files.finish()
            elif sync:
                files.sync()

    def on_finished(self, path: Path, lines: int, size: int) -> None:
        """A file was completed: count and log it (``record_file_closed``)."""
        self.stats.files += 1
        logger.info("record_file_closed", path=str(path), lines=lines, bytes=size)

    def _line(self, message: Message, received_ms: int) -> bytes | None:
        """The capture line of ``message``, or None when it is left out (counted)."""
        if isinstance(message, bytearray):
            self._bad("binary_frame", f"{len(message)} bytes", message)
            return None
        raw = message.encode("utf-8", "surrogatepass") if isinstance(message, str) else message
        if len(raw) < 24 and raw.strip() in _CONTROL_BYTES:
            self.stats.control_frames += 1
            return None
        source = f"frame received_ms={received_ms}"
        try:
            frame = Frame.parse(raw, source)
            self._books.apply_checked(frame.events, source)
        except ReplayError as exc:
            self._bad("not_a_frame", str(exc).removeprefix(f"{source}: "), message)
            return None
        return envelope_line(frame, received_ms)

    def _bad(self, kind: str, detail: str, message: Message) -> None:
        self.stats.bad_frames[kind] += 1
        suppressed = self._bad_log.allow(kind, time.monotonic())
        if suppressed is not None:
            logger.warning(
                "record_bad_frame",
                kind=kind,
                detail=detail[:200],
                frame=repr(message[:200]),
                suppressed_since_last=suppressed,
            )
