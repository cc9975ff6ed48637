"""
What a replay server counts, and what it records per connection.

:class:`ReplayStats` is always kept: message sizes, subscription peaks,
frames and events sent, faults. With the ``record`` option the server also
keeps, per connection, every subscription request received (time, size in
bytes, ids) and when each snapshot was written to the socket
(:class:`ConnectionLog`), for the subscription tests and benchmarks.
Times are ``time.monotonic()`` seconds.
"""

from __future__ import annotations

from collections import Counter

import attrs

__all__ = ["ConnectionLog", "ReplayStats", "RequestRecord"]


@attrs.define
class ReplayStats:
    """
    Counters of a replay server.

    Attributes:
        connections: connections accepted, all time.
        frames_sent: frames queued to clients (a frame to two clients counts twice).
        events_sent: events in those frames, after filtering.
        snapshots_sent: ``book`` events sent on subscribe.
        messages_ignored: client messages not understood (binary, non-JSON
            text other than ``PING``, JSON that is not a valid request).
        invalid_json: of those, text that looked like JSON and did not parse.
        messages_received: client messages of any kind.
        max_message_bytes: the largest client message, bytes (UTF-8 for text).
        max_request_assets: the most ids in one subscription request.
        max_subscribed: the largest subscription set one connection ever held.
        synthetic_snapshots_sent: of ``snapshots_sent``, those of synthetic assets.
        synthetic_events_sent: of ``events_sent``, events re-labelled for synthetic assets.
        rejected: handshakes rejected (``storm_limit``: 429; ``refusing``).
        oversized_subscribes: subscribe messages over ``max_subscribe_bytes`` /
            ``max_subscribe_ids`` (each closed the connection).
        faults: faults applied, by action (:attr:`ReplayServer.fault_log` has each).
        garbage_sent: garbage inputs queued, by kind (:data:`GARBAGE_KINDS`).
        tick_size_changes_sent: ``tick_size_change`` events queued to clients
            (``tick_changes``; copies relabelled for synthetic assets included).
        rest_requests: HTTP requests the REST app answered (:attr:`ReplayServer.rest_requests`).
    """

    connections: int = 0
    frames_sent: int = 0
    events_sent: int = 0
    snapshots_sent: int = 0
    messages_ignored: int = 0
    invalid_json: int = 0
    messages_received: int = 0
    max_message_bytes: int = 0
    max_request_assets: int = 0
    max_subscribed: int = 0
    synthetic_snapshots_sent: int = 0
    synthetic_events_sent: int = 0
    rejected: int = 0
    oversized_subscribes: int = 0
    faults: Counter[str] = attrs.Factory(Counter)
    garbage_sent: Counter[str] = attrs.Factory(Counter)
    tick_size_changes_sent: int = 0
    rest_requests: int = 0


@attrs.frozen
class RequestRecord:
    """
    One subscription request a connection sent (kept with ``record``).

    Attributes:
        received_at: ``time.monotonic()`` when the server read it.
        size_bytes: the message's size, UTF-8 bytes.
        operation: ``"type"`` (the first message), ``"subscribe"`` or ``"unsubscribe"``.
        asset_ids: the ids as sent.
        subscribed_after: the connection's subscription count after it.
    """

    received_at: float
    size_bytes: int
    operation: str
    asset_ids: tuple[str, ...]
    subscribed_after: int


@attrs.define(eq=False)
class ConnectionLog:
    """
    What one connection did (kept with ``record``, also after it closed).

    Attributes:
        number: the connection's number (1 = first accepted).
        opened_at, closed_at: ``time.monotonic()``; ``closed_at`` None while open.
        requests: its subscription requests, in order.
        snapshots: asset id -> when its latest snapshot was written to the socket.
        subscribed: its subscription set (live while open, final once closed).
    """

    number: int
    opened_at: float
    closed_at: float | None = None
    requests: list[RequestRecord] = attrs.Factory(list)
    snapshots: dict[str, float] = attrs.Factory(dict)
    subscribed: set[str] = attrs.Factory(set)
