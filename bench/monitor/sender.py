"""
The monitor benchmark's WebSocket sender (:class:`bench.harness.ExpectingServer`):
it holds the tape until told, then writes whole frames in chunks of at most
64 KiB, a chunk always ending at a frame that first crosses a rule, and stamps
each chunk's frames with the ``time.monotonic()`` after its write; it stamps
every text ``PING`` from the daemon on arrival and answers ``PONG`` at once.
"""

from __future__ import annotations

import array
import socket
import time
from collections import Counter
from collections.abc import Iterator

import attrs
import trio

from bench.harness import ExpectingServer, Link, Session
from bench.monitor.recording import Recording

CHUNK_BYTES = 64 * 1024
SEND_BUFFER_BYTES = 64 * 1024  # SO_SNDBUF of each connection (Linux doubles it)


@attrs.define(eq=False)
class Playback(Session):
    """
    One expected daemon connection: what to send (``repeat`` times, at
    ``speed`` x recorded speed or as fast as possible when None) and what the
    sender saw. ``sent_at[i]`` stamps frame ``i`` of the first repetition.
    """

    recording: Recording
    repeat: int
    speed: float | None
    cuts: frozenset[int]
    go: trio.Event = attrs.field(factory=trio.Event)  # set once hold_until is
    hold_until: float = 0.0  # epoch s: no frame before
    started: trio.Event = attrs.field(factory=trio.Event)
    first_byte_wall: float | None = None
    sent_all: trio.Event = attrs.field(factory=trio.Event)
    sent_at: array.array[float] = attrs.field(factory=lambda: array.array("d"))
    frames_sent: int = 0
    pings: list[float] = attrs.field(factory=list)
    pongs: int = 0
    other_text: Counter[str] = attrs.field(factory=Counter)
    all_frames: tuple[bytes, ...] = ()

    def __attrs_post_init__(self) -> None:
        self.all_frames = tuple(
            frame for lap in range(self.repeat) for frame in self.recording.lap(lap)
        )

    @property
    def total_frames(self) -> int:
        """Frames to send: one repetition times ``repeat``."""
        return len(self.recording.frames) * self.repeat

    def chunks(self) -> Iterator[tuple[int, int]]:
        """``(start, end)`` global frame ranges: <= 64 KiB, ending at every cut frame."""
        frames, n = self.all_frames, len(self.recording.frames)
        start, size = 0, 0
        for g in range(self.total_frames):
            size += len(frames[g])
            if size >= CHUNK_BYTES or (g < n and g in self.cuts) or g == self.total_frames - 1:
                yield start, g + 1
                start, size = g + 1, 0


@attrs.define(eq=False)
class Sender(ExpectingServer[Playback]):
    """The bench's WebSocket server; a connection nobody expected (a reconnect) is counted."""

    async def play(self, link: Link, playback: Playback) -> None:
        """
        Once ``playback.go`` is set and ``hold_until`` (epoch s) has passed, the
        chunks, paced to ``speed`` if given; then keep the connection (PINGs are
        answered all along) until the daemon closes it.
        """
        recording, speed = playback.recording, playback.speed
        n = len(recording.frames)
        playback.sent_at = array.array("d", bytes(8 * n))
        # The sender's own kernel queue is kept short: at maximum speed it runs ahead
        # of the daemon, and a frame's stamp (taken when its chunk entered this queue)
        # would otherwise measure how deep Linux lets the queue grow (MBs), not the daemon.
        link.stream.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
        await playback.go.wait()  # the tape waits (PINGs are answered meanwhile)
        await trio.sleep(max(0.0, playback.hold_until - time.time()))
        start = trio.current_time()
        playback.first_byte_wall = time.time()
        playback.first_byte_at = time.monotonic()
        playback.started.set()
        for begin, end in playback.chunks():
            if speed is not None:  # the chunk's last frame is due at its recorded offset / speed
                offset_ms = recording.times_ms[(end - 1) % n] - recording.times_ms[0]
                await trio.sleep_until(start + offset_ms / 1000 / speed)
            await link.send_bytes(b"".join(playback.all_frames[begin:end]))
            stamp = time.monotonic()
            for g in range(begin, min(end, n)):
                playback.sent_at[g] = stamp
            playback.frames_sent = end
        playback.sent_all_at = time.monotonic()
        playback.sent_all.set()
        await trio.sleep_forever()  # until the daemon closes: keep answering PINGs

    async def on_text(self, link: Link, playback: Playback, message: str, arrived: float) -> None:
        """Stamp a text ``PING`` on arrival and answer ``PONG`` at once; count anything else."""
        if message != "PING":
            playback.other_text[message[:40]] += 1
            return
        playback.pings.append(arrived)
        await link.send_text("PONG")
        playback.pongs += 1
