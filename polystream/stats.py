"""
Counters and per-shard state of one running daemon.

One :class:`Stats` is built in :func:`polystream.app.run` and passed to the
parts that count; nothing here is module-level. ``/health`` renders
:meth:`Stats.health` as JSON, and ``/metrics`` exposes the same numbers in
Prometheus format (:mod:`polystream.ops.metrics`, prometheus_client).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import attrs
from prometheus_client import Histogram

__all__ = ["BOOK_HASHES", "HEALTH_SCHEMA", "CacheStats", "ShardStats", "Stats"]

HEALTH_SCHEMA = 1

BOOK_HASHES = ("verified", "mismatched", "unverifiable")
"""Outcomes of a ``book`` hash check (:data:`polystream.feed.protocol.Integrity`)."""


@attrs.define
class ShardStats:
    """
    Live state of one shard (one WebSocket connection). Times are
    ``time.monotonic()`` seconds; None until the first occurrence.
    """

    index: int
    state: str = "starting"  # starting | connecting | connected | backoff | closed
    assets: int = 0
    frames: int = 0
    reconnects: int = 0
    stale_checks: int = 0
    connected_at: float | None = None
    last_frame_at: float | None = None
    last_data_at: float | None = None
    last_pong_at: float | None = None
    ping_rtt: float | None = None
    last_error: str | None = None
    retry_at: float | None = None  # time.monotonic() of the next connection attempt, in backoff
    seen_assets: set[str] = attrs.field(factory=set)
    subscribed_at: dict[str, float] = attrs.field(factory=dict)
    book_hashes: Counter[str] = attrs.field(factory=lambda: Counter(dict.fromkeys(BOOK_HASHES, 0)))

    def silent(self, now: float, after: float) -> list[str]:
        """Assets subscribed for more than ``after`` s that delivered no event since."""
        return sorted(
            asset
            for asset, since in self.subscribed_at.items()
            if asset not in self.seen_assets and now - since > after
        )

    def snapshot(self, now: float, silent_after: float = 60.0) -> dict[str, Any]:
        """The shard's part of ``/health``: ages in seconds."""
        silent = self.silent(now, silent_after) if self.state == "connected" else []
        return {
            "index": self.index,
            "state": self.state,
            "assets": self.assets,
            "assets_with_data": len(self.seen_assets),
            "coverage": len(self.seen_assets) / self.assets if self.assets else None,
            "silent_assets": len(silent),
            "silent_sample": silent[:5],
            "frames": self.frames,
            "reconnects": self.reconnects,
            "connected_for_s": None if self.connected_at is None else now - self.connected_at,
            "last_frame_age_s": None if self.last_frame_at is None else now - self.last_frame_at,
            "ping_rtt_s": self.ping_rtt,
            "last_error": self.last_error,
            "next_retry_in_s": None if self.retry_at is None else max(0.0, self.retry_at - now),
            "book_hashes": dict(self.book_hashes),
        }


@attrs.define
class CacheStats:
    """
    The Redis cache invalidation (``cache.redis_url``; polystream.cache).

    Attributes:
        target: the Redis URL with its password as ``***``.
        up: whether the last round trip worked (None before the first).
        keys: keys invalidated (deleted or published) since start.
        batches: round trips that worked.
        errors: round trips that failed (each retried later with the same keys).
        pending: keys waiting for Redis now.
        last_error: the last failure, one line.
        down_since: ``time.monotonic()`` of the first failure of the current outage.
        delay: seconds from a batch's commit to Redis's acknowledgement of its keys.
    """

    target: str
    up: bool | None = None
    keys: int = 0
    batches: int = 0
    errors: int = 0
    pending: int = 0
    last_error: str | None = None
    down_since: float | None = None
    delay: Histogram = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.delay = Histogram(
            "polystream_cache_delay_seconds",
            "Seconds from a committed flush to Redis acknowledging its invalidations",
            registry=None,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )

    def snapshot(self, now: float) -> dict[str, Any]:
        """The ``cache`` part of ``/health`` (``now``: ``time.monotonic()``; ages in seconds)."""
        return {
            "target": self.target,
            "up": self.up,
            "keys": self.keys,
            "batches": self.batches,
            "errors": self.errors,
            "pending": self.pending,
            "last_error": self.last_error,
            "down_for_s": None if self.down_since is None else now - self.down_since,
        }


@attrs.define
class Stats:
    """
    Everything counted by one daemon; mutated only from trio tasks.

    Attributes:
        frames: text frames received, all shards.
        events: events received by ``event_type``.
        parse_errors: skipped frames/events by kind (``invalid_json``, ...).
        control: non-JSON control frames by text (``PONG``, ...).
        foreign_events: events dropped because their asset is not in the shard.
        ignored_events: events of types the market channel does not define
            (``settlement_preview``...), by type: normal input, not used.
        rows_written: rows updated by table (``markets``, ``positions``).
        db_errors: failed database round trips.
        shards: per-shard state, by index.
    """

    started_at: float = attrs.field(factory=time.monotonic)
    started_wall: float = attrs.field(factory=time.time)
    frames: int = 0
    events: Counter[str] = attrs.field(factory=Counter)
    parse_errors: Counter[str] = attrs.field(factory=Counter)
    control: Counter[str] = attrs.field(factory=Counter)
    foreign_events: int = 0
    ignored_events: Counter[str] = attrs.field(factory=Counter)
    rows_written: Counter[str] = attrs.field(factory=Counter)
    db_errors: int = 0
    db_connected: bool = False
    last_write_at: float | None = None
    last_db_error: str | None = None
    desired_assets: int = 0
    cluster_member: str | None = None  # this daemon's member id when feed.cluster is on
    cluster_partitions: int = 0  # partitions served here now
    cluster_members: int = 0  # live members the last cycle counted
    cache: CacheStats | None = None  # the Redis invalidation, when cache.redis_url is set
    # Closing orders (execute.mode = "clob"), by outcome: signed, placed, filled, rejected,
    # failed, refused, dry_run, retried, recovered, rate_limited, heartbeats, heartbeat_failed.
    orders: Counter[str] | None = None
    orders_pending: Callable[[], int] | None = None
    orders_sent: bool = False  # execute.enabled: orders go to the venue (else a dry run)
    pending_markets: int = 0
    pending_positions: int = 0
    shards: dict[int, ShardStats] = attrs.field(factory=dict)
    silent_after: float = 60.0
    monitor_rules: int = 0
    monitor_predictions: int = 0
    next_decision_at: float | None = None
    triggers: Counter[str] = attrs.field(factory=Counter)
    triggers_written: int = 0
    triggers_duplicate: int = 0
    # Predictions due but not decided (their asset has no ask): how many now,
    # and every deferral (first and each later look) by reason.
    predictions_deferred: int = 0
    prediction_deferrals: Counter[str] = attrs.field(factory=lambda: Counter(no_price=0))
    poll_snapshot: Callable[[float], dict[str, Any]] | None = None
    resync_snapshot: Callable[[], dict[str, Any]] | None = None
    queue_depth: Callable[[], int] | None = None
    executor_pending: Callable[[], int] | None = None
    db_seconds: Histogram = attrs.field(init=False)
    db_batch_rows: Histogram = attrs.field(init=False)
    loop_lag: Histogram = attrs.field(init=False)
    loop_lag_max: float = 0.0

    def __attrs_post_init__(self) -> None:
        # In no registry (never prometheus_client's global one): polystream.ops.metrics
        # builds the daemon's own registry around them.
        self.db_seconds = Histogram(
            "polystream_db_call_seconds",
            "Database round trips (one batch each), by owner",
            ["link"],
            registry=None,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.db_batch_rows = Histogram(
            "polystream_db_batch_rows",
            "Items per database round trip, by owner",
            ["link"],
            registry=None,
            buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000),
        )
        self.loop_lag = Histogram(
            "polystream_loop_lag_seconds",
            "How late the event loop woke a 10 ms timer: time it spent stalled",
            registry=None,
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
        )

    def queue_depth_now(self) -> int:
        """Frames received but not yet applied by the router (0 when unknown)."""
        return 0 if self.queue_depth is None else self.queue_depth()

    def shard(self, index: int) -> ShardStats:
        """The stats of shard ``index``, created on first use."""
        stats = self.shards.get(index)
        if stats is None:
            stats = self.shards[index] = ShardStats(index)
        return stats

    def book_hashes(self) -> Counter[str]:
        """``book`` hash checks of all shards, by outcome (``verified``, ...)."""
        total: Counter[str] = Counter(dict.fromkeys(BOOK_HASHES, 0))
        for shard in self.shards.values():
            total.update(shard.book_hashes)
        return total

    def problems(self) -> list[str]:
        """Why the daemon is unhealthy; empty when healthy."""
        problems = []
        if not self.db_connected:
            problems.append("database not connected")
        for shard in self.shards.values():
            if shard.state != "connected":
                cause = f": {shard.last_error}" if shard.last_error else ""
                problems.append(f"shard {shard.index} {shard.state}{cause}")
        return problems

    def health(self) -> dict[str, Any]:
        """The ``/health`` document (JSON-ready; ages in seconds)."""
        now = time.monotonic()
        problems = self.problems()
        return {
            "schema": HEALTH_SCHEMA,
            "status": "ok" if not problems else "unhealthy",
            "problems": problems,
            "uptime_s": now - self.started_at,
            "started_at": self.started_wall,
            "subscribed_assets": sum(s.assets for s in self.shards.values()),
            "desired_assets": self.desired_assets,
            "cluster": None
            if self.cluster_member is None
            else {
                "member": self.cluster_member,
                "partitions": self.cluster_partitions,
                "members": self.cluster_members,
            },
            "cache": None if self.cache is None else self.cache.snapshot(now),
            "orders": None
            if self.orders is None
            else {
                "sending": self.orders_sent,
                "outcomes": dict(self.orders),
                "pending": 0 if self.orders_pending is None else self.orders_pending(),
            },
            "frames": self.frames,
            "events": dict(self.events),
            "parse_errors": dict(self.parse_errors),
            "control_frames": dict(self.control),
            "foreign_events": self.foreign_events,
            "ignored_events": dict(self.ignored_events),
            "book_hashes": dict(self.book_hashes()),
            "rows_written": dict(self.rows_written),
            "pending": {
                "markets": self.pending_markets,
                "positions": self.pending_positions,
                "triggers": 0 if self.executor_pending is None else self.executor_pending(),
                "router_queue": 0 if self.queue_depth is None else self.queue_depth(),
            },
            "database": {
                "connected": self.db_connected,
                "errors": self.db_errors,
                "last_error": self.last_db_error,
                "last_write_age_s": None
                if self.last_write_at is None
                else now - self.last_write_at,
            },
            "monitor": {
                "rules": self.monitor_rules,
                "predictions": self.monitor_predictions,
                "next_decision_in_s": None
                if self.next_decision_at is None
                else self.next_decision_at - time.time(),
                "triggers": dict(self.triggers),
                "triggers_written": self.triggers_written,
                "triggers_duplicate": self.triggers_duplicate,
                "predictions_deferred": self.predictions_deferred,
                "prediction_deferrals": dict(self.prediction_deferrals),
            },
            "poll": None if self.poll_snapshot is None else self.poll_snapshot(now),
            "resync": None if self.resync_snapshot is None else self.resync_snapshot(),
            "silent_after_s": self.silent_after,
            "loop_lag_max_s": self.loop_lag_max,
            "shards": [s.snapshot(now, self.silent_after) for _, s in sorted(self.shards.items())],
        }
