"""
PING/PONG bookkeeping of one market-channel connection, in trio seconds.

The client sends the text ``PING`` every ``feed.ping_interval`` seconds and
the server answers ``PONG`` (docs/protocol.md, "Heartbeat"); any frame also
proves the link alive, so a PONG queued behind a burst of data does not make
a healthy link look dead.
"""

from __future__ import annotations

import attrs

__all__ = ["Heartbeat"]


@attrs.define
class Heartbeat:
    """
    PING/PONG bookkeeping of one connection, in trio seconds.

    ``outstanding_since`` is when the oldest unanswered PING was sent; the
    reader clears it on ``PONG``.
    """

    last_sent: float | None = None
    outstanding_since: float | None = None
    last_received: float = 0.0

    def silent_since(self) -> float | None:
        """
        Since when the link has been unanswered: the oldest unanswered PING,
        or the last frame received after it (any frame proves the link is
        alive, and a PONG queued behind a burst of data arrives late).
        """
        if self.outstanding_since is None:
            return None
        return max(self.outstanding_since, self.last_received)

    def sent(self, now: float) -> None:
        """A PING went out at ``now``."""
        self.last_sent = now
        if self.outstanding_since is None:
            self.outstanding_since = now

    def answered(self, now: float) -> float | None:
        """A PONG arrived at ``now``: returns the round trip of the last PING (s)."""
        self.outstanding_since = None
        return None if self.last_sent is None else now - self.last_sent
