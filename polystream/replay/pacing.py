"""
When each frame of the tape is due: the recorded pace, maximum speed, pause and resume.

A pass sends its first frame at once and frame *i* ``(t_i - t_0) / speed``
seconds later (examples/README.md, "Capture format"), or, at maximum speed,
as soon as every client has room. A pause holds the tape (a quiet market);
on resume the schedule shifts by the pause, or restarts from the current
frame at a new speed. Time is trio time, so tests run it under a mock clock.
"""

from __future__ import annotations

import attrs
import trio

from polystream.replay.capture import Capture

__all__ = ["Pacer"]


@attrs.define(eq=False)
class Pacer:
    """
    The pace of one tape.

    Attributes:
        capture: the frames (their times make the schedule).
        speed: the speed factor each pass starts with, > 0.
        max_speed: ignore recorded times (cleared by ``resume(speed=...)``).
        paused: the tape is held (:meth:`pause`).
    """

    capture: Capture
    speed: float
    max_speed: bool
    paused: bool = False
    _base: list[float] | None = attrs.field(default=None, init=False)
    _schedule: list[float] = attrs.field(factory=list, init=False)
    _start: float = attrs.field(default=0.0, init=False)
    _repace: float | None = attrs.field(default=None, init=False)
    _resumed: trio.Event = attrs.field(factory=trio.Event, init=False)

    def begin_pass(self) -> None:
        """A new pass starts now, at :attr:`speed` (also after a ``resume(speed=...)``)."""
        if self._base is None:
            self._base = self.capture.schedule(self.speed)
        self._schedule = self._base
        self._start = trio.current_time()

    async def wait_due(self, index: int) -> None:
        """Wait while paused, then until frame ``index`` of the pass is due."""
        if self.paused:
            self._start += await self._wait_resumed()
        if self._repace is not None:  # resumed at a new pace: this frame is due now
            self._schedule = self.capture.schedule(self._repace)
            self._start = trio.current_time() - self._schedule[index]
            self._repace = None
        if self.max_speed:
            await trio.lowlevel.checkpoint()
        else:
            await trio.sleep_until(self._start + self._schedule[index])

    async def _wait_resumed(self) -> float:
        """Wait while paused; returns the seconds waited (the schedule shifts by them)."""
        began = trio.current_time()
        while self.paused:
            await self._resumed.wait()
        return trio.current_time() - began

    def pause(self, duration: float, nursery: trio.Nursery | None) -> None:
        """Hold the tape; with ``duration`` > 0 (and a ``nursery``) resume by itself then."""
        self.paused = True
        if duration > 0 and nursery is not None:
            nursery.start_soon(self._resume_after, duration)

    async def _resume_after(self, duration: float) -> None:
        await trio.sleep(duration)
        self.resume()

    def resume(self, *, speed: float | None = None) -> None:
        """Let a paused tape go on; with ``speed`` (> 0), paced from here at that speed."""
        if speed is not None:
            self.max_speed = False
            self._repace = speed
        self.paused = False
        self._resumed.set()
        self._resumed = trio.Event()
