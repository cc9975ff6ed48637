"""
``polystream replay``: a local server speaking Polymarket's market channel from captures.

It is the test and demo peer of the daemon: recorded WebSocket frames
(examples/README.md, "Capture format") played to any number of connections
by the protocol of the real venue (docs/protocol.md), with the CLOB REST
API answered from the same books, synthetic copies of the recorded assets
for scale, the venue's tick-size changes, and faults on request.

The modules, each importing only from those above it:

* :mod:`~polystream.replay.books`: the server's L2 books and the venue's book hash;
* :mod:`~polystream.replay.capture`: the capture format (:class:`Frame`,
  :class:`Capture`: loading, merging, the schedule, shifted laps);
* :mod:`~polystream.replay.synthetic`: synthetic assets, re-labelled copies
  of recorded ones (:class:`Synthetic`);
* :mod:`~polystream.replay.tape`: the one shared walk (:class:`Tape`):
  current books, snapshots, tick-size crossings (:class:`TickChange`);
* :mod:`~polystream.replay.wire`: raw WebSocket bytes and abrupt closes;
* :mod:`~polystream.replay.garbage`: the bad-input catalogue (:data:`GARBAGE_KINDS`);
* :mod:`~polystream.replay.stats`: counters and per-connection logs;
* :mod:`~polystream.replay.client`: one connection's subscriptions, filter and outbox;
* :mod:`~polystream.replay.faults`: the faults (:class:`ScheduledFault`,
  :class:`FaultRecord`);
* :mod:`~polystream.replay.injector`: what each fault does to connections;
* :mod:`~polystream.replay.rest`: the CLOB REST app;
* :mod:`~polystream.replay.orders`: :class:`FakeClob`, the CLOB V2 trading API
  (orders, cancels, heartbeats) for execution tests; import it from there (the
  package does not, so replaying never loads py-clob-client-v2);
* :mod:`~polystream.replay.options`: :class:`ReplayOptions`, every option in one value;
* :mod:`~polystream.replay.pacing`: when each frame is due; pause and resume;
* :mod:`~polystream.replay.server`: :class:`ReplayServer`, the protocol;
* :mod:`~polystream.replay.entry`: :func:`serve_replay` and :func:`run_replay_cli`.

Importing the package opens, reads and starts nothing.
"""

from __future__ import annotations

from polystream.replay.books import book_hash
from polystream.replay.capture import Capture, Frame
from polystream.replay.entry import run_replay_cli, serve_replay
from polystream.replay.faults import FAULT_ACTIONS, FaultRecord, ScheduledFault
from polystream.replay.garbage import GARBAGE_KINDS, Garbage, garbage_frames
from polystream.replay.injector import FaultInjector
from polystream.replay.options import ReplayChanges, ReplayOptions
from polystream.replay.rest import MAX_BOOKS_PER_REQUEST, ClobRest, RestRequest
from polystream.replay.server import ReplayServer
from polystream.replay.stats import ConnectionLog, ReplayStats, RequestRecord
from polystream.replay.synthetic import Synthetic, SyntheticAsset, synthetic_asset_id
from polystream.replay.tape import TICK_HIGH, TICK_LOW, Tape, TickChange
from polystream.replay.wire import DROP_MODES, DropMode, RawFrame

__all__ = [
    "DROP_MODES",
    "FAULT_ACTIONS",
    "GARBAGE_KINDS",
    "MAX_BOOKS_PER_REQUEST",
    "TICK_HIGH",
    "TICK_LOW",
    "Capture",
    "ClobRest",
    "ConnectionLog",
    "DropMode",
    "FaultInjector",
    "FaultRecord",
    "Frame",
    "Garbage",
    "RawFrame",
    "ReplayChanges",
    "ReplayOptions",
    "ReplayServer",
    "ReplayStats",
    "RequestRecord",
    "RestRequest",
    "ScheduledFault",
    "Synthetic",
    "SyntheticAsset",
    "Tape",
    "TickChange",
    "book_hash",
    "garbage_frames",
    "run_replay_cli",
    "serve_replay",
    "synthetic_asset_id",
]
