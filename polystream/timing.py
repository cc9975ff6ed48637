"""
Time-driven building blocks: reconnect backoff, debounce with a max wait,
and a token bucket that defers instead of dropping.

All take the current time as an argument (``trio.current_time()`` seconds),
so they are tested under ``trio.testing.MockClock`` and hold no clock of
their own.
"""

from __future__ import annotations

import heapq
import random
import time
from collections.abc import Hashable
from typing import Generic, Protocol, TypeVar

import trio

__all__ = [
    "SLICE_SECONDS",
    "Backoff",
    "Debouncer",
    "Flushing",
    "Slices",
    "TokenBucket",
    "run_flushes",
]

SLICE_SECONDS = 0.0005
"""
CPU seconds of work a task does between two checkpoints when it has much to do
at once (a big frame's parse, the router's frames, a burst of decisions or of
log lines): the loop's other tasks, the heartbeat among them, wait that long.
"""

K = TypeVar("K", bound=Hashable)


class Slices:
    """
    Checkpoints in a long piece of CPU work: ``await slices.tick()`` after each
    item yields to the scheduler once ``budget`` seconds (``perf_counter``)
    have passed since the last yield, else returns at once.
    """

    def __init__(self, budget: float = SLICE_SECONDS) -> None:
        self.budget = budget
        self._started = time.perf_counter()

    async def tick(self) -> bool:
        """Yield (``trio.lowlevel.checkpoint``) if the slice is used up; whether it did."""
        if time.perf_counter() - self._started <= self.budget:
            return False
        await trio.lowlevel.checkpoint()
        self._started = time.perf_counter()
        return True


class Backoff:
    """
    Exponential backoff with full jitter (AWS Architecture Blog, "Exponential
    Backoff And Jitter"): attempt n waits ``uniform(0, min(max, initial * 2**n))``
    seconds. ``reset()`` after a connection has been healthy.
    """

    def __init__(self, initial: float, maximum: float, rng: random.Random | None = None) -> None:
        self.initial = initial
        self.maximum = maximum
        self.attempt = 0
        self._rng = rng or random.Random()

    def next_delay(self) -> float:
        """Return the next delay in seconds and count the attempt."""
        cap = min(self.maximum, self.initial * (2**self.attempt))
        self.attempt = min(self.attempt + 1, 62)
        return self._rng.uniform(0, cap)

    def reset(self) -> None:
        """Start again from ``initial``."""
        self.attempt = 0


class Debouncer(Generic[K]):
    """
    Debounce with a max wait: a key touched at time t is due at
    ``t_first + window``, where ``t_first`` is its first touch since it was
    last taken. So a key fires at most once per window and at most one window
    after any change, even when it changes every 100 ms (a pure trailing
    debounce would never fire then).
    """

    def __init__(self, window: float) -> None:
        self.window = window
        self._due: dict[K, float] = {}
        self._heap: list[tuple[float, int, K]] = []
        self._seq = 0

    def touch(self, key: K, now: float) -> None:
        """Record a change of ``key`` at ``now`` (seconds)."""
        if key in self._due:
            return
        due = now + self.window
        self._due[key] = due
        self._seq += 1
        heapq.heappush(self._heap, (due, self._seq, key))

    def next_due(self) -> float | None:
        """Time the earliest pending key is due, or None if nothing is pending."""
        return self._heap[0][0] if self._heap else None

    def pop_due(self, now: float) -> list[K]:
        """Take every key due at or before ``now``, earliest first."""
        keys: list[K] = []
        while self._heap and self._heap[0][0] <= now:
            _, _, key = heapq.heappop(self._heap)
            del self._due[key]
            keys.append(key)
        return keys

    def pop_all(self) -> list[K]:
        """Take every pending key (for the final flush at shutdown)."""
        keys = [key for _, _, key in sorted(self._heap)]
        self._heap.clear()
        self._due.clear()
        return keys

    def __len__(self) -> int:
        return len(self._due)


class TokenBucket:
    """
    ``rate`` tokens per second, at most ``capacity`` banked. ``try_take``
    never blocks; callers keep what did not fit and retry at ``ready_at``.
    """

    def __init__(self, rate: float, capacity: float | None = None, now: float = 0.0) -> None:
        self.rate = rate
        self.capacity = capacity if capacity is not None else max(rate, 1.0)
        self._tokens = self.capacity
        self._at = now

    def _refill(self, now: float) -> None:
        if now > self._at:
            self._tokens = min(self.capacity, self._tokens + (now - self._at) * self.rate)
            self._at = now

    def try_take(self, cost: float, now: float) -> bool:
        """Take ``cost`` tokens (capped at capacity) if available at ``now``."""
        self._refill(now)
        cost = min(cost, self.capacity)
        if self._tokens + 1e-9 >= cost:
            self._tokens -= cost
            return True
        return False

    def ready_at(self, cost: float, now: float) -> float:
        """Earliest time ``cost`` tokens will be available."""
        self._refill(now)
        missing = min(cost, self.capacity) - self._tokens
        return now if missing <= 0 else now + missing / self.rate


class Flushing(Protocol):
    """A part that coalesces work and writes it all at once (:func:`run_flushes`)."""

    wake: trio.Event
    """Set when there is something to write; replaced by :func:`run_flushes` once taken."""

    async def flush(self) -> bool:
        """Write everything pending now; False when it failed (and keeps it for later)."""
        ...


async def run_flushes(
    part: Flushing,
    backoff: Backoff,
    *,
    delay: float,
    final_seconds: float,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """
    The loop of a coalescing writer: wait for ``part.wake``, ``delay``
    seconds more (what comes meanwhile goes in the same write), then
    ``part.flush()``; after a failure wait ``backoff`` and flush again. On
    cancellation one last flush, shielded, of at most ``final_seconds``.
    """
    try:
        task_status.started()
        while True:
            await part.wake.wait()
            await trio.sleep(delay)
            part.wake = trio.Event()
            if await part.flush():
                backoff.reset()
            else:
                part.wake.set()
                await trio.sleep(backoff.next_delay())
    finally:
        with trio.move_on_after(final_seconds, shield=True):
            await part.flush()
