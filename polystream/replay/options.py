"""
How a replay server plays and what it does wrong on purpose: one value, built once.

:class:`ReplayOptions` holds every option of ``polystream replay``. The CLI
builds it from its flags and passes it to :func:`run_replay_cli`; tests pass
one to :func:`serve_replay` or :class:`ReplayServer`, or name the fields
they change as keywords (:class:`ReplayChanges`), which go on top of the
defaults. Where the server listens (host, port, REST port) is not an
option: :meth:`ReplayServer.serve` takes it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TypedDict

import attrs

from polystream.replay.faults import ScheduledFault
from polystream.replay.wire import DropMode

__all__ = ["MAX_MESSAGE_SIZE", "ReplayChanges", "ReplayOptions"]

MAX_MESSAGE_SIZE = 16 * 2**20
"""Largest message the server accepts, bytes (subscribe frames of thousands of ids)."""


def _fault_tuple(faults: Iterable[ScheduledFault]) -> tuple[ScheduledFault, ...]:
    return tuple(faults)


@attrs.frozen
class ReplayOptions:
    """
    The options of a replay server.

    Attributes:
        speed: replay speed factor, > 0 (2.0 = twice as fast as recorded).
        max_speed: ignore recorded times; go as fast as clients take frames.
        loop: start again from the first frame after the last; each lap's
            timestamps move on by the capture's span (+1 s).
        start_when_subscribed: the tape starts when a client first subscribes
            to at least one asset (any id), not when the server starts, so
            a client started after the server misses nothing.
        synthesize: how many synthetic assets to serve besides the recorded
            ones (:mod:`polystream.replay.synthetic`); 0 = none.
        synthetic_events: forward the tape's events to synthetic copies too
            (else synthetic assets get their snapshots only).
        tick_changes: emit the venue's ``tick_size_change`` when a book crosses
            0.96 / 0.04 (:mod:`polystream.replay.tape`, "Tick sizes").
        record: keep per-connection request and snapshot logs
            (:attr:`ReplayServer.connection_logs`; memory grows with every request).
        outbox_frames: frames queued per connection before the tape waits (>= 2).
        max_message_size: largest client message accepted, bytes.
        faults: :class:`ScheduledFault` s the tape fires by itself.
        garbage_assets: assets scheduled ``garbage`` may name (None: any the
            client holds); keeps ``crossed_book`` off assets with TP/SL rules.
        max_subscribe_bytes, max_subscribe_ids: a subscribe message larger
            than this (UTF-8 bytes) or naming more ids is not served and the
            connection is closed ``oversize_close_delay`` s later, the way
            ``oversize_close`` says, as observed on the real venue
            (docs/protocol.md, "Limits"); 0 = no limit.
        storm_limit, storm_window: a handshake arriving when ``storm_limit``
            connections were accepted in the last ``storm_window`` s is
            answered ``429 Too Many Requests`` (rejected ones do not count);
            0 = no limit (docs/protocol.md, "Limits").

    Raises:
        ValueError: ``speed`` <= 0 or ``outbox_frames`` < 2.
    """

    speed: float = attrs.field(default=1.0, validator=attrs.validators.gt(0.0))
    max_speed: bool = False
    loop: bool = False
    start_when_subscribed: bool = True
    synthesize: int = 0
    synthetic_events: bool = True
    tick_changes: bool = False
    record: bool = False
    outbox_frames: int = attrs.field(default=256, validator=attrs.validators.ge(2))
    max_message_size: int = MAX_MESSAGE_SIZE
    faults: tuple[ScheduledFault, ...] = attrs.field(default=(), converter=_fault_tuple)
    garbage_assets: frozenset[str] | None = None
    max_subscribe_bytes: int = 0
    max_subscribe_ids: int = 0
    oversize_close_delay: float = 0.15
    oversize_close: DropMode = "tcp"
    storm_limit: int = 0
    storm_window: float = 1.0


class ReplayChanges(TypedDict, total=False):
    """
    The fields of :class:`ReplayOptions` as keywords (``max_speed=True``), for
    ``ReplayServer(tape, **changes)`` and ``serve_replay(paths, **changes)``.
    The same names and types (``tests/test_replay.py`` checks the names).
    """

    speed: float
    max_speed: bool
    loop: bool
    start_when_subscribed: bool
    synthesize: int
    synthetic_events: bool
    tick_changes: bool
    record: bool
    outbox_frames: int
    max_message_size: int
    faults: Iterable[ScheduledFault]
    garbage_assets: frozenset[str] | None
    max_subscribe_bytes: int
    max_subscribe_ids: int
    oversize_close_delay: float
    oversize_close: DropMode
    storm_limit: int
    storm_window: float
