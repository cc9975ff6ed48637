"""
Faults a replay server can apply: the ones the tape fires by itself, and the log of those applied.

For the fault tests and ``bench/recovery.py``. Each fault is a method of
:class:`ReplayServer` to call at a chosen moment, a :class:`ScheduledFault`
the tape fires by itself after frame N or every N frames
(``--fault ACTION:after=N``), or a policy (server options):

* ``drop-tcp`` / ``drop-reset`` / ``drop-close`` (:meth:`ReplayServer.drop`):
  end connections abruptly, by a TCP FIN or RST without a close frame, or by
  a close frame;
* ``half-open`` (:meth:`ReplayServer.half_open`): the socket stays open,
  nothing comes back (no ``PONG``, no data);
* ``silence`` (:meth:`ReplayServer.silence`): ``PONG`` keeps coming, data
  does not (docs/protocol.md, "Heartbeat");
* ``stall`` (:meth:`ReplayServer.stall`): half of one frame's bytes, then nothing;
* ``garbage`` (:meth:`ReplayServer.inject_garbage`): bad input between two
  real frames (:mod:`polystream.replay.garbage`);
* ``pause`` (:meth:`ReplayServer.pause`): a quiet market (the tape holds,
  links stay up);
* policies: an oversized subscribe closes the connection a little later,
  unserved; handshakes beyond K accepted in T s get HTTP 429; every
  handshake refused (``refusing``) (docs/protocol.md, "Limits").

A faulted connection is taken off the tape (the tape neither sends to it nor
waits for it) and a new connection is served normally, with the books as they
stand, so a client that reconnects converges on the undisturbed final state.
"""

from __future__ import annotations

import attrs

from polystream.errors import ReplayError

__all__ = ["FAULT_ACTIONS", "FaultRecord", "ScheduledFault"]

FAULT_ACTIONS = (
    "drop-tcp",
    "drop-reset",
    "drop-close",
    "half-open",
    "silence",
    "stall",
    "garbage",
    "pause",
)
"""Actions a :class:`ScheduledFault` (and ``--fault``) can name."""


@attrs.frozen
class ScheduledFault:
    """
    A fault the tape triggers by itself, at a chosen frame.

    Attributes:
        action: one of :data:`FAULT_ACTIONS`: ``drop-tcp`` / ``drop-reset`` /
            ``drop-close`` (:meth:`ReplayServer.drop`), ``half-open``
            (:meth:`ReplayServer.half_open`), ``silence``
            (:meth:`ReplayServer.silence`), ``stall``
            (:meth:`ReplayServer.stall`), ``garbage``
            (:meth:`ReplayServer.inject_garbage`, the whole catalogue but
            ``not_utf8_text``) or ``pause`` (:meth:`ReplayServer.pause`).
        after: fire once, after this many frames of a pass were dispatched (>= 1).
        every: fire after every this many frames (>= 1).
        duration: for ``pause``: seconds until the tape resumes (0: never).

    Exactly one of ``after`` and ``every`` is set. The fault hits every
    connection open at that moment, between two frames.

    Raises:
        ReplayError: both or neither of ``after`` / ``every``, or a count < 1.
        ValueError: an unknown action.
    """

    action: str = attrs.field(validator=attrs.validators.in_(FAULT_ACTIONS))
    after: int | None = None
    every: int | None = None
    duration: float = 0.0

    def __attrs_post_init__(self) -> None:
        if (self.after is None) == (self.every is None):
            raise ReplayError(f"fault {self.action}: give exactly one of after= and every=")
        if (self.after or self.every or 0) < 1:
            raise ReplayError(f"fault {self.action}: the frame count must be >= 1")

    @classmethod
    def parse(cls, spec: str) -> ScheduledFault:
        """
        Read ``ACTION:after=N``, ``ACTION:every=N`` (the ``--fault`` flag), with
        an optional ``,duration=S`` for ``pause``: ``drop-tcp:after=5000``,
        ``garbage:every=500``, ``pause:after=100,duration=3``.

        Raises:
            ReplayError: not of that form, or an unknown action.
        """
        action, _, rest = spec.partition(":")
        values: dict[str, str] = {}
        for part in filter(None, rest.split(",")):
            key, sep, value = part.partition("=")
            if not sep or key not in ("after", "every", "duration"):
                raise ReplayError(f"--fault {spec!r}: expected ACTION:after=N or ACTION:every=N")
            values[key] = value
        if action not in FAULT_ACTIONS:
            raise ReplayError(f"--fault {spec!r}: action must be one of {', '.join(FAULT_ACTIONS)}")
        try:
            return cls(
                action,
                after=int(values["after"]) if "after" in values else None,
                every=int(values["every"]) if "every" in values else None,
                duration=float(values.get("duration", 0.0)),
            )
        except ValueError as exc:
            raise ReplayError(f"--fault {spec!r}: {exc}") from exc

    def due(self, count: int) -> bool:
        """Whether it fires once ``count`` frames of the pass were dispatched."""
        if self.every is not None:
            return count % self.every == 0
        return count == self.after


@attrs.frozen
class FaultRecord:
    """
    One fault the server applied (kept always, in :attr:`ReplayServer.fault_log`).

    Attributes:
        action: what was done (``drop-tcp``, ``silence``, ``reject-429``,
            ``oversize-close``, ``garbage``, ...).
        at: ``time.monotonic()`` when it was applied (for a drop: before the
            socket was closed).
        clients: the connection numbers it hit.
        frame: frames of the tape dispatched so far (all passes).
    """

    action: str
    at: float
    clients: tuple[int, ...]
    frame: int
